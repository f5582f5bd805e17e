"""RASATrainer: a drop-in replacement for TRL's SFTTrainer that runs Routing-Aware Safety Alignment.

Epochs alternate between two phases (see ``METHOD.md``):

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
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback
from trl import SFTTrainer

from .config import RASAConfig
from .data import as_messages, completion_text, validate_pairs
from .model_card import render_model_card
from .moe import moe_layers, unwrap_model
from .repairs import attach_repairs, merged_state_dict, repair_modules
from .replay_cache import RoutingCache, assignment_shift
from .routing import record_routing, replay_routing
from .utils import atomic_save_safetensors, atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

PHASE_CODES = {"full": 0, "expert": 1, "router": 2}
SELECTION_FILE = "safety_critical_experts.json"


class RASAPhaseCallback(TrainerCallback):
    """Switches phases at epoch boundaries and keeps inactive groups out of the optimiser step."""

    def __init__(self, trainer: "RASATrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._restore_router_logits_setting()

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
    eps = 1e-12
    return (p * ((p + eps).log() - (q + eps).log())).sum()


class RASATrainer(SFTTrainer):
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
                 **kwargs):
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
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        validate_pairs(train_dataset, anchor_column=args.anchor_column)
        if eval_dataset is not None:
            validate_pairs(eval_dataset, anchor_column=args.anchor_column)
        self._pairs = train_dataset
        self._phase: str | None = None
        self._phase_epoch: int | None = None
        self._routing_cache: RoutingCache | None = None
        self._initial_routing: RoutingCache | None = None
        self._resumed: dict[str, Any] = {}
        self._groups: dict[str, list[nn.Parameter]] = {}
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
        if args.rasa_schedule != "full":
            self._disable_aux_loss()
        self.selection = self._resolve_selection(safety_critical_experts)
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
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    @staticmethod
    def _check_lengths(dataset, tokenizer, args, dataset_name: str) -> None:
        """Refuse rows whose refusal target would be cut off by truncation (a pitfall of the reference code)."""
        if args.max_length is None:
            return
        too_long = []
        for i, row in enumerate(dataset):
            n = len(_chat_ids(tokenizer, row["prompt"] + row["completion"], generation_prompt=False))
            if n > args.max_length:
                too_long.append((i, n))
        if too_long:
            shown = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:5])
            raise ValueError(
                f"{len(too_long)} row(s) of {dataset_name} exceed max_length={args.max_length} with their completion, "
                f"so truncation would cut the refusal target: {shown}. Raise max_length or shorten those rows."
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in ("anchor_input_ids", "rasa_index"):
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
        if self.args.rasa_schedule not in ("alternate", "expert_only"):
            if selection is not None:
                logger.warning("safety_critical_experts is ignored with rasa_schedule=%r", self.args.rasa_schedule)
            return None
        from .selection import SafetyCriticalExperts

        if selection is None:
            selection = self._detect()
        elif isinstance(selection, (str, os.PathLike)):
            selection = SafetyCriticalExperts.load(selection)
        if not isinstance(selection, SafetyCriticalExperts):
            raise TypeError(
                f"safety_critical_experts must be a SafetyCriticalExperts or a path to its JSON, got {type(selection).__name__}"
            )
        selection.validate(unwrap_model(self.model))
        logger.info("RASA: repairing %d Safety-Critical Experts: %s", len(selection), selection.by_moe_layer())
        return selection

    def _detect(self):
        from .detection import detect_safety_critical_experts
        from .judges import judge_from_name

        args = self.args
        logger.info("RASA: no safety_critical_experts given; detecting them on the training pairs")
        return detect_safety_critical_experts(
            unwrap_model(self.model), self._tokenizer, self._pairs,
            judge=judge_from_name(args.detection_judge), anchor_column=args.anchor_column,
            batch_size=args.detection_batch_size, max_new_tokens=args.detection_max_new_tokens, seed=args.seed,
            do_sample=args.detection_do_sample, temperature=args.detection_temperature,
            policy=args.sce_policy, num_experts=args.sce_num_experts, threshold=args.sce_threshold,
            top_p_experts=args.sce_top_p,
            output_dir=args.output_dir if self.is_world_process_zero() else None,
        )

    def _setup_parameter_groups(self) -> None:
        schedule, model = self.args.rasa_schedule, self.model
        if schedule == "full":
            self._groups["full"] = [p for p in model.parameters() if p.requires_grad]
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
            self._groups["routers"] = _fp32_routers(model)
        _register_zero3_leaf_modules(model)
        for params in self._groups.values():
            for p in params:
                p.requires_grad_(True)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            optimizer_kwargs.pop("lr", None)
            lrs = {"experts": self.args.expert_learning_rate, "routers": self.args.router_learning_rate,
                   "full": self.args.expert_learning_rate}
            groups = [
                {"params": params, "lr": lrs[name], "weight_decay": self.args.weight_decay, "name": name}
                for name, params in self._groups.items()
            ]
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

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
                    f"routing of epoch {epoch}", keep_weights=self.args.replay_weights == "cached")
            shift = assignment_shift(self._routing_cache.indices, self._initial_routing.indices)
            self._metrics["train"]["routing_shift"].append(float(shift))
        logger.info("RASA: epoch %d runs the %s phase", epoch, phase)

    def _record_routing(self, what: str, keep_weights: bool) -> RoutingCache:
        """The routing of every training example under the current model (eval mode, no gradients)."""
        model, was_training = self.model, self.model.training
        model.eval()
        try:
            batches = self._ordered_batches()
            cache = RoutingCache.record(model, batches, device=self.args.replay_cache_device, keep_weights=keep_weights)
        finally:
            model.train(was_training)
        logger.info("RASA: recorded %s for %d examples (%d B per token)", what, cache.num_examples, cache.nbytes_per_token())
        return cache

    def _ordered_batches(self):
        dataset = self.train_dataset
        size = max(1, self.args.per_device_train_batch_size)
        base = self.data_collator.base
        for start in range(0, len(dataset), size):
            rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            batch = base([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
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
            else:
                grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
                norm = torch.stack(grads).norm().item() if grads else 0.0
                self._metrics["train"][f"grad_norm_{name}"].append(norm)

    # ---------------------------------------------------------------------------------------------------- losses
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor_ids = inputs.pop("anchor_input_ids", None)
        anchor_mask = inputs.pop("anchor_attention_mask", None)
        rows = inputs.pop("rasa_index", None)
        if not model.training or self._phase is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._metrics["train"]["phase"].append(PHASE_CODES[self._phase])
        if self._phase == "router":
            return self._router_loss(model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch)
        # the expert phase's routing replay is active around the whole training step (see training_step)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if isinstance(loss, tuple) else loss
        self._metrics["train"]["completion_loss"].append(value.detach().item())
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._phase != "expert":
            return super().training_step(model, inputs, num_items_in_batch)
        # Replay stays active through backward: gradient checkpointing recomputes the layers there, and the recompute
        # must see the replayed routing too.
        positions = self._positions(inputs["rasa_index"])
        routing = self._routing_cache.batch_routing(positions, inputs["attention_mask"])
        with replay_routing(model, routing, weights=self.args.replay_weights):
            return super().training_step(model, inputs, num_items_in_batch)

    def _router_loss(self, model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch):
        """Mean over MoE layers of KL(anchor || adversarial) of token-mean router probabilities (padding excluded)."""
        if anchor_ids is None:
            raise ValueError("the router phase needs anchor contexts; the batch has no anchor_input_ids")
        context = (inputs["labels"] == -100) & inputs["attention_mask"].bool()
        with torch.no_grad(), record_routing(model, probabilities=True) as anchor_rec:
            model(input_ids=anchor_ids, attention_mask=anchor_mask, use_cache=False, logits_to_keep=1)
        with record_routing(model, probabilities=True, detach=False) as adv_rec:
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False, logits_to_keep=1)
        anchor, adversarial = anchor_rec.routing(), adv_rec.routing()
        terms = []
        for p_anchor_tokens, p_adv_tokens in zip(anchor.probabilities, adversarial.probabilities):
            p_anchor = _masked_mean(p_anchor_tokens, anchor_mask.bool())
            p_adv = _masked_mean(p_adv_tokens, context)
            terms.append(self._kl_term(p_anchor, p_adv))
        kl = torch.stack(terms).mean()
        self._metrics["train"]["router_kl"].append(kl.detach().item())
        if self._initial_routing is not None and rows is not None:
            start = self._initial_routing.batch_routing(self._positions(rows), inputs["attention_mask"])
            flat = context.reshape(-1).cpu()
            shift = assignment_shift(adversarial.stacked_indices().cpu()[flat], start.stacked_indices()[flat])
            self._metrics["train"]["routing_shift"].append(float(shift))
        # Trainer leaves gradient accumulation to losses normalised by num_items_in_batch; this one is a batch mean
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        return kl / steps

    def _kl_term(self, p_anchor: torch.Tensor, p_adv: torch.Tensor) -> torch.Tensor:
        direction = self.args.kl_direction
        if direction == "forward":
            return _kl(p_anchor, p_adv)
        if direction == "reverse":
            return _kl(p_adv, p_anchor)
        return 0.5 * (_kl(p_anchor, p_adv) + _kl(p_adv, p_anchor))

    # ---------------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._save_rasa_state(folder)

    def _save_rasa_state(self, folder: str) -> None:
        """Everything a resumed run needs that the Trainer's own checkpoint does not restore exactly."""
        named = {id(p): n for n, p in unwrap_model(self.model).named_parameters()}
        trainable = {named[id(p)]: p for params in self._groups.values() for p in params}
        atomic_save_safetensors(trainable, os.path.join(folder, "rasa_trainable.safetensors"))
        if self._routing_cache is not None and self._phase == "expert":
            self._routing_cache.save(os.path.join(folder, "rasa_routing_cache.safetensors"), {"epoch": str(self._phase_epoch)})
        if self._initial_routing is not None:
            self._initial_routing.save(os.path.join(folder, "rasa_initial_routing.safetensors"))
        if self.selection is not None:
            atomic_write_json(self.selection.to_dict(), os.path.join(folder, SELECTION_FILE))
        atomic_write_json({"phase": self._phase, "epoch": self._phase_epoch, "schedule": self.args.rasa_schedule},
                          os.path.join(folder, "rasa_state.json"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(resume_from_checkpoint, "rasa_trainable.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} is not a RASATrainer checkpoint (no rasa_trainable.safetensors)")
        self._check_resumed_selection(resume_from_checkpoint)
        # transformers loads the checkpoint non-strictly and cannot map the per-expert keys save_pretrained writes
        # back onto fused expert tensors; the trainable parameters are restored exactly from our own file below
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = load_file(path)
        params = dict(unwrap_model(model or self.model).named_parameters())
        missing = sorted(set(params_of_groups(self, params)) - set(saved))
        if missing:
            raise ValueError(f"checkpoint {resume_from_checkpoint} lacks trainable parameters {missing[:5]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        cache_path = os.path.join(resume_from_checkpoint, "rasa_routing_cache.safetensors")
        if os.path.isfile(cache_path):
            from safetensors import safe_open

            with safe_open(cache_path, "pt") as f:
                epoch = int(f.metadata()["epoch"])
            self._resumed["routing_cache"] = (epoch, RoutingCache.load(cache_path))
        initial = os.path.join(resume_from_checkpoint, "rasa_initial_routing.safetensors")
        if os.path.isfile(initial):
            self._resumed["initial_routing"] = RoutingCache.load(initial)

    def _check_resumed_selection(self, folder: str) -> None:
        from .selection import SafetyCriticalExperts

        path = os.path.join(folder, SELECTION_FILE)
        if self.selection is None or not os.path.isfile(path):
            return
        if SafetyCriticalExperts.load(path).by_moe_layer() != self.selection.by_moe_layer():
            raise ValueError(
                f"the checkpoint {folder} was trained with another selection of experts; resume with "
                f"safety_critical_experts={path!r}"
            )

    # ---------------------------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if _internal_call or self.args.rasa_schedule == "full":
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        model = unwrap_model(self.model)
        # sharded weights (FSDP, ZeRO-3) are gathered by accelerate, a collective that every rank enters
        state = self.accelerator.get_state_dict(self.model_wrapped) if (self.is_fsdp_enabled or self.is_deepspeed_enabled) else None
        if not self.args.should_save:
            return
        state = state if state is not None else model.state_dict()
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=merged_state_dict(model, state, dtype_of_routers=self._model_dtype))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.selection is not None:
            atomic_write_json(self.selection.to_dict(), os.path.join(output_dir, SELECTION_FILE))
        if self.args.expert_tuning == "lora" and repair_modules(model):
            self._save_adapter(os.path.join(output_dir, "rasa_adapter"), state)
        self.create_model_card(model_name=os.path.basename(os.path.abspath(output_dir)), output_dir=output_dir)

    def _save_adapter(self, folder: str, state: dict[str, torch.Tensor]) -> None:
        """The LoRA factors of the selected experts and the trained router weights alone."""
        model = unwrap_model(self.model)
        tensors = {}
        for layer, _ in repair_modules(model):
            prefix = f"{layer.experts_name}.rasa_repairs."
            tensors.update({f"moe_layers.{layer.index}.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
        for layer in moe_layers(model):
            for name, _ in layer.router.named_parameters():
                tensors[f"routers.{layer.index}.{name}"] = state[f"{layer.router_name}.{name}"].float()
        atomic_save_safetensors(tensors, os.path.join(folder, "rasa_adapter.safetensors"))
        atomic_write_json(
            {"mode": "lora", "rank": self.args.expert_lora_rank, "alpha": self.args.expert_lora_alpha,
             "base_model": getattr(model.config, "_name_or_path", None),
             "selection": {str(k): v for k, v in self.selection.by_moe_layer().items()}},
            os.path.join(folder, "rasa_adapter_config.json"),
        )

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


def params_of_groups(trainer: RASATrainer, named: dict[str, nn.Parameter]) -> list[str]:
    ids = {id(p) for params in trainer._groups.values() for p in params}
    return [n for n, p in named.items() if id(p) in ids]


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _fp32_routers(model: nn.Module) -> list[nn.Parameter]:
    """Router parameters as fp32 master weights (an update of 1e-6 vanishes in bf16).

    The routers compute in fp32 (their input is cast up) and hand the experts their top-k weights in the model's
    dtype, so the rest of the model runs unchanged.
    """
    params = []
    for layer in moe_layers(model):
        router = layer.router
        if any(not p.is_floating_point() or type(p).__name__ in ("Params4bit", "Int8Params") for p in router.parameters()):
            raise ValueError(
                f"the router {layer.router_name} is quantized ({type(router).__name__}); RASA trains routers, so keep "
                f"them in full precision, e.g. BitsAndBytesConfig(llm_int8_skip_modules=[\"{layer.router_name.rsplit('.', 1)[-1]}\", "
                f"\"lm_head\"])"
            )
        if any(p.dtype != torch.float32 for p in router.parameters()):
            router.float()
            router.register_forward_pre_hook(_cast_input_fp32)
            router.register_forward_hook(_cast_weights_back)
        params.extend(router.parameters())
    return params


def _cast_input_fp32(module, args):
    module._rasa_input_dtype = args[0].dtype
    return (args[0].float(), *args[1:])


def _cast_weights_back(module, args, output):
    first, weights, indices = output
    return first, weights.to(module._rasa_input_dtype), indices
