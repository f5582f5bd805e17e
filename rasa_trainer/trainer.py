"""RASATrainer: a drop-in replacement for TRL's SFTTrainer that runs Routing-Aware Safety Alignment.

Epochs alternate between two phases (see ``docs/method.md``):

- **expert phase**: only the Safety-Critical Experts' repairs learn (full-rank deltas or LoRA), with the routing each
  example received at the start of the phase replayed, on the completion-only cross-entropy;
- **router phase**: only the routers learn (fp32 master weights), on the mean over MoE layers of
  KL(anchor || adversarial) between token-mean router probabilities of the anchor and adversarial contexts.

Every parameter any phase trains is trainable before the optimiser is built and before DDP wraps the model; a phase
switches the other group off (``requires_grad=False``, and its gradients are dropped before the optimiser step, so
it gets no update, no weight decay and no moment drift).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from trl import SFTTrainer

from .config import RASAConfig
from .data import render_chat, as_messages, completion_text, validate_pairs
from .model_card import render_model_card
from .moe import moe_layers, unwrap_model
from .repairs import attach_repairs, upcast_routers
from .replay_cache import RoutingCache, assignment_shift
from .routing import record_routing, replay_routing
from .saving import SELECTION_FILE, CheckpointingMixin
from .utils import atomic_write

logger = logging.getLogger(__name__)

PHASE_CODES = {"full": 0, "expert": 1, "router": 2}


class RASAPhaseCallback(TrainerCallback):
    """Switches phases at epoch boundaries and keeps inactive groups out of the optimiser step."""

    def __init__(self, trainer: "RASATrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._restore_router_logits_setting()
        self.trainer._merge_after_training()

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional when resuming mid-epoch; the tolerance absorbs float sums like 0.999999
        self.trainer._begin_phase(math.floor(state.epoch + 1e-6))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._before_optimizer_step()


class _PairCollator:
    """Wraps TRL's collator: pads the tokenised anchors alongside and passes the dataset row of each example."""

    def __init__(self, base, pad_token_id: int):
        self.base, self.pad_token_id = base, pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        anchors = [ex.pop("anchor_input_ids") for ex in examples] if "anchor_input_ids" in examples[0] else None
        rows = [ex.pop("rasa_index") for ex in examples] if "rasa_index" in examples[0] else None
        prompt_lengths = [ex.pop("rasa_prompt_length") for ex in examples] if "rasa_prompt_length" in examples[0] else None
        batch = self.base(examples)
        if anchors is not None:
            width = max(len(a) for a in anchors)
            ids = torch.full((len(anchors), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(anchors), width), dtype=torch.long)
            for i, a in enumerate(anchors):
                ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
                mask[i, : len(a)] = 1
            batch["anchor_input_ids"], batch["anchor_attention_mask"] = ids, mask
        if rows is not None:
            batch["rasa_index"] = torch.tensor(rows, dtype=torch.long)
        if prompt_lengths is not None:
            # the context the router loss averages over: the prompt tokens (TRL's completion mask is 0 there; TRL pads
            # on the right), independent of how `labels` are masked
            positions = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
            lengths = torch.tensor(prompt_lengths, dtype=torch.long).unsqueeze(1)
            batch["rasa_context_mask"] = (positions < lengths) & batch["attention_mask"].bool()
        return batch


def _training_rows(dataset, args: RASAConfig) -> Dataset:
    """The pair contract as TRL's conversational prompt-completion rows, plus the anchor and the row index."""
    rows = dataset if isinstance(dataset, list) else dataset.to_list()
    return Dataset.from_list(
        [
            {
                "prompt": as_messages(row["prompt"]),
                "completion": [{"role": "assistant", "content": completion_text(row.get("completion"), args.default_refusal)}],
                "rasa_anchor": as_messages(row[args.anchor_column]),
                "rasa_index": i,
            }
            for i, row in enumerate(rows)
        ]
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [N, E]`` over the rows where the flat ``mask [N]`` is set."""
    mask = mask.reshape(-1).to(values.device)
    if not mask.any():
        raise ValueError("a batch has no context tokens to average router probabilities over")
    return values[mask].mean(dim=0)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension (one value per leading index)."""
    eps = 1e-12
    return (p * ((p + eps).log() - (q + eps).log())).sum(dim=-1)


def _per_pair_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example, the mean of ``values [B * T, E]`` over its positions where ``mask [B, T]`` is set: ``[B, E]``."""
    batch, length = mask.shape
    weights = mask.to(values.device, values.dtype).reshape(batch, length, 1)
    counts = weights.sum(dim=1)
    if (counts == 0).any():
        raise ValueError("an example has no context tokens to average router probabilities over")
    return (values.reshape(batch, length, -1) * weights).sum(dim=1) / counts


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _canonical_name(name: str) -> str:
    """A parameter name without the prefixes DDP, torch.compile and FSDP wrappers add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _with_param_groups(optimizer_cls, regroup):
    """``optimizer_cls`` whose constructor regroups the parameter groups it is given (Trainer's decay / no-decay
    groups) with ``regroup``; everything else, its name and module included, is the class Trainer chose."""

    def __init__(self, params, *args, **kwargs):
        optimizer_cls.__init__(self, regroup(list(params)), *args, **kwargs)

    return type(optimizer_cls.__name__, (optimizer_cls,), {
        "__init__": __init__, "__module__": optimizer_cls.__module__, "__qualname__": optimizer_cls.__qualname__,
        "__doc__": optimizer_cls.__doc__,
    })


class RASATrainer(CheckpointingMixin, SFTTrainer):
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
        self._retain = _validated_retain(retain_dataset, args)  # checked before any work
        self._retain_examples: list[dict] | None = None  # tokenised at the start of train()
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

    # ---------------------------------------------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if "rasa_anchor" in dataset.column_names:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            self._check_lengths(dataset, tokenizer, args, dataset_name)
            dataset = dataset.map(
                lambda ex: {"anchor_input_ids": _chat_ids(tokenizer, ex["rasa_anchor"], generation_prompt=True)},
                remove_columns=["rasa_anchor"],
                desc=f"Tokenizing anchors of {dataset_name}",
            )
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if "anchor_input_ids" in dataset.column_names and "prompt" in dataset.column_names:
            # Where the completion starts, exactly as TRL computes its completion mask (which it folds into `labels`
            # and drops): the router loss reads its context from here, not from `labels`, so assistant_only_loss
            # and multi-turn prompts do not change what the routers are trained on.
            from trl.data_utils import common_prefix_length

            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            template = getattr(self, "chat_template", None)
            dataset = dataset.map(
                lambda ex: {"rasa_prompt_length": common_prefix_length(
                    _chat_ids(tokenizer, ex["prompt"], generation_prompt=True, chat_template=template), ex["input_ids"])},
                desc=f"Locating the prompts of {dataset_name}",
            )
        return dataset

    @staticmethod
    def _check_lengths(dataset, tokenizer, args, dataset_name: str) -> None:
        """Refuse rows whose refusal target would be cut off by truncation (a pitfall of the reference code)."""
        if args.max_length is None:
            return
        too_long = []
        for i, row in enumerate(dataset):
            n = len(_chat_ids(tokenizer, row["prompt"] + row["completion"], generation_prompt=False))
            if n > args.max_length:
                too_long.append(f"row {i} ({n} tokens)")
            n = len(_chat_ids(tokenizer, row["rasa_anchor"], generation_prompt=True))
            if n > args.max_length:
                too_long.append(f"row {i} (anchor: {n} tokens)")
        if too_long:
            raise ValueError(
                f"{len(too_long)} row(s) of {dataset_name} exceed max_length={args.max_length} with their completion "
                f"or their anchor, so truncation would cut the refusal target or the anchor context: "
                f"{', '.join(too_long[:5])}. Raise max_length or shorten those rows."
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in ("anchor_input_ids", "rasa_index", "rasa_prompt_length"):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ---------------------------------------------------------------------------------------------------- setup
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
        from .selection import SafetyCriticalExperts

        if selection is None:
            return None
        if isinstance(selection, (str, os.PathLike)):
            selection = SafetyCriticalExperts.load(selection)
        return self._validated_selection(selection)

    def _validated_selection(self, selection):
        from .selection import SafetyCriticalExperts

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
        from .selection import SafetyCriticalExperts

        logger.info("RASA: resuming with the Safety-Critical Experts of %s", path)
        return SafetyCriticalExperts.load(path)

    def _detect(self):
        from .detection import detect_safety_critical_experts
        from .judges import judge_from_name

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

    def _setup_parameter_groups(self) -> None:
        schedule, model = self.args.rasa_schedule, self.model
        if schedule == "full":
            self._groups["full"] = [p for p in model.parameters() if p.requires_grad]
            self._index_groups()
            return
        for p in model.parameters():
            p.requires_grad_(False)
        self._model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if schedule in ("alternate", "expert_only"):
            self._groups["experts"] = attach_repairs(
                model, self.selection.by_moe_layer(), self.args.expert_tuning, self.args.expert_lora_rank,
                self.args.expert_lora_alpha,
            )
        if schedule in ("alternate", "router_only"):
            self._groups["routers"] = upcast_routers(model)
        _register_zero3_leaf_modules(model)
        for params in self._groups.values():
            for p in params:
                p.requires_grad_(True)
        self._index_groups()

    def _index_groups(self) -> None:
        """Parameter name -> RASA group, so groups can be found again in a model the engine has prepared."""
        ids = {id(p): name for name, params in self._groups.items() for p in params}
        self._group_of_name = {
            # names as the model the optimiser will get sees them (a PEFT model keeps its base_model prefix)
            _canonical_name(n): ids[id(p)] for n, p in self.model.named_parameters() if id(p) in ids
        }

    def _group_learning_rates(self) -> dict[str, float]:
        return {"experts": self.args.expert_learning_rate, "routers": self.args.router_learning_rate,
                "full": self.args.expert_learning_rate}

    def create_optimizer(self, model=None):
        """Trainer's optimiser (``optim``, ``optim_args``, ``optimizer_cls_and_kwargs``, 8-bit and paged optimisers)
        over Trainer's decay / no-decay split (``get_decay_parameter_names``), each of those groups split further by
        RASA group (expert repairs, routers; ``full``: all weights) with the group's learning rate."""
        if self.optimizer is not None:
            return super().create_optimizer(model)
        self._ensure_selection()
        opt_model = self.model if model is None else model
        group_of = {}
        for name, param in opt_model.named_parameters():
            group = self._group_of_name.get(_canonical_name(name))
            if group is not None:
                group_of[id(param)] = group
        # the engine may have replaced the parameters (FSDP2): the groups follow the model the optimiser gets
        self._groups = {g: [p for p in opt_model.parameters() if group_of.get(id(p)) == g] for g in self._groups}
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        lrs = self._group_learning_rates()
        optimizer_kwargs = {**optimizer_kwargs, "lr": lrs["full"] if "full" in self._groups else optimizer_kwargs.get("lr")}
        if optimizer_kwargs["lr"] is None:
            del optimizer_kwargs["lr"]
        from transformers.trainer_optimizer import is_optimizer_factory

        builds_own_groups = is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if builds_own_groups and "full" not in self._groups:
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups (or takes the whole model), so RASA cannot "
                f"give the expert repairs and the routers their own learning rates. Use an optimiser class: e.g. "
                f"optim='adamw_torch', 'adamw_bnb_8bit', 'paged_adamw_8bit', or optimizer_cls_and_kwargs=(cls, kwargs)."
            )
        order = list(self._groups)

        def regroup(param_groups):
            grouped = []
            for group in param_groups:  # Trainer's groups: weight decay, no weight decay (split per device mesh)
                by_rasa = {}
                for p in group["params"]:
                    if id(p) not in group_of:
                        raise RuntimeError("a trainable parameter belongs to no RASA group")
                    by_rasa.setdefault(group_of[id(p)], []).append(p)
                grouped.extend({**group, "params": ps, "lr": lrs[g], "name": g} for g, ps in by_rasa.items())
            return sorted(grouped, key=lambda g: order.index(g["name"]))  # stable: decay before no decay

        cls = optimizer_cls if builds_own_groups else _with_param_groups(optimizer_cls, regroup)
        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (cls, optimizer_kwargs)
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = saved

    def _get_learning_rate(self) -> float:
        """The learning rate of the group the current phase trains (Trainer logs it as ``learning_rate``); every
        group's rate is logged as ``learning_rate_<group>``."""
        value = super()._get_learning_rate()
        try:
            rates = [float(r) for r in self.lr_scheduler.get_last_lr()]
            names = [g.get("name") for g in self.optimizer.param_groups]
        except Exception:  # schedulers without per-group rates (DeepSpeed warm-up): keep Trainer's value
            return value
        if len(rates) != len(names):
            return value
        per_group = {}
        for name, rate in zip(names, rates):
            per_group.setdefault(name, rate)
        for name, rate in per_group.items():
            if name is not None:
                self._metrics["train"][f"learning_rate_{name}"] = [rate]
        active = {"expert": "experts", "router": "routers", "full": "full"}.get(self._phase)
        return per_group.get(active, value)

    # ---------------------------------------------------------------------------------------------------- phases
    def phase_of_epoch(self, epoch: int) -> str:
        """The phase an epoch (0-based) runs: expert, router or full."""
        schedule = self.args.rasa_schedule
        if schedule == "full":
            return "full"
        if schedule == "expert_only":
            return "expert"
        if schedule == "router_only":
            return "router"
        return "expert" if epoch % 2 == 0 else "router"

    def _on_train_begin(self) -> None:
        if self._initial_routing is None and self.args.rasa_schedule != "full":
            # indices only: the run-start routing feeds the routing-shift metric and is never replayed
            self._initial_routing = self._resumed.pop("initial_routing", None) or self._record_routing(
                "initial routing", keep_weights=False)

    def _begin_phase(self, epoch: int) -> None:
        phase = self.phase_of_epoch(epoch)
        self._phase, self._phase_epoch = phase, epoch
        active = {"expert": "experts", "router": "routers", "full": "full"}[phase]
        for name, params in self._groups.items():
            for p in params:
                p.requires_grad_(name == active)
        if phase == "expert":
            resumed = self._resumed.pop("routing_cache", None)
            if resumed is not None and resumed[0] == epoch:
                self._routing_cache = resumed[1]
            else:
                # the weights are only replayed in "cached" mode; "recompute" takes them from the live routers
                self._routing_cache = self._record_routing(
                    f"routing of epoch {epoch}", keep_weights=self.args.replay_weights == "cached", retain=True)
            self._check_selected_experts_reached(self._routing_cache)
            # all real tokens of the training pairs (the cache's first rows; retain rows follow), now vs at the start
            # of the run (logged once per expert phase)
            pair_tokens = self._initial_routing.indices.shape[0]
            shift = assignment_shift(self._routing_cache.indices[:pair_tokens], self._initial_routing.indices)
            self._metrics["train"]["routing_shift_phase_start"] = [float(shift)]
        logger.info("RASA: epoch %d runs the %s phase", epoch, phase)

    def _check_selected_experts_reached(self, cache: RoutingCache) -> None:
        """Count the training tokens the phase-start routing sends to each selected expert: warn about experts that
        receive none (they cannot learn), fail when none receives any (the phase would train nothing)."""
        indices = cache.indices
        unreached, counts = [], {}
        for moe_layer, experts in self.selection.by_moe_layer().items():
            per_expert = torch.bincount(indices[:, moe_layer].reshape(-1).long(), minlength=max(experts) + 1)
            for e in experts:
                counts[(moe_layer, e)] = int(per_expert[e])
                if per_expert[e] == 0:
                    unreached.append((moe_layer, e))
        if len(unreached) == len(counts):
            raise ValueError(
                f"no training token is routed to any of the {len(counts)} selected experts, so the expert phase would "
                f"train nothing: the selection does not fit this model or data (was it detected on another "
                f"checkpoint?). Detect the experts on this model and these pairs."
            )
        if unreached:
            shown = ", ".join(f"(MoE layer {l}, expert {e})" for l, e in unreached[:20])
            logger.warning(
                "RASA: %d of %d selected experts receive no training token and will not learn: %s",
                len(unreached), len(counts), shown,
            )

    def _record_routing(self, what: str, keep_weights: bool, retain: bool = False) -> RoutingCache:
        """The routing of every training example under the current model (eval mode, no gradients); with ``retain``
        the retain rows follow the pairs (cache row ``len(train_dataset) + i`` is retain row ``i``)."""
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            batches = self._ordered_batches(retain)
            cache = RoutingCache.record(model, batches, device=self.args.replay_cache_device, keep_weights=keep_weights)
        finally:
            model.train(was_training)
        logger.info("RASA: recorded %s for %d examples (%d B per token)", what, cache.num_examples, cache.nbytes_per_token())
        return cache

    def _ordered_batches(self, retain: bool = False):
        dataset = self.train_dataset
        size = max(1, self.args.per_device_train_batch_size)
        base = self.data_collator.base
        for start in range(0, len(dataset), size):
            rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            batch = base([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
            yield {k: v.to(self.args.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        examples = self._retain_examples if retain else None
        for start in range(0, len(examples or []), size):
            batch = base([dict(r) for r in examples[start:start + size]])
            yield {k: v.to(self.args.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def _positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Positions in the prepared training set (and routing caches) of the given contract rows; TRL may have
        dropped rows, so the two differ."""
        if getattr(self, "_row_positions", None) is None:
            self._row_positions = {int(r): i for i, r in enumerate(self.train_dataset["rasa_index"])}
        return torch.tensor([self._row_positions[int(r)] for r in rows.tolist()], dtype=torch.long)

    def _before_optimizer_step(self) -> None:
        active = {"expert": "experts", "router": "routers", "full": "full"}[self._phase]
        for name, params in self._groups.items():
            if name != active:
                for p in params:
                    p.grad = None  # DDP may hand back zero gradients; None keeps AdamW from touching the group

    def _clip_grad_norm(self, model):
        self._log_group_grad_norms()  # before Trainer clips
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # max_grad_norm <= 0: nothing was clipped, and _clip_grad_norm did not run
            self._log_group_grad_norms()
        return super()._get_grad_norm(model, grad_norm)

    def _log_group_grad_norms(self) -> None:
        """``grad_norm_<group>``: the gradient norm of the group the phase trains, before clipping (Trainer's
        ``grad_norm`` is the norm of all gradients, also before clipping). Not available under DeepSpeed, which keeps
        the gradients inside its engine."""
        if self._phase is None or self.is_deepspeed_enabled:
            return
        active = {"expert": "experts", "router": "routers", "full": "full"}[self._phase]
        grads = [p.grad for p in self._groups.get(active, []) if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2)
            norm = norm.full_tensor()
        self._metrics["train"][f"grad_norm_{active}"].append(float(norm))

    # ---------------------------------------------------------------------------------------------------- losses
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor_ids = inputs.pop("anchor_input_ids", None)
        anchor_mask = inputs.pop("anchor_attention_mask", None)
        rows = inputs.pop("rasa_index", None)
        context = inputs.pop("rasa_context_mask", None)
        retain = inputs.pop("rasa_retain_index", None)
        if not model.training or self._phase is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # the phase of the last step of a logging window (a list of one value, which Trainer's averaging keeps as is)
        self._metrics["train"]["phase"] = [PHASE_CODES[self._phase]]
        if self._phase == "router":
            if context is None:  # batches built without the RASA collator
                context = (inputs["labels"] == -100) & inputs["attention_mask"].bool()
            return self._router_loss(model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch, context=context)
        # the expert phase's routing replay is active around the whole training step (see training_step)
        if retain is not None and rows is not None:
            # retain rows follow the pairs in the batch: the loss is SFT's over all completion tokens, logged per part
            with _captured_outputs(model) as captured:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._log_split_losses(captured, num_pairs=len(rows))
            return loss
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if isinstance(loss, tuple) else loss
        self._metrics["train"]["completion_loss"].append(value.detach().item())
        return loss

    def _log_split_losses(self, captured: list, num_pairs: int) -> None:
        """``completion_loss`` (the pairs) and ``retain_loss`` (the retain rows): the mean cross-entropy over each
        part's completion tokens in this micro-batch."""
        if not captured or getattr(captured[0], "log_probs", None) is None:
            return  # a forward that gives no per-token log-probabilities (e.g. a custom compute_loss_func)
        out = captured[0]
        log_probs, mask = out.log_probs.detach(), out.label_mask.detach()
        for key, part in (("completion_loss", slice(0, num_pairs)), ("retain_loss", slice(num_pairs, None))):
            tokens = mask[part].sum()
            if tokens > 0:
                self._metrics["train"][key].append(float(-(log_probs[part] * mask[part]).sum() / tokens))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._phase != "expert":
            return super().training_step(model, inputs, num_items_in_batch)
        # Replay stays active through backward: gradient checkpointing recomputes the layers there, and the recompute
        # must see the replayed routing too.
        positions = self._positions(inputs["rasa_index"])
        if "rasa_retain_index" in inputs:  # retain rows follow the pairs, in the batch and in the routing cache
            positions = torch.cat([positions, len(self.train_dataset) + inputs["rasa_retain_index"].cpu()])
        routing = self._routing_cache.batch_routing(positions, inputs["attention_mask"])
        with replay_routing(model, routing, weights=self.args.replay_weights):
            return super().training_step(model, inputs, num_items_in_batch)

    def _router_loss(self, model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch, context=None):
        """The router-consistency loss of one micro-batch: KL(anchor || adversarial) (``kl_direction``) of the router
        probability over experts, averaged over the MoE layers.

        ``router_loss="pooled"`` (the authors'): token-mean probabilities over all anchor tokens and all prompt
        tokens of the micro-batch, one KL per micro-batch and process. ``"per_pair"``: token-mean probabilities per
        example, one KL per (adversarial, anchor) pair, averaged over the pairs of the whole optimiser step (every
        micro-batch and process), so the objective does not depend on how the pairs are batched.
        """
        if anchor_ids is None:
            raise ValueError("the router phase needs anchor contexts; the batch has no anchor_input_ids")
        if context is None:
            context = inputs["rasa_context_mask"] if "rasa_context_mask" in inputs else (
                (inputs["labels"] == -100) & inputs["attention_mask"].bool())
        context = context.bool() & inputs["attention_mask"].bool()
        with torch.no_grad(), record_routing(model, probabilities=True) as anchor_rec:
            model(input_ids=anchor_ids, attention_mask=anchor_mask, use_cache=False, logits_to_keep=1)
        with record_routing(model, probabilities=True, detach=False) as adv_rec:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                            logits_to_keep=1)
        anchor, adversarial = anchor_rec.routing(), adv_rec.routing()
        per_pair = self.args.router_loss == "per_pair"
        terms = []
        for p_anchor_tokens, p_adv_tokens in zip(anchor.probabilities, adversarial.probabilities):
            if per_pair:
                p_anchor = _per_pair_mean(p_anchor_tokens, anchor_mask.bool())  # [B, E]
                p_adv = _per_pair_mean(p_adv_tokens, context)
                terms.append(self._kl_term(p_anchor, p_adv))  # [B]
            else:
                p_anchor = _masked_mean(p_anchor_tokens, anchor_mask.bool())
                p_adv = _masked_mean(p_adv_tokens, context)
                terms.append(self._kl_term(p_anchor, p_adv))
        kl = torch.stack(terms).mean(dim=0)  # mean over MoE layers: a scalar (pooled) or one value per pair
        # a zero-valued path through the model's output: FSDP2 re-gathers a unit's parameters for backward from its
        # output's gradient hooks, and the router terms alone leave the last units without one
        kl = kl + 0.0 * outputs.logits.float().sum()
        self._metrics["train"]["router_kl"].append(kl.detach().mean().item())
        if self._initial_routing is not None and rows is not None:
            # prompt tokens of this batch, now vs at the start of the run
            start = self._initial_routing.batch_routing(self._positions(rows), inputs["attention_mask"])
            flat = context.reshape(-1).cpu()
            shift = assignment_shift(adversarial.stacked_indices().cpu()[flat], start.stacked_indices()[flat])
            self._metrics["train"]["routing_shift_prompt"].append(float(shift))
        trainer_divides = not self._loss_scaled_for_accumulation(num_items_in_batch)
        if per_pair:
            if not (self.is_in_train and self._pairs_in_step):
                return kl.mean()  # outside Trainer's loop: the mean over this batch's pairs
            # sum over this micro-batch's pairs / pairs of the whole step on every process; DDP averages gradients
            # over processes, hence the factor; Trainer's own division by the accumulation steps is undone
            loss = kl.sum() * self.accelerator.num_processes / self._pairs_in_step
            return loss * self.current_gradient_accumulation_steps if trainer_divides else loss
        # a micro-batch mean: averaged over the accumulation steps (by Trainer, or here when Trainer leaves it to
        # the loss); DDP averages the processes' gradients
        return kl if trainer_divides else kl / self.current_gradient_accumulation_steps

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether Trainer.training_step takes the loss as already averaged over the accumulation steps (the rule it
        applies: ``loss_is_scaled_for_ga``, else a loss normalised by ``num_items_in_batch``)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

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
        return batch_samples, num_items_in_batch

    def _with_retain_rows(self, batch: dict, micro_step: int) -> dict:
        """The expert-phase micro-batch with its retain rows appended. They follow from the seed and the position of
        the micro-batch in the run's expert-phase pair stream (expert epochs so far, step in the epoch, micro-batch
        of the accumulation, process), so a resumed run sees the same rows as an uninterrupted one."""
        from .retain import append_rows, retain_slots

        args = self.args
        steps_per_epoch = max(1, self.state.max_steps // max(1, int(args.num_train_epochs)))
        expert_epochs_before = sum(self.phase_of_epoch(e) == "expert" for e in range(self._phase_epoch))
        step_in_epoch = self.state.global_step - self._phase_epoch * steps_per_epoch
        micro = (expert_epochs_before * steps_per_epoch + step_in_epoch) * args.gradient_accumulation_steps + micro_step
        micro = micro * self.accelerator.num_processes + self.accelerator.process_index
        num_pairs = int(batch["input_ids"].shape[0])
        rows = retain_slots(micro * args.per_device_train_batch_size, num_pairs, args.retain_ratio,
                            len(self._retain_examples), args.seed)
        if not rows:
            return batch
        extra = self.data_collator.base([dict(self._retain_examples[i]) for i in rows])
        return append_rows(batch, extra, rows, self._tokenizer.pad_token_id)

    # ---------------------------------------------------------------------------------------------------- retain
    def _check_retain_lengths(self) -> None:
        """Refuse retain rows whose completion (or, without one, whose prompt) would be cut by truncation."""
        if self.args.max_length is None:
            return
        too_long = []
        for i, row in enumerate(self._retain):
            messages = as_messages(row["prompt"])
            if row["completion"] is not None:
                n = len(_chat_ids(self._tokenizer, messages + [{"role": "assistant", "content": completion_text(
                    row["completion"], None)}], generation_prompt=False))
            else:
                n = len(_chat_ids(self._tokenizer, messages, generation_prompt=True)) + 1
            if n > self.args.max_length:
                too_long.append(f"row {i} ({n} tokens)")
        if too_long:
            raise ValueError(
                f"{len(too_long)} row(s) of retain_dataset exceed max_length={self.args.max_length} with their "
                f"completion (or leave no room for a generated one), so truncation would cut the reply to keep: "
                f"{', '.join(too_long[:5])}. Raise max_length or shorten those rows."
            )

    def _prepare_retain(self) -> None:
        """Generate the missing retain completions with the model as it is before training (greedy, batched, once)
        and tokenise the retain rows as TRL tokenises the pairs."""
        if self._retain is None or self._retain_examples is not None:
            return
        from .retain import generate_completions

        rows = self._retain
        missing = [i for i, row in enumerate(rows) if row["completion"] is None]
        texts = {i: completion_text(row["completion"], None) for i, row in enumerate(rows) if row["completion"] is not None}
        if missing:
            if self.place_model_on_device and not getattr(self, "is_model_parallel", False):
                self._move_model_to_device(self.model, self.args.device)
            logger.info("RASA: generating the base model's replies to %d retain prompts", len(missing))
            replies = generate_completions(
                unwrap_model(self.model), self._tokenizer, [as_messages(rows[i]["prompt"]) for i in missing],
                batch_size=self.args.retain_batch_size, max_new_tokens=self.args.retain_max_new_tokens)
            empty = [i for i, reply in zip(missing, replies) if not reply.strip()]
            if empty:
                raise ValueError(
                    f"the base model's reply to {len(empty)} retain prompt(s) is empty (rows {empty[:10]}), so there "
                    f"is nothing to retain; give those rows a completion or drop them")
            texts.update(zip(missing, replies))
        dataset = Dataset.from_list([
            {"prompt": as_messages(row["prompt"]), "completion": [{"role": "assistant", "content": texts[i]}]}
            for i, row in enumerate(rows)
        ])
        prepared = self._prepare_dataset(dataset, self.processing_class, self.args, False, None, "retain")
        if len(prepared) != len(rows):
            raise ValueError(f"{len(rows) - len(prepared)} retain row(s) have no completion token left after "
                             f"tokenisation; check their completions and max_length")
        self._retain_examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared]

    def _kl_term(self, p_anchor: torch.Tensor, p_adv: torch.Tensor) -> torch.Tensor:
        direction = self.args.kl_direction
        if direction == "forward":
            return _kl(p_anchor, p_adv)
        if direction == "reverse":
            return _kl(p_adv, p_anchor)
        return 0.5 * (_kl(p_anchor, p_adv) + _kl(p_adv, p_anchor))

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


def _validated_retain(retain_dataset, args: RASAConfig) -> list[dict] | None:
    """The retain rows, checked (errors name row and column), or None when no retain data is used."""
    if retain_dataset is None:
        return None
    from .retain import retain_rows

    rows = retain_rows(retain_dataset)
    if args.retain_ratio == 0:
        logger.warning("RASA: retain_dataset is ignored with retain_ratio=0")
        return None
    if args.rasa_schedule not in ("alternate", "expert_only"):
        logger.warning("RASA: retain_dataset is ignored with rasa_schedule=%r (retain rows join expert-phase batches "
                       "only)", args.rasa_schedule)
        return None
    return rows


@contextlib.contextmanager
def _captured_outputs(model):
    """The outputs of the (unwrapped) model's forward calls inside the block."""
    captured: list = []
    handle = unwrap_model(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


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


def _register_zero3_leaf_modules(model: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3 make every MoE block a leaf module: ranks route tokens to different experts, and
    per-expert parameter fetching would otherwise hang (deepspeedai/DeepSpeed#7461)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    from deepspeed.utils import set_z3_leaf_modules

    modules = dict(model.named_modules())
    blocks = {type(modules[layer.router_name.rpartition(".")[0]]) for layer in moe_layers(model)}
    set_z3_leaf_modules(model, sorted(blocks, key=lambda c: c.__name__))


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


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool, chat_template: str | None = None) -> list[int]:
    return render_chat(tokenizer, messages, add_generation_prompt=generation_prompt, tokenize=True,
                       chat_template=chat_template)
