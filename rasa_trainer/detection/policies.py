"""Selection policies: how Safety-Critical Experts are chosen from the risk differences. One registry, the only place
policy names live: :class:`~rasa_trainer.detection.selection.SelectionConfig`, ``RASAConfig.sce_policy`` and the
``--policy`` / ``--sce_policy`` choices of the command line all read it.

Built in:

- ``global_topk`` (default): the K experts of highest RD above ``threshold``, ranked jointly across layers.
- ``per_layer_topk``: in every MoE layer, the K experts of highest RD above ``threshold``.
- ``batch_union``: the union over batches of each batch's global top-K above ``threshold`` (the authors' code).
- ``per_layer_top_p``: ESFT style; in every layer, experts with positive RD (and RD above ``threshold``) are ranked and
  taken until their share of the layer's positive RD mass reaches ``top_p_experts``.
- ``random``: K experts drawn uniformly with ``seed`` (ablation; ignores RD).

Adding a policy is one function and one registration, in this file or in any module imported before the policy is
used::

    @register_policy("lowest_layer_topk")
    def lowest_layer_topk(stats: ExpertStatistics, config: SelectionConfig) -> torch.Tensor:
        \"\"\"The K experts of highest RD in the first MoE layer.\"\"\"
        mask = torch.zeros(stats.num_layers, stats.num_experts, dtype=torch.bool)
        rd = stats.risk_difference()
        mask[0, top_ranked(rd[0], config.resolve_k(stats.num_experts), config.threshold)] = True
        return mask

A policy takes the :class:`~rasa_trainer.detection.statistics.ExpertStatistics` and the ``SelectionConfig`` and returns
a bool mask ``[L, E]``; an empty mask is reported by ``select_experts`` with the statistics. ``k_pool`` says what
``num_experts`` counts against when it is a fraction (``"all"``: the ``L * E`` routed experts, ``"layer"``: the ``E``
of one layer, ``None``: the policy takes no K); ``batch_votes=True`` asks detection for the per-batch votes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .statistics import ExpertStatistics, top_ranked

if TYPE_CHECKING:
    from .selection import SelectionConfig

__all__ = ["POLICY_NAMES", "SelectionPolicy", "get_policy", "policy_names", "register_policy"]

K_POOLS = ("all", "layer", None)


@dataclass(frozen=True)
class SelectionPolicy:
    """A registered selection policy: its name, the function that selects and how K is counted for it."""

    name: str
    select: Callable[[ExpertStatistics, "SelectionConfig"], torch.Tensor]
    k_pool: str | None = "all"
    batch_votes: bool = False


POLICY_REGISTRY: dict[str, SelectionPolicy] = {}  # name -> policy, in registration order


def register_policy(name: str, *, k_pool: str | None = "all", batch_votes: bool = False):
    """Register the decorated function ``select(stats, config) -> bool mask [L, E]`` as the policy ``name``.

    Raises:
        ValueError: ``name`` is taken (by a built-in policy or an earlier registration), or ``k_pool`` is not one of
            ``"all"``, ``"layer"``, ``None``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a selection policy needs a non-empty name, got {name!r}")
    if k_pool not in K_POOLS:
        raise ValueError(f"k_pool={k_pool!r}; expected one of {K_POOLS}")

    def decorator(select: Callable[[ExpertStatistics, "SelectionConfig"], torch.Tensor]):
        if name in POLICY_REGISTRY:
            taken = POLICY_REGISTRY[name].select
            raise ValueError(f"selection policy {name!r} is already registered "
                             f"({taken.__module__}.{taken.__qualname__}); choose another name")
        POLICY_REGISTRY[name] = SelectionPolicy(name, select, k_pool, batch_votes)
        return select

    return decorator


def policy_names() -> tuple[str, ...]:
    """The registered policy names, in registration order."""
    return tuple(POLICY_REGISTRY)


def get_policy(name: str) -> SelectionPolicy:
    """The policy registered as ``name``; a ``ValueError`` listing the registered names otherwise."""
    policy = POLICY_REGISTRY.get(name) if isinstance(name, str) else None
    if policy is None:
        raise ValueError(f"policy={name!r} is not a registered selection policy; expected one of "
                         f"{', '.join(POLICY_REGISTRY)} (rasa_trainer.detection.policies.register_policy adds one)")
    return policy


class _RegisteredNames(Sequence):
    """The registered policy names, read at every use (``in``, iteration, ``list()``): argparse ``choices`` and
    ``RASAConfig``'s check see policies registered after they were defined."""

    def __getitem__(self, index):
        return policy_names()[index]

    def __len__(self) -> int:
        return len(POLICY_REGISTRY)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in POLICY_REGISTRY

    def __iter__(self):
        return iter(policy_names())

    def __repr__(self) -> str:
        return repr(policy_names())

    def __reduce__(self):  # pickles (e.g. inside dataclass field metadata) as the one shared view
        return "POLICY_NAMES"


POLICY_NAMES: Sequence[str] = _RegisteredNames()
"""The registered policy names as a live sequence (the ``choices`` of ``RASAConfig.sce_policy`` and of the CLI)."""


# ------------------------------------------------------------------------------------------------------------ built in


@register_policy("global_topk")
def global_topk(stats: ExpertStatistics, config: "SelectionConfig") -> torch.Tensor:
    """The K experts of highest RD above the threshold, ranked jointly across layers."""
    L, E = stats.num_layers, stats.num_experts
    mask = torch.zeros(L * E, dtype=torch.bool)
    mask[top_ranked(stats.risk_difference().view(-1), config.resolve_k(L * E), config.threshold)] = True
    return mask.view(L, E)


@register_policy("per_layer_topk", k_pool="layer")
def per_layer_topk(stats: ExpertStatistics, config: "SelectionConfig") -> torch.Tensor:
    """In every MoE layer, the K experts of highest RD above the threshold; ties to the lower expert index."""
    rd = stats.risk_difference()
    k = config.resolve_k(stats.num_experts)
    order = torch.sort(rd, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(rd, dtype=torch.bool)
    mask.scatter_(1, order, rd.gather(1, order) > config.threshold)
    return mask


@register_policy("batch_union", batch_votes=True)
def batch_union(stats: ExpertStatistics, config: "SelectionConfig") -> torch.Tensor:
    """The union over batches of each batch's global top-K above the threshold (the authors' code)."""
    expected = config.resolve_k(stats.num_layers * stats.num_experts)
    if stats.vote_k != expected or stats.vote_threshold != float(config.threshold):
        raise ValueError(
            f"policy 'batch_union' needs statistics that voted with vote_k={expected} and "
            f"vote_threshold={config.threshold}, got vote_k={stats.vote_k}, vote_threshold={stats.vote_threshold}; "
            f"create ExpertStatistics(L, E, vote_k=config.resolve_k(L * E), vote_threshold=config.threshold)"
        )
    return stats.batch_votes > 0


@register_policy("per_layer_top_p", k_pool=None)
def per_layer_top_p(stats: ExpertStatistics, config: "SelectionConfig") -> torch.Tensor:
    """Per layer, the fewest experts of highest positive RD whose share of the layer's positive RD reaches
    ``top_p_experts`` (ESFT style)."""
    rd = stats.risk_difference()
    scores = torch.where(rd > max(config.threshold, 0.0), rd, torch.zeros_like(rd))
    total = scores.sum(dim=1, keepdim=True)
    share = scores / total.clamp(min=torch.finfo(scores.dtype).tiny)
    sorted_share, order = torch.sort(share, dim=1, descending=True, stable=True)
    before = sorted_share.cumsum(dim=1) - sorted_share  # share already covered before this expert
    take = (before < config.top_p_experts - 1e-12) & (sorted_share > 0)
    return torch.zeros_like(rd, dtype=torch.bool).scatter_(1, order, take)


@register_policy("random")
def random_experts(stats: ExpertStatistics, config: "SelectionConfig") -> torch.Tensor:
    """K experts drawn uniformly with the seed (an ablation; ignores RD). The same seed on every rank gives the same
    experts everywhere."""
    L, E = stats.num_layers, stats.num_experts
    mask = torch.zeros(L * E, dtype=torch.bool)
    generator = torch.Generator().manual_seed(config.seed)
    mask[torch.randperm(L * E, generator=generator)[: config.resolve_k(L * E)]] = True
    return mask.view(L, E)
