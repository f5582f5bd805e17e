"""Inference-time expert steering in the style of SteerMoE (arXiv 2509.09660), in both directions:

- :func:`steer_away` (a training-free safety baseline) deactivates chosen experts by masking their router scores, so
  the router never selects them;
- :func:`steer_toward` (a routing attack on open weights) activates chosen experts: their log-probabilities are set
  to the row's maximum plus a margin, SteerMoE's activation rule, so they take the top-k slots.

:func:`steer_away` registers a forward hook on every router that re-runs the family's own top-k selection with the
steered experts' scores at ``-inf`` and returns ``(scores, top-k weights, top-k indices)`` with the new choice and
its weights. Nothing is trained and the weights are untouched; leaving the block removes the hooks.

Both hooks return the router's outputs ``(scores, top-k weights, top-k indices)`` with a new choice and new weights.
``positions="generated"`` steers only the positions that produce a generated token: in every forward call, the last
position of each row when the call holds a whole sequence (the prompt's final token under ``generate``'s prefill, with
left padding) and every position of a one-token decoding step. ``positions="decision"`` steers only the first of
them, the prompt's final position, where the reply's first token is decided (the last position of each row of a call
that holds more than one position; with KV-cache decoding, ``generate``'s default, that is the prefill only).
``positions="all"`` (the default) steers every position, as SteerMoE does.

The router's first output (its scores) is returned **unchanged**: only the choice and its weights are steered. That
keeps two things exact: a routing replayed on top of the steered model (for instance ``evaluate_safety``'s ASR under
the base model's routing) recomputes its weights from finite scores, never ``0 / 0``, and the router probabilities
recorded by :func:`~rasa_trainer.moe.routing.record_routing` stay the router's own (the probability mass the router still
puts on the deactivated experts is visible).

Supported scoring rules: ``softmax`` (OLMoE, Qwen2/3-MoE, Mixtral; also the equivalent top-k-then-softmax of gpt-oss
and GraniteMoE), from logits or probabilities, renormalised or not, with a scaling factor. Sigmoid routers with
selection bias and group-limited top-k (DeepSeek-V3 family) and PhiMoE's sparsemixer raise ``NotImplementedError``.

Example::

    from rasa_trainer.evaluation.steering import steer_away, steer_toward

    with steer_away(model, selection):          # SafetyCriticalExperts, {moe_layer: [experts]} or a bool mask [L, E]
        report = evaluate_safety(model, tokenizer, eval_sets, judge)
    with steer_toward(model, base_selection, positions="generated"):   # the attack: force them into the top-k
        replies = ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..moe.discovery import MoELayer, moe_layers

__all__ = ["STEERING_POSITIONS", "boosted_routing", "steer_away", "steer_toward", "steered_routing", "steering_mask"]

STEERABLE_RULES = ("softmax",)
STEERING_POSITIONS = ("all", "generated", "decision")
"""Which positions a steering hook changes (see the module docstring)."""

STEER_TOWARD_MARGIN = 0.01
"""SteerMoE's activation margin: an activated expert's log-probability becomes the row's maximum plus this."""

RouterOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def steering_mask(model: nn.Module, selection: Any) -> torch.Tensor:
    """The experts to steer as a bool mask ``[num_moe_layers, num_experts]``.

    ``selection`` is a :class:`~rasa_trainer.detection.selection.SafetyCriticalExperts`, a ``{moe_layer: [experts]}`` mapping
    (MoE layer = 0-based index among the model's MoE layers, as ``SafetyCriticalExperts.by_moe_layer()`` gives) or a
    bool tensor ``[L, E]``.
    """
    layers = moe_layers(model)
    num_layers, num_experts = len(layers), layers[0].num_experts
    if hasattr(selection, "by_moe_layer"):
        selection = selection.by_moe_layer()
    if isinstance(selection, torch.Tensor):
        if selection.dtype != torch.bool or tuple(selection.shape) != (num_layers, num_experts):
            raise ValueError(
                f"a steering mask must be a bool tensor of shape ({num_layers}, {num_experts}), got "
                f"{selection.dtype} {tuple(selection.shape)}"
            )
        return selection.clone()
    if not isinstance(selection, Mapping):
        raise TypeError(
            f"selection must be SafetyCriticalExperts, a {{moe_layer: [experts]}} mapping or a bool mask, got "
            f"{type(selection).__name__}"
        )
    mask = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    for moe_layer, experts in selection.items():
        moe_layer = int(moe_layer)
        if not 0 <= moe_layer < num_layers:
            raise ValueError(f"selection names MoE layer {moe_layer}; the model has MoE layers 0..{num_layers - 1}")
        for expert in experts:
            if not 0 <= int(expert) < layers[moe_layer].num_experts:
                raise ValueError(f"selection names expert {expert} in MoE layer {moe_layer}, which has "
                                 f"{layers[moe_layer].num_experts}")
            mask[moe_layer, int(expert)] = True
    return mask


def _check_rule(layer: MoELayer) -> None:
    if layer.rule.kind not in STEERABLE_RULES:
        raise NotImplementedError(
            f"steering supports routers with scoring rules {STEERABLE_RULES}; MoE layer {layer.index} "
            f"({layer.router_name}) uses {layer.rule.kind!r} (sigmoid routers need the selection bias and group-limited "
            f"top-k re-run, sparsemixer its jitter mask), which is not implemented"
        )


def _log_probabilities(layer: MoELayer, scores: torch.Tensor) -> torch.Tensor:
    """The router's log-probability over experts ``[N, E]`` in fp32 (from logits or probabilities)."""
    if layer.rule.first_output == "probabilities":
        return scores.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return scores.float().log_softmax(dim=-1)


def _topk_of(layer: MoELayer, probs: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k ``(weights, indices)`` of a probability over experts: renormalised and scaled as it does."""
    weights, indices = probs.topk(layer.top_k, dim=-1)
    if layer.rule.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * layer.rule.scale).to(out_dtype), indices


def steered_routing(layer: MoELayer, scores: torch.Tensor, blocked: torch.Tensor,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(weights, indices)`` the router of ``layer`` gives when the experts in ``blocked`` (bool ``[E]``) have
    score ``-inf``; ``scores`` is the router's first output ``[N, E]`` (logits or probabilities)."""
    _check_rule(layer)
    if int(blocked.sum()) > layer.num_experts - layer.top_k:
        raise ValueError(
            f"steering blocks {int(blocked.sum())} of {layer.num_experts} experts in MoE layer {layer.index}, leaving "
            f"fewer than top_k={layer.top_k}"
        )
    blocked = blocked.to(scores.device)
    if layer.rule.first_output == "probabilities":
        probs = scores.float().masked_fill(blocked, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        probs = scores.float().masked_fill(blocked, float("-inf")).softmax(dim=-1)
    return _topk_of(layer, probs, out_dtype or scores.dtype)


def boosted_routing(layer: MoELayer, scores: torch.Tensor, boosted: torch.Tensor, margin: float = STEER_TOWARD_MARGIN,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(weights, indices)`` the router of ``layer`` gives when the experts in ``boosted`` (bool ``[E]``) have
    their log-probability set to the row's maximum plus ``margin`` (SteerMoE's activation). With ``margin > 0`` and at
    most ``top_k`` boosted experts, every boosted expert is chosen; its weight is the softmax of the changed
    log-probabilities (renormalised over the top-k where the router renormalises). ``scores`` is the router's first
    output ``[N, E]``."""
    _check_rule(layer)
    if margin < 0 or margin != margin:
        raise ValueError(f"margin must be >= 0, got {margin}")
    logp = _log_probabilities(layer, scores)
    boosted = boosted.to(scores.device)
    raised = logp.max(dim=-1, keepdim=True).values + margin
    return _topk_of(layer, torch.where(boosted, raised, logp).softmax(dim=-1), out_dtype or scores.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Hooks


class _CallShape:
    """The ``(batch, sequence)`` shape of the model's current forward call, recorded by a pre-hook on the model."""

    def __init__(self, model: nn.Module):
        self.shape: tuple[int, int] | None = None
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.shape = tuple(ids.shape[:2]) if ids is not None else None

    def rows(self, positions: str, num_rows: int, device: torch.device) -> torch.Tensor:
        """Bool ``[num_rows]``: the router rows of this call that ``positions`` (``"generated"`` or ``"decision"``)
        steers."""
        if self.shape is None or self.shape[0] * self.shape[1] != num_rows:
            raise RuntimeError(
                f"positions={positions!r} needs the router to see the model's [batch, sequence] positions flattened; "
                f"the call had input shape {self.shape} and the router {num_rows} rows"
            )
        seq = self.shape[1]
        if seq == 1:
            return torch.full((num_rows,), positions == "generated", dtype=torch.bool, device=device)
        return (torch.arange(num_rows, device=device) % seq) == seq - 1


Steer = Callable[[MoELayer, torch.Tensor, torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def _steering_hooks(model: nn.Module, mask: torch.Tensor, steer: Steer, positions: str) -> Iterator[None]:
    """A forward hook on every router whose layer has a steered expert: ``steer(layer, scores, experts, dtype)`` gives
    the new top-k, kept on the rows ``positions`` names."""
    if positions not in STEERING_POSITIONS:
        raise ValueError(f"positions={positions!r}; expected one of {STEERING_POSITIONS}")
    layers = [layer for layer in moe_layers(model) if mask[layer.index].any()]
    for layer in layers:  # fail before any hook is registered
        steer(layer, torch.zeros(1, layer.num_experts), mask[layer.index], torch.float32)
    shape = _CallShape(model) if positions != "all" else None

    def make_hook(layer: MoELayer, experts: torch.Tensor):
        def hook(module: nn.Module, args, output: RouterOutput) -> RouterOutput:
            scores, weights, indices = output
            new_weights, new_indices = steer(layer, scores, experts, weights.dtype)
            new_indices = new_indices.to(indices.dtype)
            if shape is None:
                return scores, new_weights, new_indices
            rows = shape.rows(positions, scores.shape[0], scores.device).unsqueeze(-1)
            return scores, torch.where(rows, new_weights, weights), torch.where(rows, new_indices, indices)

        return hook

    handles = [layer.router.register_forward_hook(make_hook(layer, mask[layer.index])) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if shape is not None:
            shape.handle.remove()


@contextlib.contextmanager
def steer_away(model: nn.Module, selection: Any, *, positions: str = "all") -> Iterator[torch.Tensor]:
    """Deactivate the selected experts at inference: inside the block every router chooses among the other experts.

    Args:
        model: a transformers 5 MoE causal LM (plain or wrapped).
        selection: the experts to deactivate (see :func:`steering_mask`).
        positions: ``"all"`` (default), ``"generated"`` or ``"decision"`` (see the module docstring).

    Yields the bool mask ``[L, E]`` of deactivated experts. Hooks registered later (for example a routing replay)
    run after the steering hook and see, or override, the steered choice.
    """
    mask = steering_mask(model, selection)
    steer = lambda layer, scores, experts, dtype: steered_routing(layer, scores, experts, dtype)  # noqa: E731
    with _steering_hooks(model, mask, steer, positions):
        yield mask


@contextlib.contextmanager
def steer_toward(model: nn.Module, selection: Any, *, margin: float = STEER_TOWARD_MARGIN,
                 positions: str = "all") -> Iterator[torch.Tensor]:
    """Activate the selected experts at inference, as an attacker with the open weights can (SteerMoE's direction
    toward unsafe experts): in every steered row each router's log-probability of a selected expert becomes the row's
    maximum plus ``margin``, so up to ``top_k`` selected experts per layer take the top-k slots (with more, ``top_k`` of
    them, as ``torch.topk`` breaks the tie), with the weights of the changed distribution.

    Args:
        model: a transformers 5 MoE causal LM (plain or wrapped).
        selection: the experts to activate (see :func:`steering_mask`), for example the Safety-Critical Experts
            detected on the base model.
        margin: added to the row's maximum log-probability (default 0.01, SteerMoE's); must be >= 0.
        positions: ``"all"`` (default, SteerMoE's), ``"generated"`` or ``"decision"`` (see the module docstring).

    Yields the bool mask ``[L, E]`` of activated experts.
    """
    mask = steering_mask(model, selection)
    if margin < 0 or margin != margin:
        raise ValueError(f"margin must be >= 0, got {margin}")
    steer = lambda layer, scores, experts, dtype: boosted_routing(layer, scores, experts, margin, dtype)  # noqa: E731
    with _steering_hooks(model, mask, steer, positions):
        yield mask
