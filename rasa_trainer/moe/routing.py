"""Routing capture and exact routing replay, with router forward hooks (never by replacing classes).

A :class:`Routing` holds, for every MoE layer, the top-k expert indices and top-k weights of every position of one
forward pass (flattened as the MoE block flattens its input: ``batch * seq``, row-major), and optionally the router's
probability over all experts (see :class:`rasa_trainer.moe.discovery.ScoringRule` for its definition per scoring rule).

Both context managers are safe under gradient checkpointing: the recompute that checkpointing runs during backward
is recognised (it runs inside the autograd engine) and is neither recorded a second time nor served other routing.

Neither makes the host wait for the accelerator once per layer. :func:`replay_routing` moves the routing to the
devices of the routers once, when the block is entered (all layers of a device in one pinned, non-blocking copy), and
hands each layer's indices to the experts with their host copy attached (:func:`host_indices`), so the repair layer
splits a layer's assignments on the host instead of reading them back from the device. :func:`record_routing` with
``device="cpu"`` copies each layer's records into pinned host memory without waiting, and waits once, when the
records are read.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .discovery import MoELayer, moe_layers

__all__ = ["Routing", "RoutingRecorder", "real_tokens", "record_routing", "replay_routing"]

REPLAY_WEIGHT_MODES = ("cached", "recompute")


def _in_backward() -> bool:
    """True while the autograd engine runs, i.e. during the recompute of gradient checkpointing."""
    return torch._C._current_graph_task_id() != -1


def compact_index_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype that holds expert indices (int16 up to 32767 experts)."""
    return torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32


@dataclass
class Routing:
    """Routing of one forward pass: per MoE layer ``indices [N, k]``, ``weights [N, k]`` and optionally
    ``probabilities [N, E]``, where ``N = batch * seq`` in row-major order."""

    indices: list[torch.Tensor]
    weights: list[torch.Tensor]
    probabilities: list[torch.Tensor] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        return int(self.indices[0].shape[0]) if self.indices else 0

    def select(self, positions: torch.Tensor) -> "Routing":
        """The routing of the given flat positions (a bool mask of length N or an index tensor)."""
        take = (lambda t: t[positions.to(t.device)])
        probs = [take(p) for p in self.probabilities] if self.probabilities is not None else None
        return Routing([take(i) for i in self.indices], [take(w) for w in self.weights], probs)

    def to(self, device: torch.device | str) -> "Routing":
        move = (lambda t: t.to(device))
        probs = [move(p) for p in self.probabilities] if self.probabilities is not None else None
        return Routing([move(i) for i in self.indices], [move(w) for w in self.weights], probs)

    def stacked_indices(self) -> torch.Tensor:
        """Indices as one tensor ``[N, L, k]``."""
        return torch.stack(self.indices, dim=1)

    def stacked_weights(self) -> torch.Tensor:
        """Weights as one tensor ``[N, L, k]``."""
        return torch.stack(self.weights, dim=1)

    def nbytes_per_token(self, include_weights: bool = True) -> int:
        """Bytes one token of this routing takes in memory (indices, and weights if asked; no probabilities)."""
        total = sum(t.element_size() * t.shape[-1] for t in self.indices)
        if include_weights:
            total += sum(t.element_size() * t.shape[-1] for t in self.weights)
        return total


def real_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Flat bool mask of the real (non-padding) positions of a ``[batch, seq]`` attention mask, in the order of a
    :class:`Routing`. Works for left and right padding alike."""
    return attention_mask.reshape(-1).bool()


def real_tokens(routing: Routing, attention_mask: torch.Tensor) -> Routing:
    """The routing of the real tokens only (padding removed), for left or right padding."""
    mask = real_token_mask(attention_mask)
    if mask.numel() != routing.num_tokens:
        raise ValueError(
            f"attention_mask covers {mask.numel()} positions but the routing has {routing.num_tokens}; pass the mask "
            f"of the same forward pass"
        )
    return routing.select(mask)


class RoutingRecorder:
    """Collects the routing of every forward call made while :func:`record_routing` is active.

    ``calls[j]`` is the :class:`Routing` of the j-th forward call (for ``generate``: the prefill, then one decode step
    per new token, each with the KV cache, so ``calls[j].num_tokens == batch`` for decode steps).
    """

    def __init__(self, layers: list[MoELayer], probabilities: bool, detach: bool, device, compact: bool):
        self.layers = layers
        self._probabilities = probabilities
        self._detach = detach
        self._device = device
        self._compact = compact
        self._records: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [[] for _ in layers]
        self._pending: list = []  # CUDA events of copies into pinned host memory not yet waited for

    def _hook(self, layer: MoELayer):
        def hook(module: nn.Module, args, output):
            if _in_backward():
                return None  # gradient-checkpointing recompute: this pass was already recorded
            first, weights, indices = output
            if self._detach:
                with torch.no_grad():  # saving nothing for backward keeps non-reentrant checkpointing consistent
                    probs = layer.router_probabilities(first) if self._probabilities else None
                weights = weights.detach()
            else:
                # keep the raw scores and derive probabilities outside the (possibly checkpointed) layer, so the
                # hook adds no operation that the recompute would not repeat
                probs = first if self._probabilities else None
            if self._compact:
                indices = indices.to(compact_index_dtype(layer.num_experts))
            if self._device is not None:
                indices, weights = self._move(indices), self._move(weights)
                probs = self._move(probs) if probs is not None else None
            self._records[layer.index].append((indices, weights, probs))
            return None

        return hook

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the records' device. From CUDA to the host: a non-blocking copy into pinned memory (the host
        does not wait once per layer); :meth:`_wait` waits once for all of them before anything is read."""
        target = torch.device(self._device)
        if tensor.device.type != "cuda" or target.type != "cpu" or tensor.requires_grad:
            return tensor.to(target)  # differentiable records stay an autograd-tracked copy
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        self._pending.append(event)
        return out

    def _wait(self) -> None:
        # the copies into pinned memory are asynchronous: the host reads them only after they have landed
        for event in self._pending:
            event.synchronize()
        self._pending.clear()

    @property
    def num_calls(self) -> int:
        counts = {len(r) for r in self._records}
        if len(counts) != 1:
            raise RuntimeError(f"MoE layers recorded different numbers of calls: {sorted(counts)}")
        return counts.pop()

    @property
    def calls(self) -> list[Routing]:
        return [self._call(j) for j in range(self.num_calls)]

    def _call(self, j: int) -> Routing:
        self._wait()
        recs = [layer_records[j] for layer_records in self._records]
        probs = None
        if self._probabilities:
            probs = [r[2] if self._detach else layer.router_probabilities(r[2]) for layer, r in zip(self.layers, recs)]
        return Routing([r[0] for r in recs], [r[1] for r in recs], probs)

    def routing(self) -> Routing:
        """The routing of the single forward call made under the recorder."""
        if self.num_calls != 1:
            raise RuntimeError(f"expected exactly one recorded forward call, got {self.num_calls}; use .calls")
        return self._call(0)

    def clear(self) -> None:
        self._pending.clear()  # the host allocator keeps a pinned buffer until its copy has landed
        for records in self._records:
            records.clear()


@contextlib.contextmanager
def record_routing(
    model: nn.Module,
    probabilities: bool = True,
    detach: bool = True,
    device: torch.device | str | None = None,
    compact: bool = True,
) -> Iterator[RoutingRecorder]:
    """Record the routing of every MoE layer for every forward call made inside the block.

    Args:
        model: a transformers 5 MoE causal LM (plain, PEFT- or DDP-wrapped).
        probabilities: also keep the router's probability over all experts (``[N, E]`` per layer).
        detach: drop autograd history (set False to keep probabilities differentiable, e.g. for a router loss).
        device: move records there (e.g. ``"cpu"`` to keep them off the accelerator).
        compact: store indices as int16 where the expert count allows.

    Example::

        with record_routing(model) as rec:
            model(**batch)
        routing = real_tokens(rec.routing(), batch["attention_mask"])
    """
    layers = moe_layers(model)
    recorder = RoutingRecorder(layers, probabilities, detach, device, compact)
    handles = [layer.router.register_forward_hook(recorder._hook(layer)) for layer in layers]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replay_routing(model: nn.Module, routing: Routing, weights: str = "cached") -> Iterator[None]:
    """Make every router return the given top-k indices for the tokens of the batch.

    Args:
        model: the model whose routing to fix.
        routing: a :class:`Routing` with one entry per MoE layer and one row per position of the batch
            (``batch * seq``, padding included), e.g. recorded with :func:`record_routing` on the same batch.
        weights: ``"cached"`` returns the recorded top-k weights exactly; ``"recompute"`` keeps the recorded indices
            and recomputes the weights from the live router scores with the family's own rule, so routers still
            receive gradients (as in rollout routing replay).

    Every forward call inside the block must route exactly ``routing.num_tokens`` positions; a mismatch raises
    ``ValueError``. Under gradient checkpointing the recompute receives the same routing as long as ``backward`` runs
    inside the block (the recompute happens during backward).

    The routing moves to the routers' devices once, on entering the block (a host routing: one pinned, non-blocking
    copy per device; a routing on the device: one copy to the host, for the checks and the host copy the experts
    read through :func:`host_indices`), so no layer makes the host wait.
    """
    if weights not in REPLAY_WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}; expected one of {REPLAY_WEIGHT_MODES}")
    layers = moe_layers(model)
    if routing.num_layers != len(layers):
        raise ValueError(
            f"routing has {routing.num_layers} MoE layers but {type(model).__name__} has {len(layers)}; record the "
            f"routing on the same model"
        )
    for layer, idx in zip(layers, routing.indices):
        if idx.dim() != 2 or idx.shape[-1] != layer.top_k:
            raise ValueError(
                f"routing for MoE layer {layer.index} has indices of shape {tuple(idx.shape)}; expected [N, {layer.top_k}]"
            )
    host = _host_copy(routing.indices)
    for layer, idx in zip(layers, host):
        if idx.size and (int(idx.max()) >= layer.num_experts or int(idx.min()) < 0):
            raise ValueError(f"routing for MoE layer {layer.index} names experts outside 0..{layer.num_experts - 1}")
    devices = [_router_device(layer) for layer in layers]
    indices = _to_devices([torch.from_numpy(h) for h in host], devices)
    cached = _to_devices(routing.weights, devices) if weights == "cached" else [None] * len(layers)

    def make_hook(layer: MoELayer, idx: torch.Tensor, host_idx: np.ndarray, cached_w: torch.Tensor | None):
        def hook(module: nn.Module, args, output):
            first, live_weights, live_indices = output
            if live_indices.shape[0] != idx.shape[0]:
                raise ValueError(
                    f"replay_routing: MoE layer {layer.index} ({layer.router_name}) routed {live_indices.shape[0]} "
                    f"positions but the routing holds {idx.shape[0]}; replay needs the same batch and padding"
                )
            replayed = _with_host_copy(_like(idx, live_indices), host_idx)
            if weights == "cached":
                w = _like(cached_w, live_weights)
            else:
                w = layer.rule.topk_weights(first, replayed).to(live_weights.dtype)
            return first, w, replayed

        return hook

    handles = [
        layer.router.register_forward_hook(make_hook(layer, idx, h, w))
        for layer, idx, h, w in zip(layers, indices, host, cached)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------------
# Moving a step's routing once, and the host copy of replayed indices
# --------------------------------------------------------------------------------------------------------------------

_HOST_INDICES = "_rasa_host_indices"


def host_indices(top_k_index: torch.Tensor) -> np.ndarray | None:
    """The host copy (``int64 [N, k]``) of top-k indices that :func:`replay_routing` handed to the experts, or None
    for any other tensor (live routing, or indices changed in place since). The repair layer reads it instead of
    the device tensor, so splitting a layer's assignments costs the host no wait for the device."""
    found = getattr(top_k_index, _HOST_INDICES, None)
    if found is None or found[1] != top_k_index._version:
        return None
    return found[0]


def _with_host_copy(tensor: torch.Tensor, host: np.ndarray) -> torch.Tensor:
    # the version counter taken now: an in-place change of the tensor afterwards voids the host copy
    setattr(tensor, _HOST_INDICES, (host, tensor._version))
    return tensor


def _host_copy(indices: list[torch.Tensor]) -> list[np.ndarray]:
    """Every layer's indices as ``int64`` numpy arrays on the host: host tensors directly, tensors on a device in
    one copy (the only time replay waits for the device, once per block, not per layer)."""
    on_device = [i for i, t in enumerate(indices) if t.device.type != "cpu"]
    host = [t if t.device.type == "cpu" else None for t in indices]
    if on_device:
        moved = torch.stack([indices[i].long() for i in on_device]).cpu()
        for j, i in enumerate(on_device):
            host[i] = moved[j]
    return [t.long().contiguous().numpy() for t in host]


def _like(tensor: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``tensor`` on ``live``'s device and in its dtype: itself when it already is (moved on entering the block)."""
    if tensor.device == live.device and tensor.dtype == live.dtype:
        return tensor
    return tensor.to(device=live.device, dtype=live.dtype)


def _router_device(layer: MoELayer) -> torch.device | None:
    tensor = next(iter(layer.router.parameters()), None)
    if tensor is None:
        tensor = next(iter(layer.router.buffers()), None)
    return None if tensor is None else tensor.device


def _to_devices(tensors: list[torch.Tensor], devices: list[torch.device | None]) -> list[torch.Tensor]:
    """Each tensor on its layer's device (where that is unknown, it stays and the hook moves it). Host tensors bound
    for one CUDA device go in one pinned, non-blocking copy: the host does not wait for it, and the copy is ordered
    before the forward's kernels on the current stream."""
    out = list(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, (tensor, device) in enumerate(zip(tensors, devices)):
        if device is None or tensor.device == device:
            continue
        if tensor.device.type == "cpu" and device.type == "cuda":
            groups.setdefault((device, tensor.shape, tensor.dtype), []).append(i)
        else:
            out[i] = tensor.to(device)
    for (device, _, _), members in groups.items():
        stacked = torch.stack([tensors[i] for i in members]).pin_memory()
        moved = stacked.to(device, non_blocking=True)
        for j, i in enumerate(members):
            out[i] = moved[j]
    return out
