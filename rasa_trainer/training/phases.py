"""The phase controller: the phase each epoch runs, switching the trainable group at its start, recording the routing
the expert phase replays (and the run-start routing the shift metrics compare with), replaying it around each
expert-phase training step, and keeping the inactive group out of the optimiser step.

:class:`PhaseController` is the ``TrainerCallback`` Trainer drives (train begin and end, epoch begin, before the
optimiser step). It owns the phase and drives the parameter groups (``param_groups.py``) and the routing records
(``routing_replay.py``) it is given; the model and the metrics come in as explicit arguments.
The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .param_groups import ParameterGroups
from .routing_replay import RoutingReplay
from .schedule import ACTIVE_GROUP, PHASE_CODES, expert_epochs_before, phase_of_epoch

logger = logging.getLogger(__name__)

__all__ = ["ACTIVE_GROUP", "PHASE_CODES", "PhaseController", "check_selected_experts_reached"]


def check_selected_experts_reached(experts_by_layer: dict[int, list[int]], indices: torch.Tensor,
                                   sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Count the training tokens a routing (``indices [tokens, MoE layers, top-k]``) sends to each selected expert:
    warn about experts that receive none (they cannot learn), fail when none receives any (the phase would train
    nothing). With ``sum_over_processes`` each process counts its share of the tokens and the counts are summed (every
    process then decides on all tokens)."""
    selected = [(moe_layer, e) for moe_layer, experts in experts_by_layer.items() for e in experts]
    counts = torch.cat([
        torch.bincount(indices[:, moe_layer].reshape(-1).long(), minlength=max(experts) + 1)[experts]
        for moe_layer, experts in experts_by_layer.items()]) if selected else torch.zeros(0, dtype=torch.long)
    if sum_over_processes is not None:
        counts = sum_over_processes(counts)
    unreached = [key for key, count in zip(selected, counts.tolist()) if count == 0]
    if len(unreached) == len(selected):
        raise ValueError(
            f"no training token is routed to any of the {len(selected)} selected experts, so the expert phase would "
            f"train nothing: the selection does not fit this model or data (was it detected on another "
            f"checkpoint?). Detect the experts on this model and these pairs."
        )
    if unreached:
        shown = ", ".join(f"(MoE layer {l}, expert {e})" for l, e in unreached[:20])
        logger.warning(
            "RASA: %d of %d selected experts receive no training token and will not learn: %s",
            len(unreached), len(selected), shown,
        )


class PhaseController(TrainerCallback):
    """Runs the phases of ``schedule`` over the epochs.

    ``groups``: the trainable groups it switches; ``routing``: the routing records it fills and replays; ``model``:
    returns the model being trained (the trainer's current one); ``metrics``: where the phase-start routing shift is
    logged (TRL's train metrics); ``resumed``: the resume state a checkpoint load leaves (``initial_routing``, and
    ``routing_cache`` as ``(epoch, cache)``), each entry consumed once; ``on_train_end``: what runs when training
    ends; ``wrapped_model``: returns the model as the engine wrapped it (under DDP, the ``DistributedDataParallel``
    whose gradient reduction is limited to the active group at train begin).
    """

    def __init__(self, schedule: str, groups: ParameterGroups, routing: RoutingReplay, *,
                 model: Callable[[], nn.Module], metrics: MutableMapping[str, list],
                 resumed: dict[str, Any] | None = None, on_train_end: Callable[[], None] | None = None,
                 wrapped_model: Callable[[], nn.Module] | None = None):
        self.schedule = schedule
        self.groups, self.routing = groups, routing
        self._model, self._metrics = model, metrics
        self._wrapped_model = wrapped_model
        self._resumed = resumed if resumed is not None else {}
        self._on_train_end = on_train_end
        self.experts_by_layer: dict[int, list[int]] | None = None
        self.phase: str | None = None
        self.epoch: int | None = None
        # routing-robust repair (routing_augmentation.RoutingAugmentation): perturbs a share of the replayed routing
        self.augmentation: Callable[..., Any] | None = None

    # ------------------------------------------------------------------------------------------ the schedule
    def phase_of_epoch(self, epoch: int) -> str:
        """The phase an epoch (0-based) runs: expert, router or full."""
        return phase_of_epoch(self.schedule, epoch)

    @property
    def active_group(self) -> str | None:
        """The parameter group the current phase trains (``None`` outside the phases)."""
        return ACTIVE_GROUP.get(self.phase)

    @property
    def phase_code(self) -> int:
        """The current phase as logged (``phase``)."""
        return PHASE_CODES[self.phase]

    def expert_epochs_before(self) -> int:
        """How many epochs before the current one ran the expert phase."""
        return expert_epochs_before(self.schedule, self.epoch)

    def expect_experts(self, experts_by_layer: dict[int, list[int]] | None) -> None:
        """The selected experts (MoE layer -> experts) each expert phase's routing must reach."""
        self.experts_by_layer = experts_by_layer

    def set_phase(self, phase: str | None, epoch: int | None = None) -> None:
        """Enter ``phase`` without the work of a phase start (no group switch, no routing record): for driving a
        step by hand outside ``train()``; ``None`` leaves the phases."""
        self.phase, self.epoch = phase, epoch

    # ------------------------------------------------------------------------------------------ Trainer's events
    def on_train_begin(self, args, state, control, **kwargs):
        if self._wrapped_model is not None:
            # DDP all-reduces only the gradients of the group the phase trains (a no-op outside DDP)
            self.groups.reduce_only_active(self._wrapped_model())
        if self.schedule != "full" and self.routing.initial is None:
            self.routing.start_run(self._model(), resumed=self._resumed.pop("initial_routing", None))

    def on_train_end(self, args, state, control, **kwargs):
        if self._on_train_end is not None:
            self._on_train_end()

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional when resuming mid-epoch; the tolerance absorbs float sums like 0.999999
        self.begin_phase(math.floor(state.epoch + 1e-6))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.groups.drop_gradients_except(ACTIVE_GROUP[self.phase])

    # ------------------------------------------------------------------------------------------ phase work
    def begin_phase(self, epoch: int) -> None:
        """Enter the phase of ``epoch``: only its group trainable; an expert phase records (or resumes) the routing
        it replays, checks it reaches the selected experts and logs its shift from the run-start routing."""
        phase = self.phase_of_epoch(epoch)
        self.phase, self.epoch = phase, epoch
        self.groups.activate(ACTIVE_GROUP[phase])
        if phase == "expert":
            self.routing.start_expert_phase(self._model(), epoch, resumed=self._resumed.pop("routing_cache", None))
            # each process counts its share of the cache's tokens; the counts are summed over the processes
            indices = self.routing.cache.indices
            check_selected_experts_reached(self.experts_by_layer, indices[self.routing.own_tokens(indices.shape[0])],
                                           sum_over_processes=self.routing.sum_over_processes)
            # all real tokens of the training pairs, now vs at the start of the run (logged once per expert phase)
            self._metrics["routing_shift_phase_start"] = [self.routing.phase_start_shift()]
        logger.info("RASA: epoch %d runs the %s phase", epoch, phase)

    def replay(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        """Around an expert-phase training step (forward and backward: gradient checkpointing recomputes the layers
        in backward, and the recompute must see the replayed routing too) the phase-start routing of the batch is
        replayed; other phases replay nothing."""
        if self.phase != "expert":
            return contextlib.nullcontext()
        augmentation, epoch = self.augmentation, self.epoch or 0
        if augmentation is None or not augmentation.active:
            return self.routing.replay(model, inputs)
        return self.routing.replay(model, inputs, augment=lambda routing, batch, rows: augmentation(
            routing, batch, rows, epoch))
