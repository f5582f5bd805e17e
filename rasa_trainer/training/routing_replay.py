"""The routing records of a run and their replay: the run-start routing (indices only, for the routing-shift
metrics), the expert phase's :class:`~rasa_trainer.moe.replay_cache.RoutingCache` (recorded at the phase start, with
the retain rows after the pairs), where each contract row sits in the prepared training set (TRL may drop rows), and
the routing of a batch built from them.

Under several processes (DDP, FSDP, ZeRO-3) recording is sharded: the recording batches (the same batches, in the same
order, as one process records) are split evenly across the processes, each records its share and the shares are
gathered (broadcast from their owners), so every process holds the whole cache, equal bit for bit to the one a single
process records, at 1/world of the compute. Metrics over all rows count each process's token share and all-reduce the
counts.

:class:`RoutingReplay` holds no trainer: it is given the prepared rows, the collator, the devices and its process's
place among the processes, and the model each time it records.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..moe.replay_cache import RoutingCache, assignment_shift, kept_assignments, shift_from_counts
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
    or ``recompute`` (take them from the live routers); ``process_index`` and ``num_processes``: this process's place
    among the processes that train together (recording is split among them; ``torch.distributed`` must be
    initialised when there are several).
    """

    def __init__(self, dataset, collate: Callable[[list[dict]], dict], *, batch_size: int,
                 device: str | torch.device, cache_device: str | torch.device = "cpu",
                 replay_weights: str = "cached", process_index: int = 0, num_processes: int = 1):
        self._dataset, self._collate = dataset, collate
        self._batch_size = max(1, batch_size)
        self._device, self._cache_device = device, cache_device
        self._processes = _Processes(process_index, num_processes, device)
        self.replay_weights = replay_weights
        self.recorded_rows = 0  # rows this process ran through the model in its last record (its share)
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
        rows follow the pairs. Each process records its share of the batches and the shares are gathered."""
        batches = self._row_batches(retain)
        if not batches:
            raise ValueError("there are no training rows to record the routing of")
        mine = self._processes.share(len(batches))
        # every process runs as many forwards as the busiest one: engines that gather weights inside forward (FSDP,
        # ZeRO-3) pair their collectives across processes. A process short of a batch re-runs one (keeping nothing)
        extra = self._processes.most(len(batches)) - len(mine)
        spare = batches[mine[-1] if len(mine) else 0]
        was_training = model.training
        model.eval()
        try:
            if len(mine):
                own = RoutingCache.record(model, (self._collated(batches[i]) for i in mine),
                                          device=self._cache_device, keep_weights=keep_weights)
            else:  # no batch of its own: the spare forward gives the (empty) share the cache's shape and dtypes
                own = _without_last_rows(RoutingCache.record(model, [self._collated(spare)], device=self._cache_device,
                                                             keep_weights=keep_weights), len(spare))
                extra -= 1
            for _ in range(extra):
                RoutingCache.record(model, [self._collated(spare)], device=self._cache_device, keep_weights=False)
        finally:
            model.train(was_training)
        self.recorded_rows = sum(len(batches[i]) for i in mine)
        rows_of = [sum(len(batches[i]) for i in self._processes.share(len(batches), p))
                   for p in range(self._processes.count)]
        cache = self._processes.gather_cache(own, rows_of)
        logger.info("RASA: recorded %s for %d examples (%d B per token; %d recorded by this process)", what,
                    cache.num_examples, cache.nbytes_per_token(), self.recorded_rows)
        return cache

    def ordered_batches(self, retain: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The training rows in order (then the retain rows, with ``retain``), collated, on the model's device: the
        batches one process records."""
        for batch in self._row_batches(retain):
            yield self._collated(batch)

    def _row_batches(self, retain: bool) -> list[range]:
        """The recording batches as ranges of cache rows: the pairs in order, then (``retain``) the retain rows."""
        pairs, size = len(self._dataset), self._batch_size
        batches = [range(start, min(start + size, pairs)) for start in range(0, pairs, size)]
        retained = len(self._retain_examples or []) if retain else 0
        batches += [range(pairs + start, pairs + min(start + size, retained)) for start in range(0, retained, size)]
        return batches

    def _collated(self, rows: range) -> dict[str, torch.Tensor]:
        pairs = len(self._dataset)
        examples = [_model_example(self._dataset[i]) if i < pairs else dict(self._retain_examples[i - pairs])
                    for i in rows]
        return self._on_device(self._collate(examples))

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
    def replay(self, model: nn.Module, inputs: dict[str, torch.Tensor],
               augment: Callable[[Routing, dict[str, torch.Tensor], torch.Tensor], Routing] | None = None
               ) -> Iterator[None]:
        """Every router of ``model`` returns the cached routing of the batch ``inputs`` inside the block; with
        ``augment`` (routing-robust repair), ``augment(routing, inputs, cache_rows)`` instead."""
        routing = self.batch_routing(inputs)
        if augment is not None:
            routing = augment(routing, inputs, self.batch_positions(inputs))
        with replay_routing(model, routing, weights=self.replay_weights):
            yield

    # ------------------------------------------------------------------------------------------ routing shift
    def phase_start_shift(self) -> float:
        """Share of the training pairs' tokens (the cache's first rows; retain rows follow) the phase-start routing
        sends elsewhere than the run-start routing did. Each process compares its share of the tokens and the counts
        are summed over the processes: the value one process computes over all tokens."""
        pair_tokens = self.initial.indices.shape[0]
        share = self.own_tokens(pair_tokens)
        kept = kept_assignments(self.cache.indices[share], self.initial.indices[share])
        total = pair_tokens * self.initial.indices[0].numel()
        return float(shift_from_counts(self.sum_over_processes(kept), total))

    def own_tokens(self, num_tokens: int) -> slice:
        """This process's even share of ``num_tokens`` cache tokens, for metrics whose counts are summed over the
        processes (:meth:`sum_over_processes`)."""
        return self._processes.token_share(num_tokens)

    def sum_over_processes(self, counts: torch.Tensor) -> torch.Tensor:
        """``counts`` summed over the processes (all-reduced; itself with one process)."""
        return self._processes.all_reduce_sum(counts)

    def prompt_shift(self, rows: torch.Tensor | None, attention_mask: torch.Tensor, context: torch.Tensor,
                     routing: Routing) -> float | None:
        """Share of the context tokens of a batch of pairs (``rows``) that ``routing`` sends elsewhere than the
        run-start routing did; ``None`` without a run-start routing or rows."""
        if self.initial is None or rows is None:
            return None
        start = self.initial.batch_routing(self.positions(rows), attention_mask)
        flat = context.reshape(-1).cpu()
        return float(assignment_shift(routing.stacked_indices().cpu()[flat], start.stacked_indices()[flat]))


def _model_example(row: dict) -> dict:
    return {"input_ids": row["input_ids"], "labels": row["labels"]}


def _without_last_rows(cache: RoutingCache, rows: int) -> RoutingCache:
    """``cache`` without its last ``rows`` rows."""
    keep = cache.num_examples - rows
    tokens = int(cache.offsets[keep])
    weights = cache.weights[:tokens] if cache.weights is not None else None
    return RoutingCache(cache.indices[:tokens], weights, cache.offsets[:keep + 1])


def _even_share(num_items: int, index: int, count: int) -> range:
    """Process ``index``'s contiguous share of ``num_items`` items split evenly over ``count`` processes (shares differ
    by at most one item and cover every item once, in order)."""
    return range(num_items * index // count, num_items * (index + 1) // count)


class _Processes:
    """This process's place among the processes training together, and the collectives sharded recording needs."""

    _CHUNK_BYTES = 64 * 2**20  # a broadcast moves at most this much at once (bounds the staging copy on an accelerator)

    def __init__(self, index: int, count: int, device: str | torch.device):
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"process_index={index} is not one of num_processes={count} processes")
        if count > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(f"{count} processes but no torch.distributed process group: launch with torchrun or "
                               f"accelerate launch (they initialise it), or pass num_processes=1")
        self.index, self.count, self._device = index, count, device

    def share(self, num_items: int, index: int | None = None) -> range:
        """Process ``index``'s (default: this one's) share of ``num_items`` items (:func:`_even_share`)."""
        return _even_share(num_items, self.index if index is None else index, self.count)

    def most(self, num_items: int) -> int:
        """The size of the largest share of ``num_items``."""
        return -(-num_items // self.count)

    def token_share(self, num_tokens: int) -> slice:
        share = self.share(num_tokens)
        return slice(share.start, share.stop)

    def _comm_device(self) -> torch.device:
        # gloo moves CPU tensors; NCCL (and other accelerator backends) tensors on the process's device
        return torch.device("cpu") if "gloo" in str(torch.distributed.get_backend()) else torch.device(self._device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.count == 1:
            return tensor
        buffer = tensor.to(self._comm_device(), copy=True)
        torch.distributed.all_reduce(buffer)
        return buffer.to(tensor.device)

    def _broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """``tensor`` (contiguous) overwritten with process ``src``'s, in chunks, as raw bytes (any dtype)."""
        if tensor.numel() == 0:
            return
        flat, device = tensor.reshape(-1).view(torch.uint8), self._comm_device()
        for start in range(0, flat.numel(), self._CHUNK_BYTES):
            chunk = flat[start:start + self._CHUNK_BYTES]
            buffer = chunk if chunk.device == device else chunk.to(device)
            torch.distributed.broadcast(buffer, src=src)
            if buffer is not chunk:
                chunk.copy_(buffer)

    def gather_cache(self, own: RoutingCache, rows_of: list[int]) -> RoutingCache:
        """The whole cache from every process's ``own`` share (process ``p`` recorded ``rows_of[p]`` rows, the
        processes in order): lengths first, then each token field, each share broadcast from its owner."""
        if self.count == 1:
            return own
        starts = [sum(rows_of[:p]) for p in range(self.count + 1)]
        lengths = torch.zeros(starts[-1], dtype=torch.long)
        lengths[starts[self.index]:starts[self.index + 1]] = own.offsets[1:] - own.offsets[:-1]
        for p in range(self.count):
            self._broadcast_(lengths[starts[p]:starts[p + 1]], p)
        offsets = torch.zeros(starts[-1] + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        bounds = [int(offsets[s]) for s in starts]
        fields = [own.indices] + ([own.weights] if own.weights is not None else [])
        gathered = []
        for field in fields:
            whole = field.new_empty((bounds[-1], *field.shape[1:]))
            whole[bounds[self.index]:bounds[self.index + 1]] = field
            for p in range(self.count):
                self._broadcast_(whole[bounds[p]:bounds[p + 1]], p)
            gathered.append(whole)
        return RoutingCache(gathered[0], gathered[1] if len(gathered) > 1 else None, offsets)
