"""The routing records of a run and their replay: the run-start routing (indices only, for the routing-shift
metrics), the expert phase's :class:`~rasa_trainer.moe.replay_cache.RoutingCache` (recorded at the phase start, with
the retain rows after the pairs), where each contract row sits in the prepared training set (TRL may drop rows), and
the routing of a batch built from them.

:class:`RoutingReplay` holds no trainer: it is given the prepared rows, the collator and the devices, and the model
each time it records.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..moe.replay_cache import RoutingCache, assignment_shift
from ..moe.routing import Routing, replay_routing

logger = logging.getLogger(__name__)

_MODEL_INPUTS = ("input_ids", "attention_mask")


def row_positions(row_indices: Sequence[int]) -> dict[int, int]:
    """Contract row -> position in the prepared training set, from the prepared set's ``rasa_index`` column."""
    return {int(r): i for i, r in enumerate(row_indices)}


class RoutingReplay:
    """The routing caches of a run and the routing of a batch built from them.

    ``dataset``: the prepared training rows (``input_ids``, ``labels``, ``rasa_index``), in order; ``collate``: the
    collator that pads them (TRL's); ``batch_size``: the rows per recording forward; ``device``: where the model runs;
    ``cache_device``: where the caches live; ``replay_weights``: ``cached`` (replay the recorded top-k weights too)
    or ``recompute`` (take them from the live routers).
    """

    def __init__(self, dataset, collate: Callable[[list[dict]], dict], *, batch_size: int,
                 device: str | torch.device, cache_device: str | torch.device = "cpu",
                 replay_weights: str = "cached"):
        self._dataset, self._collate = dataset, collate
        self._batch_size = max(1, batch_size)
        self._device, self._cache_device = device, cache_device
        self.replay_weights = replay_weights
        self._retain_examples: list[dict] | None = None
        self._positions: dict[int, int] | None = None
        self.initial: RoutingCache | None = None  # the run-start routing (indices only)
        self.cache: RoutingCache | None = None  # the routing the current expert phase replays

    def add_retain_examples(self, examples: list[dict] | None) -> None:
        """Tokenised retain rows (``input_ids``, ``labels``): the expert phase's cache holds them after the pairs
        (cache row ``len(dataset) + i`` is retain row ``i``)."""
        self._retain_examples = examples

    # ------------------------------------------------------------------------------------------ recording
    def start_run(self, model: nn.Module, resumed: RoutingCache | None = None) -> None:
        """The run-start routing, unless one is held: the checkpoint's (``resumed``), else recorded now."""
        if self.initial is None:
            # indices only: the run-start routing feeds the routing-shift metrics and is never replayed
            self.initial = resumed or self.record(model, "initial routing", keep_weights=False)

    def start_expert_phase(self, model: nn.Module, epoch: int, resumed: tuple[int, RoutingCache] | None = None) -> None:
        """The routing the expert phase of ``epoch`` replays: the checkpoint's when it was recorded for this epoch
        (``resumed``: ``(epoch, cache)``), else recorded now (the weights only when they are replayed)."""
        if resumed is not None and resumed[0] == epoch:
            self.cache = resumed[1]
        else:
            self.cache = self.record(model, f"routing of epoch {epoch}", keep_weights=self.replay_weights == "cached",
                                     retain=True)

    def record(self, model: nn.Module, what: str, keep_weights: bool, retain: bool = False) -> RoutingCache:
        """The routing of every training row under ``model`` (eval mode, no gradients); with ``retain`` the retain
        rows follow the pairs."""
        was_training = model.training
        model.eval()
        try:
            cache = RoutingCache.record(model, self.ordered_batches(retain), device=self._cache_device,
                                        keep_weights=keep_weights)
        finally:
            model.train(was_training)
        logger.info("RASA: recorded %s for %d examples (%d B per token)", what, cache.num_examples,
                    cache.nbytes_per_token())
        return cache

    def ordered_batches(self, retain: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The training rows in order (then the retain rows, with ``retain``), collated, on the model's device."""
        dataset, size = self._dataset, self._batch_size
        for start in range(0, len(dataset), size):
            rows = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
            yield self._on_device(self._collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]))
        examples = self._retain_examples if retain else None
        for start in range(0, len(examples or []), size):
            yield self._on_device(self._collate([dict(r) for r in examples[start:start + size]]))

    def _on_device(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self._device) for k, v in batch.items() if k in _MODEL_INPUTS}

    # ------------------------------------------------------------------------------------------ batches
    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """Positions in the prepared training set (and the caches) of the given contract rows; TRL may have dropped
        rows, so the two differ."""
        if self._positions is None:
            self._positions = row_positions(self._dataset["rasa_index"])
        return torch.tensor([self._positions[int(r)] for r in rows.tolist()], dtype=torch.long)

    def batch_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cache rows of a training batch: its pairs (``rasa_index``), then its retain rows (``rasa_retain_index``)."""
        positions = self.positions(inputs["rasa_index"])
        if "rasa_retain_index" in inputs:  # retain rows follow the pairs, in the batch and in the routing cache
            positions = torch.cat([positions, len(self._dataset) + inputs["rasa_retain_index"].cpu()])
        return positions

    def batch_routing(self, inputs: dict[str, torch.Tensor]) -> Routing:
        """The expert phase's routing of a training batch, from the cache."""
        return self.cache.batch_routing(self.batch_positions(inputs), inputs["attention_mask"])

    @contextlib.contextmanager
    def replay(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Iterator[None]:
        """Every router of ``model`` returns the cached routing of the batch ``inputs`` inside the block."""
        with replay_routing(model, self.batch_routing(inputs), weights=self.replay_weights):
            yield

    # ------------------------------------------------------------------------------------------ routing shift
    def phase_start_shift(self) -> float:
        """Share of the training pairs' tokens (the cache's first rows; retain rows follow) the phase-start routing
        sends elsewhere than the run-start routing did."""
        pair_tokens = self.initial.indices.shape[0]
        return float(assignment_shift(self.cache.indices[:pair_tokens], self.initial.indices))

    def prompt_shift(self, rows: torch.Tensor | None, attention_mask: torch.Tensor, context: torch.Tensor,
                     routing: Routing) -> float | None:
        """Share of the context tokens of a batch of pairs (``rows``) that ``routing`` sends elsewhere than the
        run-start routing did; ``None`` without a run-start routing or rows."""
        if self.initial is None or rows is None:
            return None
        start = self.initial.batch_routing(self.positions(rows), attention_mask)
        flat = context.reshape(-1).cpu()
        return float(assignment_shift(routing.stacked_indices().cpu()[flat], start.stacked_indices()[flat]))
