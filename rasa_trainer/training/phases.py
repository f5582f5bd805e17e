"""The two RASA phases over the epochs: which phase an epoch runs, switching the trainable group at its start,
recording the routing the expert phase replays (and the run-start routing the shift metric compares with), replaying
it around each expert-phase training step, and keeping the inactive group out of the optimiser step.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from ..moe.replay_cache import RoutingCache, assignment_shift
from ..moe.routing import replay_routing

if TYPE_CHECKING:
    from .trainer import RASATrainer

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

# the parameter group (see rasa_trainer/param_groups.py) each phase trains
ACTIVE_GROUP = {"expert": "experts", "router": "routers", "full": "full"}


class PhasesMixin:
    """RASATrainer's phase schedule, routing records and routing replay."""

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
        active = ACTIVE_GROUP[phase]
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

    def _before_optimizer_step(self) -> None:
        active = ACTIVE_GROUP[self._phase]
        for name, params in self._groups.items():
            if name != active:
                for p in params:
                    p.grad = None  # DDP may hand back zero gradients; None keeps AdamW from touching the group
