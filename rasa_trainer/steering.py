"""Inference-time expert steering, a training-free baseline in the style of SteerMoE: deactivate chosen experts by
masking their router scores, so the router never selects them.

:func:`steer_away` registers a forward hook on every router that re-runs the family's own top-k selection with the
steered experts' scores at ``-inf`` and returns ``(scores, top-k weights, top-k indices)`` with the new choice and
its weights. Nothing is trained and the weights are untouched; leaving the block removes the hooks.

The router's first output (its scores) is returned **unchanged**: only the choice and its weights are steered. That
keeps two things exact: a routing replayed on top of the steered model (for instance ``evaluate_safety``'s ASR under
the base model's routing) recomputes its weights from finite scores, never ``0 / 0``, and the router probabilities
recorded by :func:`~rasa_trainer.routing.record_routing` stay the router's own (the probability mass the router still
puts on the deactivated experts is visible).

Supported scoring rules: ``softmax`` (OLMoE, Qwen2/3-MoE, Mixtral; also the equivalent top-k-then-softmax of gpt-oss
and GraniteMoE), from logits or probabilities, renormalised or not, with a scaling factor. Sigmoid routers with
selection bias and group-limited top-k (DeepSeek-V3 family) and PhiMoE's sparsemixer raise ``NotImplementedError``.

Example::

    from rasa_trainer.steering import steer_away

    with steer_away(model, selection):          # SafetyCriticalExperts, {moe_layer: [experts]} or a bool mask [L, E]
        report = evaluate_safety(model, tokenizer, eval_sets, judge)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .moe import MoELayer, moe_layers

__all__ = ["steer_away", "steered_routing", "steering_mask"]

STEERABLE_RULES = ("softmax",)


def steering_mask(model: nn.Module, selection: Any) -> torch.Tensor:
    """The experts to deactivate as a bool mask ``[num_moe_layers, num_experts]``.

    ``selection`` is a :class:`~rasa_trainer.selection.SafetyCriticalExperts`, a ``{moe_layer: [experts]}`` mapping
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


def steered_routing(layer: MoELayer, scores: torch.Tensor, blocked: torch.Tensor,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(weights, indices)`` the router of ``layer`` gives when the experts in ``blocked`` (bool ``[E]``) have
    score ``-inf``; ``scores`` is the router's first output ``[N, E]`` (logits or probabilities)."""
    rule = layer.rule
    if rule.kind not in STEERABLE_RULES:
        raise NotImplementedError(
            f"steering supports routers with scoring rules {STEERABLE_RULES}; MoE layer {layer.index} "
            f"({layer.router_name}) uses {rule.kind!r} (sigmoid routers need the selection bias and group-limited "
            f"top-k re-run, sparsemixer its jitter mask), which is not implemented"
        )
    if int(blocked.sum()) > layer.num_experts - layer.top_k:
        raise ValueError(
            f"steering blocks {int(blocked.sum())} of {layer.num_experts} experts in MoE layer {layer.index}, leaving "
            f"fewer than top_k={layer.top_k}"
        )
    blocked = blocked.to(scores.device)
    if rule.first_output == "probabilities":
        probs = scores.float().masked_fill(blocked, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        probs = scores.float().masked_fill(blocked, float("-inf")).softmax(dim=-1)
    weights, indices = probs.topk(layer.top_k, dim=-1)
    if rule.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * rule.scale
    return weights.to(out_dtype or scores.dtype), indices


@contextlib.contextmanager
def steer_away(model: nn.Module, selection: Any) -> Iterator[torch.Tensor]:
    """Deactivate the selected experts at inference: inside the block every router chooses among the other experts.

    Args:
        model: a transformers 5 MoE causal LM (plain or wrapped).
        selection: the experts to deactivate (see :func:`steering_mask`).

    Yields the bool mask ``[L, E]`` of deactivated experts. Hooks registered later (for example a routing replay)
    run after the steering hook and see, or override, the steered choice.
    """
    layers = moe_layers(model)
    mask = steering_mask(model, selection)
    for layer in layers:  # fail before any hook is registered
        if mask[layer.index].any():
            steered_routing(layer, torch.zeros(1, layer.num_experts), mask[layer.index])

    def make_hook(layer: MoELayer, blocked: torch.Tensor):
        def hook(module: nn.Module, args, output):
            scores, weights, indices = output
            new_weights, new_indices = steered_routing(layer, scores, blocked, out_dtype=weights.dtype)
            return scores, new_weights, new_indices.to(indices.dtype)

        return hook

    handles = [layer.router.register_forward_hook(make_hook(layer, mask[layer.index]))
               for layer in layers if mask[layer.index].any()]
    try:
        yield mask
    finally:
        for handle in handles:
            handle.remove()
