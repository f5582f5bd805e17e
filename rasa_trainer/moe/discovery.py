"""MoE discovery: find the routed-expert layers of any transformers 5 causal LM.

transformers 5 stores the routed experts of a layer as fused 3-D parameters on one ``*Experts`` module
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; gpt-oss transposed and interleaved, with biases), and the
routers of almost every family are modules returning ``(logits or probabilities [N, E], top-k weights [N, k], top-k
indices [N, k])``. Families that differ (a router returning another tuple, experts that are not fused or do not
dispatch through transformers' ``ExpertsInterface``) are refused with a ``ValueError`` saying so.

Routers are found through the class the model declares for router-logit recording
(``_can_record_outputs["router_logits"]``), never by attribute names alone. The router's scoring rule is not looked
up in a table either: it is identified by probing a copy of the router with random weights and checking which rule
reproduces the top-k weights the router itself returns. A family we have never seen works without code changes as
long as its router follows one of the registered rule kinds (:data:`SCORING_RULES`; a new kind is one
:class:`RuleKind` and one :func:`register_scoring_rule`).

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
import weakref
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

__all__ = [
    "MoELayer", "RuleKind", "SCORING_RULES", "ScoringRule", "SUPPORTED_FAMILIES", "moe_layers", "register_scoring_rule",
    "unwrap_model",
]

# Model types tests/moe/test_families.py builds on tiny configs and puts through discovery, record, replay, an expert
# step and a router step (the README's table lists them with the families that are refused and why). The
# long-established families come first; any other family whose routers follow the same convention works too.
SUPPORTED_FAMILIES = (
    "olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe",
    "afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v32",
    "deepseek_v4", "dots1", "dots3_note_text", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe",
    "hy_v3", "hy_v4", "inkling2_loop_text", "inkling2_text", "jamba", "kimi_linear", "kolibri1", "kolibri1_1",
    "laguna", "lara_mini", "lfm2_moe", "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2",
    "minimax_m3_vl_text", "nemotron_h", "param2moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "qwen4_exp",
    "qwen4_exp_text", "sarvam_mla", "sarvam_moe", "solar_open",
)


# --------------------------------------------------------------------------------------------------------------------
# Scoring rules
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringRule:
    """How a router turns its scores into top-k weights, and what its "probability over all experts" is.

    ``kind`` names a registered :class:`RuleKind` (:data:`SCORING_RULES`, tried in this order when a router is
    identified):

    - ``"softmax"``: softmax over all experts, then top-k, optionally renormalised (OLMoE, Qwen, Mixtral).
      Probability over experts = the softmax.
      Top-k on the logits followed by a softmax over the k values (gpt-oss, GraniteMoE) is the same function as
      softmax, top-k, renormalise, so those routers are identified as ``"softmax"`` with ``normalize=True``.
    - ``"sigmoid"``: sigmoid scores plus a selection-only bias, group-limited top-k, optional renormalisation and a
      scaling factor (DeepSeek-V3, GLM4-MoE). Probability over experts = sigmoid scores divided by their sum (the same
      normalisation the router applies to its top-k weights); the selection bias is excluded because it only steers
      selection and never enters the weights.
    - ``"sqrtsoftplus"``: as ``"sigmoid"`` with ``sqrt(softplus(logits))`` as the per-expert score (DeepSeek-V4).
    - ``"sparsemixer"``: PhiMoE's sparsemixer. Probability over experts = softmax of the logits; the weights are
      recomputed with the evaluation-mode sparsemixer formula for the given indices.
    """

    kind: str
    first_output: str = "logits"  # "logits" or "probabilities"
    normalize: bool = False
    scale: float = 1.0
    jitter_eps: float = 0.0

    def probabilities(self, first_output: torch.Tensor) -> torch.Tensor:
        """The router's probability over all experts, ``[N, E]`` in fp32."""
        scores = first_output.float()
        if self.first_output == "probabilities":
            return scores
        return rule_kind(self.kind).probabilities(self, scores)

    def topk_weights(self, first_output: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Top-k weights the router would give experts ``indices`` from its live scores (differentiable)."""
        return rule_kind(self.kind).topk_weights(self, first_output.float(), indices.long())


class RuleKind:
    """One kind of scoring rule: how its probability over experts and its top-k weights are computed from a router's
    first output, and how it is recognised from what a probed router returned.

    Subclass it, set ``name``, implement :meth:`topk_weights` and :meth:`identify` (and :meth:`probabilities` when the
    probability over experts is not the softmax), and register an instance with :func:`register_scoring_rule`.
    """

    name: str = ""
    needs_logits: bool = True  # only tried on routers whose first output is logits (not probabilities)

    def probabilities(self, rule: ScoringRule, scores: torch.Tensor) -> torch.Tensor:
        """The probability over all experts ``[N, E]`` from fp32 logits ``scores``."""
        return scores.softmax(dim=-1)

    def topk_weights(self, rule: ScoringRule, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The top-k weights of experts ``indices`` (int64 ``[N, k]``) from the fp32 first output ``scores``."""
        raise NotImplementedError

    def identify(self, first: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, first_output: str,
                 jitter_eps: float) -> ScoringRule | None:
        """The rule of this kind that reproduces ``weights`` (fp32 ``[N, k]``) from ``first`` (fp32 ``[N, E]``) and
        ``indices``, or None."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


SCORING_RULES: dict[str, RuleKind] = {}  # kind name -> kind, in identification order


def register_scoring_rule(kind: RuleKind | type[RuleKind]):
    """Register a :class:`RuleKind` (an instance, or a subclass to instantiate: usable as a class decorator). Kinds
    are tried in registration order when a router is identified. Returns what it was given."""
    instance = kind() if isinstance(kind, type) else kind
    if not isinstance(instance, RuleKind) or not instance.name:
        raise TypeError(f"{kind!r} is not a RuleKind with a name")
    if instance.name in SCORING_RULES or instance.name == "unsupported":
        raise ValueError(f"scoring rule {instance.name!r} is already registered; choose another name")
    SCORING_RULES[instance.name] = instance
    return kind


def rule_kind(name: str) -> RuleKind:
    """The registered kind ``name``; a ``ValueError`` listing the registered kinds otherwise."""
    kind = SCORING_RULES.get(name)
    if kind is None:
        raise ValueError(f"unknown scoring rule {name!r}; registered: {', '.join(SCORING_RULES)}")
    return kind


@register_scoring_rule
class SoftmaxRule(RuleKind):
    """Softmax over all experts, top-k, optionally renormalised, times a constant."""

    name = "softmax"
    needs_logits = False

    def topk_weights(self, rule, scores, indices):
        probs = scores if rule.first_output == "probabilities" else scores.softmax(dim=-1)
        weights = probs.gather(-1, indices)
        if rule.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * rule.scale

    def identify(self, first, weights, indices, first_output, jitter_eps):
        probs = first if first_output == "probabilities" else first.softmax(dim=-1)
        gathered = probs.gather(-1, indices)
        if (c := _constant_ratio(weights, gathered)) is not None:
            return ScoringRule(self.name, first_output, normalize=False, scale=c)
        if (c := _constant_ratio(weights, gathered / gathered.sum(-1, keepdim=True))) is not None:
            return ScoringRule(self.name, first_output, normalize=True, scale=c)
        return None


class ElementwiseRule(RuleKind):
    """Routers that score each expert independently (no softmax across experts) with ``score(logits)``; top-k
    weights are the scores, optionally renormalised, times a constant."""

    def __init__(self, name: str, score: Callable[[torch.Tensor], torch.Tensor]):
        self.name, self.score = name, score

    def probabilities(self, rule, scores):
        per_expert = self.score(scores)
        return per_expert / per_expert.sum(dim=-1, keepdim=True)

    def topk_weights(self, rule, scores, indices):
        weights = self.score(scores).gather(-1, indices)
        if rule.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * rule.scale

    def identify(self, first, weights, indices, first_output, jitter_eps):
        per_expert = self.score(first).gather(-1, indices)
        if (c := _constant_ratio(weights, per_expert)) is not None:
            return ScoringRule(self.name, first_output, normalize=False, scale=c)
        if (c := _constant_ratio(weights, per_expert / per_expert.sum(-1, keepdim=True))) is not None:
            return ScoringRule(self.name, first_output, normalize=True, scale=c)
        return None


register_scoring_rule(ElementwiseRule("sigmoid", torch.sigmoid))
register_scoring_rule(ElementwiseRule("sqrtsoftplus", lambda logits: nn.functional.softplus(logits).sqrt()))


@register_scoring_rule
class SparsemixerRule(RuleKind):
    """PhiMoE's evaluation-mode sparsemixer; probability over experts = softmax of the logits."""

    name = "sparsemixer"

    def topk_weights(self, rule, scores, indices):
        return _sparsemixer_weights(scores, indices, rule.jitter_eps)

    def identify(self, first, weights, indices, first_output, jitter_eps):
        if torch.allclose(weights, _sparsemixer_weights(first, indices, jitter_eps), atol=1e-5):
            return ScoringRule(self.name, first_output, jitter_eps=jitter_eps)
        return None


class _ElementwiseScores(Mapping):
    """``{kind: score function}`` of the registered :class:`ElementwiseRule` kinds, read at every use."""

    def _current(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {name: kind.score for name, kind in SCORING_RULES.items() if isinstance(kind, ElementwiseRule)}

    def __getitem__(self, name):
        return self._current()[name]

    def __iter__(self):
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


# Routers that score each expert independently (no softmax across experts), by rule kind.
ELEMENTWISE_SCORES: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = _ElementwiseScores()


def _sparsemixer_weights(scores: torch.Tensor, indices: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """PhiMoE's evaluation-mode sparsemixer weights, generalised to given indices.

    For slot j the candidates are the experts not chosen in earlier slots whose score is within the relative
    distance ``2 * jitter_eps`` of the chosen expert's score; the weight is the softmax over candidates at the chosen
    expert.
    """
    masked = scores
    weights = []
    for slot in range(indices.shape[-1]):
        chosen = indices[:, slot : slot + 1]
        chosen_score = masked.gather(-1, chosen)
        with torch.no_grad():
            factor = scores.abs().clamp(min=chosen_score)
            too_far = ((chosen_score - scores) / factor) > (2 * jitter_eps)
        gates = masked.masked_fill(too_far, float("-inf")).softmax(dim=-1)
        weights.append(gates.gather(-1, chosen))
        masked = masked.scatter(-1, chosen, float("-inf"))
    return torch.cat(weights, dim=-1)


def _constant_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    """The constant c with numerator == c * denominator, or None when there is none."""
    ratio = numerator / denominator
    c = ratio.flatten()[0].item()
    if torch.allclose(ratio, torch.full_like(ratio, c), rtol=1e-4, atol=1e-5):
        return 1.0 if abs(c - 1.0) < 1e-5 else c  # float noise of a renormalisation is not a scale
    return None


def _identify_rule(first: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, jitter_eps: float) -> ScoringRule:
    """The rule that reproduces the top-k weights a router returned (from :func:`_probe`): the first registered kind
    (:data:`SCORING_RULES`) that does."""
    first, weights, indices = first.float(), weights.float(), indices.long()
    row_sums = first.sum(dim=-1)
    is_probs = bool((first >= 0).all() and torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4))
    first_output = "probabilities" if is_probs else "logits"
    for kind in SCORING_RULES.values():
        if is_probs and kind.needs_logits:
            continue
        rule = kind.identify(first, weights, indices, first_output, jitter_eps)
        if rule is not None:
            return rule
    return _unsupported()


def _unsupported() -> ScoringRule:
    return ScoringRule("unsupported")


_PROBE_TOKENS = 64
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


def _probe(router: nn.Module, hidden_size: int, block: nn.Module | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Call a float32 CPU copy of ``router`` with random weights on random hidden states, in eval mode: its
    ``(scores, top-k weights, top-k indices)`` and the names of the parameters those scores or weights have a
    gradient through (what the router phase can train; a selection-only bias that a family keeps as a frozen
    parameter, Laguna and ERNIE 4.5 MoE, only moves the indices and gets none).

    The copy is shallow with fresh tensors, down through the router's submodules (AFMoE keeps its projection in a
    child ``nn.Linear``), so it works whatever holds the real weights: a meta-device model (memory planning),
    DeepSpeed ZeRO-3 partitions (empty tensors whose real shape is ``ds_shape``) or FSDP2 DTensors; the model stays
    untouched. Random weights avoid the ties a zero-initialised router would produce.

    Routers whose forward takes more than the hidden states (AFMoE, HY-V3 and MiniMax-M2 get their selection bias
    from the MoE block: ``self.gate(hidden, self.e_score_correction_bias)``) are given the block's tensor of the same
    name. The hidden states are ``[N, H]`` as most blocks flatten them first; a router that fails on that shape is
    called again with ``[1, N, H]`` (AFMoE's router flattens a 3-D input itself).
    """
    generator = torch.Generator().manual_seed(0)
    probe = _probe_copy(router, generator)
    params = dict(probe.named_parameters())
    for param in params.values():
        param.requires_grad_(True)
    extra = _extra_router_inputs(router, block)
    hidden = torch.randn(_PROBE_TOKENS, hidden_size, generator=generator)
    with torch.enable_grad():
        try:
            output = probe(hidden, *extra)
        except (RuntimeError, ValueError, IndexError) as flat_error:
            try:
                output = probe(hidden.unsqueeze(0), *extra)
            except (RuntimeError, ValueError, IndexError):
                raise _ConventionError(f"fails on hidden states of shape [N, H] and [1, N, H] ({flat_error})") from None
        if not (isinstance(output, tuple) and len(output) == 3):
            length = len(output) if isinstance(output, tuple) else 1
            raise _ConventionError(f"returns {type(output).__name__} of length {length}")
        # a router given [1, N, H] may answer with a leading batch dimension; the rules work on [N, E] and [N, k]
        first, weights, indices = (t.reshape(-1, t.shape[-1]) for t in output)
        if first.requires_grad or weights.requires_grad:
            (first.float().sum() + weights.float().sum()).backward()
    trainable = tuple(name for name, param in params.items() if param.grad is not None)
    return first.detach(), weights.detach(), indices, trainable


def _probe_copy(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A shallow copy of ``module`` and its submodules with fresh float32 CPU tensors and no hooks, in eval mode.

    Parameters are random; buffers keep their values (a router's buffer is state such as a selection bias, which
    random values would misrepresent) unless they are not materialised here (meta, ZeRO-3), then they are zeros.
    """
    probe = copy.copy(module)
    probe.__dict__ = dict(module.__dict__)
    probe._parameters = {
        name: None if p is None else nn.Parameter(torch.randn(_full_shape(p), generator=generator) * 0.5, requires_grad=False)
        for name, p in module._parameters.items()  # None entries (e.g. Linear without bias) stay None
    }
    probe._buffers = {name: None if b is None else _state_copy(b) for name, b in module._buffers.items()}
    probe._modules = {name: None if m is None else _probe_copy(m, generator) for name, m in module._modules.items()}
    for hooks in _HOOK_DICTS:
        if hasattr(probe, hooks):
            setattr(probe, hooks, type(getattr(module, hooks))())  # record/replay hooks must not act on the probe
    probe.training = False
    return probe


def _state_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a state tensor (buffer, frozen bias), floats as float32; zeros where the values are not here:
    meta, a ZeRO-3 partition or an FSDP2 DTensor shard (gathering it would be a collective inside a probe)."""
    float_dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype  # index buffers must stay integers
    if tensor.is_meta or tensor.numel() == 0 or hasattr(tensor, "placements"):
        return torch.zeros(_full_shape(tensor), dtype=float_dtype)
    return tensor.detach().to(device="cpu", dtype=float_dtype, copy=True)


def _extra_router_inputs(router: nn.Module, block: nn.Module | None) -> tuple[torch.Tensor, ...]:
    """The block's tensors for the router's forward arguments after the hidden states, matched by name: passed
    whether or not the argument is optional (LFM2-MoE's ``expert_bias=None`` is required when the block has one);
    the first argument the block does not hold ends the list, and must be optional."""
    parameters = list(inspect.signature(type(router).forward).parameters.values())[2:]  # skip self, hidden_states
    extra = []
    for param in parameters:
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        value = getattr(block, param.name, None) if block is not None else None
        if isinstance(value, torch.Tensor):
            extra.append(_state_copy(value))
        elif param.default is param.empty:
            raise _ConventionError(f"needs a forward argument {param.name!r} that its MoE block does not hold")
        else:
            break
    return tuple(extra)


def _full_shape(tensor: torch.Tensor) -> torch.Size:
    """The logical shape of a parameter: ZeRO-3 keeps an empty local tensor and the real shape in ``ds_shape``."""
    return torch.Size(getattr(tensor, "ds_shape", tensor.shape))


class _ConventionError(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------------
# MoE layers
# --------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class MoELayer:
    """One routed-expert layer of a model.

    Attributes:
        index: position among the model's MoE layers (0-based; dense layers are skipped).
        layer_index: index of the decoder layer that holds it.
        router_name / experts_name: module paths (as in ``model.named_modules()`` of the model passed in).
        router / experts: the modules themselves (``experts`` is the module owning the fused parameters, under any
            PEFT wrapper).
        num_experts / top_k: routed experts and experts per token.
        rule: the router's :class:`ScoringRule` (``rule.kind`` is the scoring rule, ``rule.first_output`` says whether
            the router's first output is logits or probabilities).
        router_trainable: names (in ``router``) of the router parameters its scores or top-k weights have a gradient
            through; a frozen selection-only bias is not among them.
    """

    index: int
    layer_index: int
    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module
    num_experts: int
    top_k: int
    rule: ScoringRule
    hidden_size: int = field(default=0)
    router_trainable: tuple[str, ...] = field(default=())

    @property
    def scoring(self) -> str:
        return self.rule.kind

    @property
    def first_output(self) -> str:
        return self.rule.first_output

    @property
    def is_transposed(self) -> bool:
        """True for gpt-oss style ``[E, in, out]`` storage."""
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def is_concatenated(self) -> bool:
        """True when gate and up are concatenated ``[gate; up]``; False for gpt-oss interleaved ``[g0, u0, g1, ...]``."""
        return bool(getattr(self.experts, "is_concatenated", True))

    def expert_parameter_names(self) -> list[str]:
        """Names of the fused expert parameters of this layer (``gate_up_proj``, ``down_proj`` and any biases)."""
        # logical shapes: under ZeRO-3 the local tensor is empty and the real shape is ds_shape
        return [name for name, p in self.experts.named_parameters(recurse=False)
                if len(_full_shape(p)) >= 2 and _full_shape(p)[0] == self.num_experts]

    def expert_parameters(self, expert: int) -> dict[str, torch.Tensor]:
        """Views of expert ``expert``'s slices of every fused parameter, in the stored layout."""
        self._check_expert(expert)
        return {name: getattr(self.experts, name)[expert] for name in self.expert_parameter_names()}

    def expert_projections(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s weights in the canonical ``[out, in]`` layout: ``gate``, ``up``, ``down`` (``gate`` absent
        for ungated experts) plus ``*_bias`` where the family has biases. Handles transposed and interleaved layouts."""
        self._check_expert(expert)
        params = self.expert_parameters(expert)
        out: dict[str, torch.Tensor] = {}
        if "gate_up_proj" in params:
            gate_up = params["gate_up_proj"]
            gate_up = gate_up.t() if self.is_transposed else gate_up  # -> [2I, H]
            gate, up = _split_gate_up(gate_up, self.is_concatenated, dim=0)
            out["gate"], out["up"] = gate, up
            if "gate_up_proj_bias" in params:
                out["gate_bias"], out["up_bias"] = _split_gate_up(params["gate_up_proj_bias"], self.is_concatenated, dim=0)
        elif "up_proj" in params:
            out["up"] = params["up_proj"].t() if self.is_transposed else params["up_proj"]
            if "up_proj_bias" in params:
                out["up_bias"] = params["up_proj_bias"]
        down = params["down_proj"]
        out["down"] = down.t() if self.is_transposed else down
        if "down_proj_bias" in params:
            out["down_bias"] = params["down_proj_bias"]
        return out

    def router_probabilities(self, first_output: torch.Tensor) -> torch.Tensor:
        """The router's probability over all experts from its first output (see :class:`ScoringRule`)."""
        return self.rule.probabilities(first_output)

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range for MoE layer {self.index} with {self.num_experts} experts")

    def __repr__(self) -> str:
        return (
            f"MoELayer(index={self.index}, layer_index={self.layer_index}, router={self.router_name!r}, "
            f"experts={self.experts_name!r}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"scoring={self.rule.kind!r}, first_output={self.rule.first_output!r})"
        )


def _split_gate_up(t: torch.Tensor, concatenated: bool, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if concatenated:
        return t.chunk(2, dim=dim)
    return t[0::2], t[1::2]  # interleaved along the first dim: gate0, up0, gate1, up1, ...


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / accelerate / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "_can_record_outputs"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            base = model.get_base_model()
            if base is model:
                return model
            model = base
        else:
            return model


def _router_classes(model: nn.Module) -> tuple[type, ...]:
    classes = []
    for module in model.modules():
        recorders = getattr(type(module), "_can_record_outputs", None) or {}
        recorder = recorders.get("router_logits")
        if recorder is not None and getattr(recorder, "target_class", None) is not None:
            if recorder.target_class not in classes:
                classes.append(recorder.target_class)
    return tuple(classes)


_HEADLINE_FAMILIES = 8  # how many of SUPPORTED_FAMILIES an error message names


def _unsupported_error(model: nn.Module, why: str) -> ValueError:
    named = ", ".join(SUPPORTED_FAMILIES[:_HEADLINE_FAMILIES])
    more = len(SUPPORTED_FAMILIES) - _HEADLINE_FAMILIES
    return ValueError(
        f"{type(model).__name__} {why}. rasa_trainer needs a transformers 5 Mixture-of-Experts causal LM whose routers "
        f"return (logits or probabilities, top-k weights, top-k indices) for fused experts that dispatch through "
        f"transformers' ExpertsInterface. Tested families: {named} and {more} more "
        f"(rasa_trainer.moe.discovery.SUPPORTED_FAMILIES); other families following the same convention also work."
    )


def _experts_of(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The child of an MoE block that owns fused 3-D expert parameters (looking through PEFT ``base_layer`` wrappers)."""
    for name, child in block.named_children():
        owner = child
        while hasattr(owner, "base_layer") and isinstance(owner.base_layer, nn.Module):
            owner = owner.base_layer
        params = dict(owner.named_parameters(recurse=False))
        fused = params.get("gate_up_proj", params.get("up_proj"))
        if fused is not None and len(_full_shape(fused)) == 3 and "down_proj" in params:
            return name, owner
    return None


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of a transformers 5 causal LM, in order.

    Works on the model itself and through PEFT, DDP and accelerate wrappers (module names are those of the model
    passed in). Raises ``ValueError`` for dense models and for routers that do not follow the
    ``(scores, top-k weights, top-k indices)`` convention.
    """
    base = unwrap_model(model)
    router_classes = _router_classes(base)
    if not router_classes:
        raise _unsupported_error(base, "declares no router class for router-logit recording (a dense model?)")
    hidden_size = _hidden_size(base)
    modules = dict(model.named_modules())
    layers: list[MoELayer] = []
    for name, module in model.named_modules():
        if not isinstance(module, router_classes):
            continue
        block_name = name.rpartition(".")[0]
        found = _experts_of(modules[block_name])
        if found is None:
            raise _unsupported_error(base, f"has a router at {name!r} with no fused experts module beside it")
        experts_child, experts = found
        spec = _router_spec(base, module, hidden_size, modules[block_name])
        _check_experts(base, name, spec, experts)
        match = _LAYER_INDEX.findall(f".{name}.")
        layers.append(
            MoELayer(
                index=len(layers),
                layer_index=int(match[-1]) if match else len(layers),
                router_name=name,
                router=module,
                experts_name=f"{block_name}.{experts_child}",
                experts=experts,
                num_experts=spec.num_experts,
                top_k=spec.top_k,
                rule=spec.rule,
                hidden_size=hidden_size,
                router_trainable=spec.trainable,
            )
        )
    if not layers:
        raise _unsupported_error(base, "has no router modules")
    return layers


@dataclass(frozen=True)
class _RouterSpec:
    """What probing a router establishes: its scoring rule, how many experts it scores and how many it picks, and
    which of its parameters its outputs have a gradient through."""

    rule: ScoringRule
    num_experts: int
    top_k: int
    trainable: tuple[str, ...]


# Probed router specs, per router class, then per everything else the probe's outcome depends on (see _rule_key).
# Probing costs a router copy and a forward; with this cache, moe_layers (called by every record_routing /
# replay_routing block) costs only a walk over the modules after the first call.
_RULE_CACHE: "weakref.WeakKeyDictionary[type, dict[tuple, _RouterSpec]]" = weakref.WeakKeyDictionary()
_SCALARS = (bool, int, float, str, type(None))


def _rule_key(router: nn.Module, hidden_size: int, jitter: float) -> tuple:
    """What the identified rule depends on besides the class: the class's forward (so a patched forward is probed
    again), the router's scalar hyperparameters (top_k, norm_topk_prob, routed_scaling_factor, ...), the shapes of
    its parameters and buffers, the hidden size and the jitter."""
    attrs = tuple(
        sorted((k, v) for k, v in vars(router).items() if not k.startswith("_") and k != "training" and isinstance(v, _SCALARS))
    )
    shapes = tuple(
        (n, tuple(_full_shape(t))) for n, t in itertools.chain(router.named_parameters(), router.named_buffers())
    )
    return (type(router).forward, attrs, shapes, hidden_size, jitter)


def clear_rule_cache() -> None:
    """Forget every identified scoring rule (the next :func:`moe_layers` probes the routers again)."""
    _RULE_CACHE.clear()


def _router_spec(model: nn.Module, router: nn.Module, hidden_size: int, block: nn.Module) -> _RouterSpec:
    jitter = float(getattr(router, "router_jitter_noise", getattr(model.config, "router_jitter_noise", 0.0)) or 0.0)
    key = _rule_key(router, hidden_size, jitter)
    per_class = _RULE_CACHE.setdefault(type(router), {})
    cached = per_class.get(key)
    if cached is not None:
        return cached
    try:
        first, weights, indices, trainable = _probe(router, hidden_size, block)
    except _ConventionError as err:
        raise _unsupported_error(model, f"has a router ({type(router).__name__}) that {err}") from None
    rule = _identify_rule(first, weights, indices, jitter)
    if rule.kind == "unsupported":
        raise _unsupported_error(model, f"has a router ({type(router).__name__}) whose top-k weights follow no known scoring rule")
    # the number of experts is the width of the router's scores, whatever attribute names the family uses
    spec = per_class[key] = _RouterSpec(rule, int(first.shape[-1]), int(indices.shape[-1]), trainable)
    return spec


def _check_experts(model: nn.Module, router_name: str, spec: _RouterSpec, experts: nn.Module) -> None:
    """Refuse experts that selected-expert repairs cannot act on."""
    held = int(_full_shape(experts.down_proj)[0])
    if held != spec.num_experts:  # LongCat-Flash also routes to compute-free identity experts beyond the fused ones
        raise _unsupported_error(
            model, f"has a router at {router_name!r} that scores {spec.num_experts} experts while its experts module "
                   f"({type(experts).__name__}) holds {held}"
        )
    if not callable(getattr(type(experts).forward, "__wrapped__", None)) or not hasattr(experts, "is_concatenated"):
        # repairs are applied through transformers' ExpertsInterface; an experts class that does not dispatch
        # through it would run unrepaired, silently
        raise _unsupported_error(
            model, f"has experts ({type(experts).__name__}) that do not dispatch through transformers' ExpertsInterface "
                   f"(no @use_experts_implementation), which expert repairs need"
        )


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def num_routed_experts(layers: list[MoELayer]) -> int:
    """Total routed experts over all MoE layers."""
    return sum(layer.num_experts for layer in layers)
