"""Routing capture and exact routing replay, with router forward hooks (never by replacing classes).

A :class:`Routing` holds, for every MoE layer, the top-k expert indices and top-k weights of every position of one
forward pass (flattened as the MoE block flattens its input: ``batch * seq``, row-major), and optionally the router's
probability over all experts (see :class:`rasa_trainer.moe.discovery.ScoringRule` for its definition per scoring rule).

Both context managers are safe under gradient checkpointing: the recompute that checkpointing runs during backward
is recognised (it runs inside the autograd engine) and is neither recorded a second time nor served other routing.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

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
                indices, weights = indices.to(self._device), weights.to(self._device)
                probs = probs.to(self._device) if probs is not None else None
            self._records[layer.index].append((indices, weights, probs))
            return None

        return hook

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
        if int(idx.max()) >= layer.num_experts or int(idx.min()) < 0:
            raise ValueError(f"routing for MoE layer {layer.index} names experts outside 0..{layer.num_experts - 1}")

    def make_hook(layer: MoELayer, indices: torch.Tensor, cached: torch.Tensor):
        def hook(module: nn.Module, args, output):
            first, live_weights, live_indices = output
            if live_indices.shape[0] != indices.shape[0]:
                raise ValueError(
                    f"replay_routing: MoE layer {layer.index} ({layer.router_name}) routed {live_indices.shape[0]} "
                    f"positions but the routing holds {indices.shape[0]}; replay needs the same batch and padding"
                )
            idx = indices.to(device=live_indices.device, dtype=live_indices.dtype)
            if weights == "cached":
                w = cached.to(device=live_weights.device, dtype=live_weights.dtype)
            else:
                w = layer.rule.topk_weights(first, idx).to(live_weights.dtype)
            return first, w, idx

        return hook

    handles = [
        layer.router.register_forward_hook(make_hook(layer, idx, w))
        for layer, idx, w in zip(layers, routing.indices, routing.weights)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
