"""The MoE-specific attacks a user of an open-weights MoE model must survive, beside the plain jailbreaks, with the
attacker's budget (how many experts the attacker touches).

:func:`~rasa_trainer.evaluation.evaluate.evaluate_safety` runs the attacks named in ``attacks`` (:data:`ATTACKS`):

- ``"base"``: generation under the base model's routing (needs ``base_model``; see ``routing_diagnostics``).
- ``"routing"``: steering toward the base model's Safety-Critical Experts (needs ``attack_experts``; SteerMoE's
  activation, see ``steering``).
- ``"refusal_suppression"`` (GateBreaker, arXiv 2512.21008; L3, arXiv 2602.08741): the attacker profiles the
  evaluated model, finds the experts most active when it *refuses* plain harmful requests and switches them off at
  inference (their router score is ``-inf`` at every position, so the router chooses among the other experts and
  weighs its choice by its own rule: :func:`~rasa_trainer.evaluation.steering.steer_away`).
- ``"unsafe_steering"`` (SteerMoE, arXiv 2509.09660, unsafe direction with jailbreaks): the attacker profiles the
  evaluated model the same way, takes the experts most active when it *complies or answers* rather than refuses, and
  steers every router toward them while the prompts are jailbreaks
  (:func:`~rasa_trainer.evaluation.steering.steer_toward`).

The profile (:func:`profile_experts`) is one greedy generation pass with routing capture
(:func:`~rasa_trainer.detection.generation.generate_replies`) over the evaluation sets, judged with the evaluation's
judge, counted with :class:`~rasa_trainer.detection.statistics.ExpertStatistics` over the generated tokens of two
classes:

- *refusal*: the replies to the plain harmful requests (``anchors``) that the judge calls refused;
- *contrast* (compliance and baseline): every reply the judge does not call refused, to the plain harmful requests,
  to the jailbreaks (``attacks``) and to the benign requests (``over_refusal``).

An expert's refusal score is its activation rate on refusal tokens minus its rate on contrast tokens (the risk
difference of the detection step, with refusal in the place of the successful jailbreaks); its compliance score is
the negative. :func:`select_experts_by_budget` takes the experts of highest positive score within the budget.

The budget (:class:`AttackBudget`): ``experts`` per MoE layer (``scope="per_layer"``) or over all layers jointly
(``scope="total"``, ties to the earlier layer). Suppression may switch off at most ``num_experts - top_k`` experts
per layer (the router must keep ``top_k`` to choose from); steering toward more than ``top_k`` experts of one layer
cannot place them all, so it may take at most ``top_k`` per layer. A budget beyond those limits is an error before
any generation. Fewer experts than the budget are taken when fewer have a positive score; the report says how many.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.contract import as_messages
from ..detection.generation import generate_replies
from ..detection.statistics import ExpertStatistics
from ..judges import Judge, run_judge
from ..moe.discovery import moe_layers
from .steering import _check_rule, steer_away

__all__ = [
    "ATTACKS",
    "BUDGET_SCOPES",
    "DEFAULT_ATTACKS",
    "AttackBudget",
    "ExpertProfile",
    "check_attacks",
    "profile_experts",
    "select_experts_by_budget",
    "suppress_experts",
]

ATTACKS = ("base", "routing", "refusal_suppression", "unsafe_steering")
"""The attacks :func:`~rasa_trainer.evaluation.evaluate.evaluate_safety` can run beside plain jailbreaks."""

DEFAULT_ATTACKS = ("base", "routing")
"""Run when ``attacks`` is not given, each where its input is (``base_model``, ``attack_experts``); the two attacks
that profile the evaluated model are off by default (they cost one more generation pass over the evaluation sets)."""

PROFILED_ATTACKS = ("refusal_suppression", "unsafe_steering")
BUDGET_SCOPES = ("per_layer", "total")

# the sets the profiled attacks read; the contrast class takes every set present
_PROFILE_SETS = ("anchors", "attacks", "over_refusal")


@dataclass(frozen=True)
class AttackBudget:
    """How many experts the attacker may switch off or steer toward.

    Attributes:
        experts: the number of experts (>= 1).
        scope: ``"per_layer"`` (``experts`` in every MoE layer) or ``"total"`` (``experts`` over all layers jointly).
    """

    experts: int
    scope: str = "per_layer"

    def __post_init__(self) -> None:
        if isinstance(self.experts, bool) or not isinstance(self.experts, int) or self.experts < 1:
            raise ValueError(f"attack_budget must be a whole number of experts >= 1, got {self.experts!r}")
        if self.scope not in BUDGET_SCOPES:
            raise ValueError(f"attack_budget_scope={self.scope!r}; expected one of {BUDGET_SCOPES}")

    def check(self, model: nn.Module, attack: str) -> None:
        """Raise ``ValueError`` when the budget exceeds what ``attack`` can use on ``model`` (see the module
        docstring), naming the limit and how to fix it."""
        limits = _per_layer_limits(model, attack)
        what = "switch off" if attack == "refusal_suppression" else "steer toward"
        if self.scope == "per_layer" and self.experts > min(limits):
            layer = limits.index(min(limits))
            raise ValueError(
                f"attack_budget={self.experts} experts per layer: {attack} can {what} at most {min(limits)} experts in "
                f"MoE layer {layer} ({_limit_reason(model, layer, attack)}); lower attack_budget or use "
                f"attack_budget_scope='total'")
        if self.scope == "total" and self.experts > sum(limits):
            raise ValueError(
                f"attack_budget={self.experts} experts in total: {attack} can {what} at most {sum(limits)} experts "
                f"over the model's {len(limits)} MoE layers ({_limit_reason(model, 0, attack)} per layer); lower "
                f"attack_budget")

    def to_dict(self) -> dict[str, Any]:
        return {"experts": self.experts, "scope": self.scope}


def _per_layer_limits(model: nn.Module, attack: str) -> list[int]:
    layers = moe_layers(model)
    if attack == "refusal_suppression":
        return [layer.num_experts - layer.top_k for layer in layers]
    return [layer.top_k for layer in layers]


def _limit_reason(model: nn.Module, index: int, attack: str) -> str:
    layer = moe_layers(model)[index]
    if attack == "refusal_suppression":
        return f"the router must keep top_k={layer.top_k} of its {layer.num_experts} experts"
    return f"the router places at most top_k={layer.top_k} experts"


def as_budget(budget: AttackBudget | int | None, scope: str = "per_layer") -> AttackBudget | None:
    """An :class:`AttackBudget` from an ``AttackBudget``, a number of experts (with ``scope``) or ``None``."""
    if budget is None or isinstance(budget, AttackBudget):
        return budget
    return AttackBudget(budget, scope)


def check_attacks(model: nn.Module, attacks: Sequence[str] | None, sets: Mapping[str, Any], *,
                  base_model: bool, attack_experts: bool, budget: AttackBudget | None) -> tuple[str, ...]:
    """The attacks to run, checked before any generation: known names, each attack's inputs present (``base_model``
    for ``"base"``, ``attack_experts`` for ``"routing"``, a budget and the ``anchors`` set for the profiled attacks,
    ``attacks`` for every attack but refusal suppression, which also reports on the plain harmful requests), routers
    that can be steered and a budget within each attack's limits.

    ``attacks=None`` keeps the default: ``"base"`` with a base model, ``"routing"`` with ``attack_experts``.
    """
    if isinstance(attacks, str):
        raise TypeError(f"attacks must be a list of names, got the string {attacks!r}; e.g. [{attacks!r}]")
    chosen = (tuple(a for a, given in zip(DEFAULT_ATTACKS, (base_model, attack_experts)) if given)
              if attacks is None else tuple(dict.fromkeys(attacks)))
    # an input no chosen attack reads would be recorded nowhere and ignored
    if budget is not None and not any(a in PROFILED_ATTACKS for a in chosen):
        raise ValueError(f"attack_budget is given but no attack that uses it is asked for; add "
                         f"{' or '.join(map(repr, PROFILED_ATTACKS))} to attacks")
    if attack_experts and "routing" not in chosen:
        raise ValueError("attack_experts is given but the 'routing' attack is not asked for; add 'routing' to attacks")
    if attacks is None:
        return chosen
    attacks = chosen
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; expected some of {list(ATTACKS)}")
    problems = []
    if "base" in attacks and not base_model:
        problems.append("'base' (ASR under the base model's routing) needs base_model")
    if "routing" in attacks and not attack_experts:
        problems.append("'routing' (steering toward the base model's Safety-Critical Experts) needs attack_experts")
    for attack in attacks:
        if attack != "refusal_suppression" and not sets.get("attacks"):
            problems.append(f"{attack!r} needs the 'attacks' evaluation set (the jailbreaks it reports ASR on)")
    for attack in (a for a in attacks if a in PROFILED_ATTACKS):
        if budget is None:
            problems.append(f"{attack!r} needs attack_budget (how many experts the attacker may use)")
        if not sets.get("anchors"):
            problems.append(f"{attack!r} needs the 'anchors' evaluation set (the plain harmful requests whose "
                            "refusals are profiled)")
    if problems:
        raise ValueError("attack settings: " + "; ".join(problems))
    for attack in (a for a in attacks if a in PROFILED_ATTACKS):
        for layer in moe_layers(model):
            _check_rule(layer)
        budget.check(model, attack)
    return attacks


# --------------------------------------------------------------------------------------------------------------------
# Profiling the evaluated model


@dataclass
class ExpertProfile:
    """Expert activations of the evaluated model on its refusals and on everything else it answered.

    Attributes:
        statistics: the counts; its ``adversarial`` class holds the *refusal* tokens (generated tokens of refused
            replies to plain harmful requests), its ``anchor`` class the *contrast* tokens (generated tokens of every
            reply not judged refused).
        refused_replies: replies in the refusal class.
        contrast_replies: replies in the contrast class, per set.
    """

    statistics: ExpertStatistics
    refused_replies: int
    contrast_replies: dict[str, int]

    def refusal_scores(self) -> torch.Tensor:
        """``[L, E]``: activation rate on refusal tokens minus the rate on contrast tokens."""
        return self.statistics.risk_difference()

    def compliance_scores(self) -> torch.Tensor:
        """``[L, E]``: activation rate on contrast tokens minus the rate on refusal tokens."""
        return -self.statistics.risk_difference()

    def usable(self) -> str | None:
        """Why the profile cannot rank experts (a class without tokens), or ``None``."""
        if not self.statistics.adversarial_tokens:
            return "the model refused none of the plain harmful requests, so no refusal tokens were profiled"
        if not self.statistics.anchor_tokens:
            return ("the model refused every request it was profiled on (plain harmful, jailbreaks and benign), so no "
                    "compliance or baseline tokens were profiled")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"refused_replies": self.refused_replies, "contrast_replies": dict(self.contrast_replies),
                "refusal_tokens": self.statistics.adversarial_tokens,
                "contrast_tokens": self.statistics.anchor_tokens}


def profile_experts(model: nn.Module, tokenizer: Any, sets: Mapping[str, Sequence[Mapping[str, Any]]], judge: Judge, *,
                    batch_size: int = 8, max_new_tokens: int = 32, progress: bool = True,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> ExpertProfile:
    """Profile ``model``'s experts on its refusals (see the module docstring): greedy replies to the ``anchors``,
    ``attacks`` and ``over_refusal`` rows present in ``sets``, with the routing of their generated tokens, judged by
    ``judge`` (through :func:`~rasa_trainer.judges.run_judge`: a failing judge raises). ``chat_template_kwargs``
    (e.g. ``{"enable_thinking": False}``) render the prompts as the evaluation renders them, so the profile is of the
    replies the attack is then scored on."""
    if not sets.get("anchors"):
        raise ValueError("profiling needs the 'anchors' set (plain harmful requests)")
    layers = moe_layers(model)
    stats = ExpertStatistics(len(layers), layers[0].num_experts)
    refused_total, contrast = 0, {}
    for name in (n for n in _PROFILE_SETS if sets.get(n)):
        prompts = [as_messages(row["prompt"]) for row in sets[name]]
        batches = generate_replies(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   with_routing=True, progress=progress, desc=f"profiling experts: {name}",
                                   chat_template_kwargs=chat_template_kwargs)
        contrast[name] = 0
        for batch in batches:
            refused = run_judge(judge, [prompts[i] for i in batch.rows], batch.replies)
            is_refusal = [bool(r) and name == "anchors" for r in refused]
            # ExpertStatistics' "adversarial" class holds the refusal tokens here, its "anchor" class the contrast
            stats.update(batch.routing_of(is_refusal), batch.routing_of([not r for r in refused]))
            refused_total += sum(is_refusal)
            contrast[name] += sum(not r for r in refused)
    return ExpertProfile(stats, refused_total, contrast)


def select_experts_by_budget(scores: torch.Tensor, budget: AttackBudget, per_layer_limit: Sequence[int]) -> torch.Tensor:
    """Bool mask ``[L, E]`` of the experts of highest positive ``scores`` within ``budget``: the best ``experts`` of
    every layer (``per_layer``), or the best ``experts`` over all layers (``total``) with at most
    ``per_layer_limit[l]`` in layer ``l``. Ties go to the lower layer, then the lower expert."""
    num_layers, num_experts = scores.shape
    if len(per_layer_limit) != num_layers:
        raise ValueError(f"per_layer_limit has {len(per_layer_limit)} entries for {num_layers} layers")
    flat = scores.reshape(-1).double()
    # a stable descending order: equal scores keep their flat (layer-major) order
    order = sorted(range(flat.numel()), key=lambda i: -float(flat[i]))
    mask = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    taken = [0] * num_layers
    quota = ([min(budget.experts, limit) for limit in per_layer_limit] if budget.scope == "per_layer"
             else list(per_layer_limit))
    left = budget.experts * num_layers if budget.scope == "per_layer" else budget.experts
    for i in order:
        if left == 0 or not flat[i] > 0:
            break
        layer, expert = divmod(i, num_experts)
        if taken[layer] < quota[layer]:
            mask[layer, expert] = True
            taken[layer] += 1
            left -= 1
    return mask


def experts_for(model: nn.Module, profile: ExpertProfile, budget: AttackBudget, attack: str) -> torch.Tensor:
    """The experts ``attack`` uses within ``budget``: the refusal experts for ``"refusal_suppression"``, the
    compliance experts for ``"unsafe_steering"``."""
    scores = profile.refusal_scores() if attack == "refusal_suppression" else profile.compliance_scores()
    return select_experts_by_budget(scores, budget, _per_layer_limits(model, attack))


def expert_list(mask: torch.Tensor) -> list[list[int]]:
    """``[[moe_layer, expert], ...]`` of a bool mask, in order (JSON-friendly)."""
    return [[int(l), int(e)] for l, e in mask.nonzero().tolist()]


@contextlib.contextmanager
def suppress_experts(model: nn.Module, selection: Any) -> Iterator[torch.Tensor]:
    """Switch the selected experts off at every position (GateBreaker's masking): their router score is ``-inf``, the
    router picks its top-k among the others and weighs them by its own rule (renormalised over the remaining experts
    for a softmax router, then over the top-k where it renormalises). The same hooks as
    :func:`~rasa_trainer.evaluation.steering.steer_away`; yields the bool mask ``[L, E]``."""
    with steer_away(model, selection, positions="all") as mask:
        yield mask
