"""RASATrainer: a drop-in replacement for TRL's SFTTrainer that runs Routing-Aware Safety Alignment.

Epochs alternate between two phases (see ``docs/method.md``):

- **expert phase**: only the Safety-Critical Experts' repairs learn (full-rank deltas or LoRA), with the routing each
  example received at the start of the phase replayed, on the completion-only cross-entropy;
- **router phase**: only the routers learn (fp32 master weights), on the mean over MoE layers of
  KL(anchor || adversarial) between token-mean router probabilities of the anchor and adversarial contexts.

Every parameter any phase trains is trainable before the optimiser is built and before DDP wraps the model; a phase
switches the other group off (``requires_grad=False``, and its gradients are dropped before the optimiser step, so
it gets no update, no weight decay and no moment drift).

This module owns the constructor's contract (arguments checked before any work), the selection (given, resumed or
detected at train start) and which loss a step computes. Each other concern is one mixin in its own module, hooked
into Trainer where Trainer offers a hook: ``saving.py`` (every save route, resume, crash safety), ``phases.py``
(phase schedule, routing records and replay), ``param_groups.py`` (trainable groups, optimiser, per-group metrics),
``router_loss.py`` (the router phase's loss), ``retain.py`` (retain rows in expert-phase batches) and
``training_data.py`` (pair rows, anchors, collator). See ``docs/architecture.md``; the private APIs of our dependencies
used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
from torch import nn
from trl import SFTTrainer

from .config import RASAConfig
from ..data.contract import validate_pairs
from .model_card import render_model_card
from ..moe.discovery import unwrap_model
from .param_groups import ParameterGroupsMixin
from .phases import PHASE_CODES, PhasesMixin, RASAPhaseCallback
from ..moe.replay_cache import RoutingCache
from .retain import RetainMixin, _captured_outputs, _validated_retain
from .router_loss import RouterLossMixin
from .saving import SELECTION_FILE, CheckpointingMixin
from .training_data import PairDataMixin, _PairCollator, _training_rows
from ..utils import atomic_write

logger = logging.getLogger(__name__)


class RASATrainer(CheckpointingMixin, PhasesMixin, ParameterGroupsMixin, RouterLossMixin, RetainMixin, PairDataMixin,
                  SFTTrainer):
    """Drop-in replacement for :class:`trl.SFTTrainer` that runs RASA.

    Same constructor as ``SFTTrainer`` plus ``safety_critical_experts`` (a
    :class:`~rasa_trainer.SafetyCriticalExperts` or a path to its JSON). Without it, the trainer detects the
    Safety-Critical Experts on the training pairs first. ``args`` must be a :class:`RASAConfig`.
    The training data follows the pair contract: ``prompt``, ``anchor_prompt`` and optionally ``completion``.
    """

    _tag_names = ["trl", "sft", "rasa", "moe-safety"]
    _name = "RASA"
    _paper = {
        "title": "Routing-Aware Safety Alignment for Mixture-of-Experts Models",
        "id": "2602.04448",
        "citation": "@article{liang2026rasa, title={Routing-Aware Safety Alignment for Mixture-of-Experts Models}, "
        "author={Liang, Jiacheng and Wang, Yuhui and Jiang, Tanqiu and Wang, Ting}, journal={arXiv preprint "
        "arXiv:2602.04448}, year={2026}}",
    }

    def __init__(self, model, args: RASAConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, safety_critical_experts=None, peft_config=None,
                 retain_dataset=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = RASAConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1] or 'model'}-RASA")
        if not isinstance(args, RASAConfig):
            raise TypeError(f"RASATrainer needs args=RASAConfig(...), got {type(args).__name__}")
        if peft_config is not None and args.rasa_schedule != "full":
            raise ValueError(
                "RASATrainer trains its own repairs of the selected experts; a peft_config would train other "
                "parameters. Use expert_tuning='lora' (with expert_lora_rank/alpha) instead, or use peft_config only "
                "with rasa_schedule='full'."
            )
        _reject_peft_model(model, args)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        if (kwargs.get("optimizers") or (None, None))[0] is not None and args.rasa_schedule != "full":
            raise ValueError(
                "optimizers=(optimizer, scheduler): an optimizer built before the trainer cannot hold the expert "
                "repairs RASATrainer attaches, nor give each group its learning rate. Pass the optimizer class "
                "instead, optimizer_cls_and_kwargs=(cls, kwargs), or choose it with `optim`/`optim_args`."
            )
        validate_pairs(train_dataset, anchor_column=args.anchor_column)
        if eval_dataset is not None:
            validate_pairs(eval_dataset, anchor_column=args.anchor_column)
        self._retain = _validated_retain(retain_dataset, args, kwargs.get("compute_loss_func"))  # before any work
        self._retain_examples: list[dict] | None = None  # tokenised at the start of train()
        self._step_items: tuple = (None, None)  # completion tokens of the pairs / retain rows in the optimiser step
        self._pairs = train_dataset
        self._phase: str | None = None
        self._phase_epoch: int | None = None
        self._routing_cache: RoutingCache | None = None
        self._initial_routing: RoutingCache | None = None
        self._resumed: dict[str, Any] = {}
        self._groups: dict[str, list[nn.Parameter]] = {}
        self._group_of_name: dict[str, str] = {}
        self._pairs_in_step: int | None = None
        self.selection = None
        # TRL switches output_router_logits on for its load-balancing loss; the config is restored after training
        # (left on, it is saved with the model and batched generation with it fails in transformers)
        self._router_logits_setting = _output_router_logits(model)
        with _repairs_count_as_adapters(model, args):
            super().__init__(
                model, args=args, data_collator=data_collator, train_dataset=_training_rows(train_dataset, args),
                eval_dataset=_training_rows(eval_dataset, args) if eval_dataset is not None else None,
                processing_class=processing_class, peft_config=peft_config, **kwargs,
            )
        self.data_collator = _PairCollator(self.data_collator, self._tokenizer.pad_token_id)
        if self._retain is not None:
            self._check_retain_lengths()
        if args.rasa_schedule != "full":
            self._disable_aux_loss()
        self.selection = self._resolve_selection(safety_critical_experts)
        if self._needs_detection():
            # detection is deferred to the start of train(), on the model on the training device (TRL keeps
            # construction cheap); it cannot run on weights FSDP or ZeRO-3 have sharded
            self._check_detection_supported()
        else:
            self._setup_parameter_groups()
        self.add_callback(RASAPhaseCallback(self))

    def _disable_aux_loss(self) -> None:
        # The load-balancing loss recomputes top-k from live logits, which contradicts replayed routing, and the
        # router phase has its own loss.
        self.aux_loss_enabled = False
        text_config = unwrap_model(self.model).config.get_text_config()
        if hasattr(text_config, "output_router_logits"):
            text_config.output_router_logits = False

    def _restore_router_logits_setting(self) -> None:
        text_config = unwrap_model(self.model).config.get_text_config()
        if hasattr(text_config, "output_router_logits"):
            text_config.output_router_logits = self._router_logits_setting

    def _resolve_selection(self, selection):
        """The selection given to the constructor, validated; ``None`` when it is to be detected (at train start)."""
        if self.args.rasa_schedule not in ("alternate", "expert_only"):
            if selection is not None:
                logger.warning("safety_critical_experts is ignored with rasa_schedule=%r", self.args.rasa_schedule)
            return None
        from ..detection.selection import SafetyCriticalExperts

        if selection is None:
            return None
        if isinstance(selection, (str, os.PathLike)):
            selection = SafetyCriticalExperts.load(selection)
        return self._validated_selection(selection)

    def _validated_selection(self, selection):
        from ..detection.selection import SafetyCriticalExperts

        if not isinstance(selection, SafetyCriticalExperts):
            raise TypeError(
                f"safety_critical_experts must be a SafetyCriticalExperts or a path to its JSON, got {type(selection).__name__}"
            )
        if len(selection) == 0:
            raise ValueError(
                "safety_critical_experts holds no experts, so the expert phase would train nothing; pass a selection "
                "with at least one expert (or use rasa_schedule='router_only')"
            )
        selection.validate(unwrap_model(self.model))
        logger.info("RASA: repairing %d Safety-Critical Experts: %s", len(selection), selection.by_moe_layer())
        return selection

    def _needs_detection(self) -> bool:
        return self.args.rasa_schedule in ("alternate", "expert_only") and self.selection is None

    def _check_detection_supported(self) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            engine = "FSDP" if self.is_fsdp_enabled else "DeepSpeed ZeRO-3"
            raise ValueError(
                f"no safety_critical_experts were given, and under {engine} the trainer cannot detect them itself: "
                f"the expert repairs must be attached before {engine} shards the model, while detection needs the "
                f"whole model to generate. Detect first (`rasa-trainer detect`, examples/detect_experts.py or "
                f"rasa_trainer.detect_safety_critical_experts, e.g. with device_map='auto'), then pass "
                f"safety_critical_experts='<dir>/safety_critical_experts.json'."
            )

    def _ensure_selection(self, resume_from_checkpoint=None) -> None:
        """Detect the Safety-Critical Experts when none were given (on every rank, pairs sharded across ranks, on the
        model on the device training uses) and attach their repairs; a resumed run takes the checkpoint's selection.
        Runs before Trainer builds the optimiser and before DDP wraps the model."""
        if not self._needs_detection():
            return
        if self.optimizer is not None:
            raise RuntimeError(
                "the optimiser was built before the Safety-Critical Experts were detected, so it cannot hold their "
                "repairs; call trainer.train() first, or pass safety_critical_experts"
            )
        selection = self._selection_of_checkpoint(resume_from_checkpoint)
        if selection is None:
            if self.place_model_on_device and not getattr(self, "is_model_parallel", False):
                self._move_model_to_device(self.model, self.args.device)
            selection = self._detect()
        self.selection = self._validated_selection(selection)
        self._setup_parameter_groups()

    def _selection_of_checkpoint(self, resume_from_checkpoint):
        """The selection a checkpoint was trained with (resuming never re-runs detection), or ``None``."""
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        path = os.path.join(str(resume_from_checkpoint), SELECTION_FILE)
        if not os.path.isfile(path):
            return None
        from ..detection.selection import SafetyCriticalExperts

        logger.info("RASA: resuming with the Safety-Critical Experts of %s", path)
        return SafetyCriticalExperts.load(path)

    def _detect(self):
        from ..detection.detect import detect_safety_critical_experts
        from ..judges.builtin import judge_from_name

        args = self.args
        logger.info("RASA: no safety_critical_experts given; detecting them on the training pairs on %s", args.device)
        return detect_safety_critical_experts(
            unwrap_model(self.model), self._tokenizer, self._pairs,
            judge=judge_from_name(args.detection_judge), anchor_column=args.anchor_column,
            batch_size=args.detection_batch_size, max_new_tokens=args.detection_max_new_tokens, seed=args.seed,
            do_sample=args.detection_do_sample, temperature=args.detection_temperature,
            policy=args.sce_policy, num_experts=args.sce_num_experts, threshold=args.sce_threshold,
            top_p_experts=args.sce_top_p,
            output_dir=args.output_dir if self.is_world_process_zero() else None,
        )

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._check_not_merged()
        # True becomes the newest complete checkpoint; an incomplete or foreign one is refused before any work
        resume_from_checkpoint = self._resolve_resume_checkpoint(resume_from_checkpoint)
        self._ensure_selection(resume_from_checkpoint)
        self._prepare_retain()
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor_ids = inputs.pop("anchor_input_ids", None)
        anchor_mask = inputs.pop("anchor_attention_mask", None)
        rows = inputs.pop("rasa_index", None)
        context = inputs.pop("rasa_context_mask", None)
        inputs.pop("rasa_retain_index", None)  # retain rows, if any, follow the pairs: rows len(rows) onwards
        if not model.training or self._phase is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # the phase of the last step of a logging window (a list of one value, which Trainer's averaging keeps as is)
        self._metrics["train"]["phase"] = [PHASE_CODES[self._phase]]
        if self._phase == "router":
            if context is None:  # batches built without the RASA collator
                context = (inputs["labels"] == -100) & inputs["attention_mask"].bool()
            return self._router_loss(model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch, context=context)
        # the expert phase's routing replay is active around the whole training step (see training_step)
        if self._retain_examples and rows is not None:
            # a run with retain rows (they follow the pairs in some batches): each part's own mean, logged per part
            with _captured_outputs(model) as captured:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._log_split_losses(captured, num_pairs=len(rows))
            return self._retain_weighted_loss(loss, captured, len(rows), num_items_in_batch)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if isinstance(loss, tuple) else loss
        self._metrics["train"]["completion_loss"].append(value.detach().item())
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._phase == "router" and self.args.router_loss == "per_pair":
            # pairs in this optimiser step over every micro-batch and process (like num_items_in_batch for tokens)
            pairs = torch.tensor(sum(int(b["input_ids"].shape[0]) for b in batch_samples), device=device)
            if self.accelerator.num_processes > 1:
                pairs = self.accelerator.gather(pairs.reshape(1)).sum()
            self._pairs_in_step = int(pairs)
        if self._phase == "expert" and self._retain_examples:
            batch_samples = [self._with_retain_rows(batch, j) for j, batch in enumerate(batch_samples)]
            num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
            self._retain_items(batch_samples, device)
        return batch_samples, num_items_in_batch

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, output_dir: str | None = None,
                          evaluation_results: dict | None = None, **kwargs):
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        text = render_model_card(
            self, model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
            dataset_name=dataset_name, tags=tags, evaluation_results=evaluation_results or getattr(self, "evaluation_results", None),
        )
        atomic_write(os.path.join(output_dir, "README.md"), text)


def _reject_peft_model(model, args: RASAConfig) -> None:
    """A PeftModel would be saved as a plain checkpoint with its LoRA keys (lost on reload); RASA attaches its own
    repairs, so the user's adapter must be merged first."""
    if args.rasa_schedule == "full" or isinstance(model, str) or not hasattr(model, "peft_config"):
        return
    raise ValueError(
        f"model is a PEFT model ({type(model).__name__}). RASATrainer attaches its own repairs to the selected experts "
        f"and saves merged checkpoints, which a PEFT wrapper would break. Merge your adapter first "
        f"(model = model.merge_and_unload()) and pass the plain model; for LoRA repairs use expert_tuning='lora'."
    )


def _output_router_logits(model) -> bool:
    """The model's own output_router_logits setting (False for a model id: configs default to it)."""
    if isinstance(model, str):
        return False
    return bool(getattr(model.config.get_text_config(), "output_router_logits", False))


@contextlib.contextmanager
def _repairs_count_as_adapters(model, args: RASAConfig):
    """Let a quantized base model (bitsandbytes) through the Trainer's "no training of purely quantized models" check:
    RASA trains its own adapters (expert repairs, fp32 routers), which it attaches right after construction."""
    quantized = not isinstance(model, str) and getattr(model, "is_quantized", False)
    if not quantized or args.rasa_schedule == "full":
        yield
        return
    had = "_hf_peft_config_loaded" in vars(model)
    previous = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True
    for param in model.parameters():
        param.requires_grad_(False)  # else SFTTrainer casts every trainable weight of a quantized model to bf16
    try:
        yield
    finally:
        if had:
            model._hf_peft_config_loaded = previous
        else:
            del model._hf_peft_config_loaded
