"""Expert activation statistics for Safety-Critical Expert detection, accumulated batch by batch.

For every (MoE layer l, expert e) and token class X (tokens generated for successful jailbreaks, ``adversarial``; tokens
generated for refused anchors, ``anchor``):

- count(l, e | X): tokens of class X whose top-k set in layer l contains e;
- rate(l, e | X) = count(l, e | X) / tokens(X);
- risk difference RD(l, e) = rate(l, e | adversarial) - rate(l, e | anchor);
- mean router probability of e in layer l over the tokens of X (:attr:`rasa_trainer.moe.routing.Routing.probabilities`).

Memory is constant in the dataset size: only ``[L, E]`` sums are kept. Counting is one ``bincount`` over
``layer * E + expert`` for all layers and tokens of a batch; there is no Python loop over tokens or layers.
Statistics of several processes combine exactly with :meth:`ExpertStatistics.merge` or
:meth:`ExpertStatistics.all_reduce` (every state tensor is a sum).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ..moe.routing import Routing

CLASSES = ("adversarial", "anchor")

# state tensors, all sums over batches, so that merging and all-reducing are additions
_STATE = (
    "adversarial_counts",  # [L, E] int64
    "anchor_counts",
    "adversarial_prob_sum",  # [L, E] float64
    "anchor_prob_sum",
    "batch_rd_sum",  # [L, E] float64, sum over batches of the per-batch RD
    "batch_rd_sq_sum",
    "batch_votes",  # [L, E] int64, batches whose per-batch top-K holds the expert
    # [5] int64: adversarial tokens, anchor tokens, the same two counting only routings with probabilities, batches
    "totals",
)


class ExpertStatistics:
    """Accumulates per (MoE layer, expert) activation counts, rates and router probabilities of two token classes.

    Args:
        num_layers: MoE layers ``L`` of the model.
        num_experts: routed experts per MoE layer ``E``.
        vote_k: if given, every :meth:`update` also votes for the ``vote_k`` experts of highest per-batch RD above
            ``vote_threshold`` (ranked jointly over layers); the union of per-batch top-K (the authors' selection) is
            then ``batch_votes > 0``.
        vote_threshold: RD an expert must exceed in a batch to get a vote.
    """

    def __init__(self, num_layers: int, num_experts: int, *, vote_k: int | None = None, vote_threshold: float = 0.0):
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"need at least one layer and one expert, got {num_layers} x {num_experts}")
        if vote_k is not None and not 1 <= vote_k <= num_layers * num_experts:
            raise ValueError(f"vote_k must be in 1..{num_layers * num_experts}, got {vote_k}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.vote_k, self.vote_threshold = vote_k, float(vote_threshold)
        shape = (num_layers, num_experts)
        for name in _STATE:
            if name == "totals":
                setattr(self, name, torch.zeros(5, dtype=torch.int64))
            elif name.endswith(("counts", "votes")):
                setattr(self, name, torch.zeros(shape, dtype=torch.int64))
            else:
                setattr(self, name, torch.zeros(shape, dtype=torch.float64))

    # ---------------------------------------------------------------------------------------------------- counts

    @property
    def adversarial_tokens(self) -> int:
        return int(self.totals[0])

    @property
    def anchor_tokens(self) -> int:
        return int(self.totals[1])

    @property
    def num_batches(self) -> int:
        """Batches that had tokens of both classes (the batches with a per-batch RD)."""
        return int(self.totals[4])

    # ---------------------------------------------------------------------------------------------------- update

    def update(self, adversarial: Routing, anchor: Routing) -> torch.Tensor | None:
        """Add one batch: the routing of the adversarial (successful jailbreak) tokens and of the anchor (refused)
        tokens. Returns the batch's risk difference ``[L, E]`` (``None`` when a class has no tokens in the batch)."""
        adv_counts, adv_probs = self._class_sums(adversarial, "adversarial")
        anc_counts, anc_probs = self._class_sums(anchor, "anchor")
        self.adversarial_counts += adv_counts
        self.anchor_counts += anc_counts
        n_adv, n_anc = adversarial.num_tokens, anchor.num_tokens
        self.totals += torch.tensor([n_adv, n_anc, n_adv if adv_probs is not None else 0,
                                     n_anc if anc_probs is not None else 0, int(n_adv > 0 and n_anc > 0)])
        if adv_probs is not None:
            self.adversarial_prob_sum += adv_probs
        if anc_probs is not None:
            self.anchor_prob_sum += anc_probs
        if not (n_adv and n_anc):
            return None
        batch_rd = adv_counts / n_adv - anc_counts / n_anc
        self.batch_rd_sum += batch_rd
        self.batch_rd_sq_sum += batch_rd.square()
        if self.vote_k is not None:
            self.batch_votes.view(-1)[top_ranked(batch_rd.view(-1), self.vote_k, self.vote_threshold)] += 1
        return batch_rd

    def _class_sums(self, routing: Routing, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Counts ``[L, E]`` (int64) and probability sums ``[L, E]`` (float64, or None) of one class in one batch."""
        if routing.num_layers != self.num_layers:
            raise ValueError(
                f"{name} routing has {routing.num_layers} MoE layers; the statistics have {self.num_layers}"
            )
        counts = layer_expert_counts(routing.indices, self.num_experts)
        probs = None
        if routing.probabilities is not None and routing.num_tokens:
            probs = _probability_sums(routing.probabilities, self.num_experts)
        return counts, probs

    # ---------------------------------------------------------------------------------------------------- results

    def rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Activation rates ``(adversarial, anchor)``, each ``[L, E]`` float64 (zeros for a class without tokens)."""
        return (_ratio(self.adversarial_counts, self.adversarial_tokens),
                _ratio(self.anchor_counts, self.anchor_tokens))

    def risk_difference(self) -> torch.Tensor:
        """RD ``[L, E]`` = rate(adversarial) - rate(anchor), over all tokens seen (the aggregated RD)."""
        adversarial, anchor = self.rates()
        return adversarial - anchor

    def mean_probabilities(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Mean router probability ``[L, E]`` per class (None for a class whose routings carried no probabilities)."""
        n_adv, n_anc = int(self.totals[2]), int(self.totals[3])
        return (self.adversarial_prob_sum / n_adv if n_adv else None,
                self.anchor_prob_sum / n_anc if n_anc else None)

    def batch_risk_difference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation ``[L, E]`` of the per-batch RD over the batches with both classes."""
        n = self.num_batches
        if n == 0:
            zeros = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
            return zeros, zeros.clone()
        mean = self.batch_rd_sum / n
        var = (self.batch_rd_sq_sum / n - mean.square()).clamp(min=0.0)
        return mean, var.sqrt()

    # ---------------------------------------------------------------------------------------------------- combine

    def merge(self, other: "ExpertStatistics") -> "ExpertStatistics":
        """Add ``other``'s sums into this one (in place; returns self). Both must have the same shape and votes."""
        if (other.num_layers, other.num_experts, other.vote_k, other.vote_threshold) != (
            self.num_layers, self.num_experts, self.vote_k, self.vote_threshold
        ):
            raise ValueError("cannot merge statistics of different shapes or vote settings")
        for name in _STATE:
            getattr(self, name).add_(getattr(other, name))
        return self

    def all_reduce(self, group: Any = None) -> "ExpertStatistics":
        """Sum the statistics of all processes of ``group`` (in place; returns self). A no-op without distributed."""
        if distributed_world(group)[1] == 1:
            return self
        import torch.distributed as dist

        device = collective_device(group)
        for name in _STATE:
            tensor = getattr(self, name).to(device)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            setattr(self, name, tensor.cpu())
        return self

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (lists of numbers)."""
        state = {name: getattr(self, name).tolist() for name in _STATE}
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "vote_k": self.vote_k,
                "vote_threshold": self.vote_threshold, **state}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ExpertStatistics":
        stats = cls(state["num_layers"], state["num_experts"], vote_k=state["vote_k"],
                    vote_threshold=state["vote_threshold"])
        for name in _STATE:
            setattr(stats, name, torch.tensor(state[name], dtype=getattr(stats, name).dtype))
        return stats

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state as tensors (for safetensors, exact: int64 counts and float64 sums); the shape and the vote
        settings travel beside them (:meth:`settings`)."""
        return {name: getattr(self, name) for name in _STATE}

    def settings(self) -> dict[str, Any]:
        """What statistics must share to be merged: shape and per-batch vote settings."""
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "vote_k": self.vote_k,
                "vote_threshold": self.vote_threshold}

    @classmethod
    def from_state_tensors(cls, tensors: dict[str, torch.Tensor], settings: dict[str, Any]) -> "ExpertStatistics":
        """Statistics from :meth:`state_tensors` and :meth:`settings`; a missing tensor, or one of another shape or
        dtype, raises ``ValueError`` naming it."""
        stats = cls(settings["num_layers"], settings["num_experts"], vote_k=settings["vote_k"],
                    vote_threshold=settings["vote_threshold"])
        if set(tensors) != set(_STATE):
            raise ValueError(f"statistics tensors {sorted(tensors)}; expected {sorted(_STATE)}")
        for name in _STATE:
            expected, got = getattr(stats, name), tensors[name]
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise ValueError(f"statistics tensor {name} is {got.dtype} {tuple(got.shape)}; expected "
                                 f"{expected.dtype} {tuple(expected.shape)}")
            setattr(stats, name, got.clone())
        return stats


# -------------------------------------------------------------------------------------------------------- helpers


def layer_expert_counts(indices: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """``[L, E]`` int64: for each layer, how many rows of its ``[N, k]`` top-k indices contain each expert.

    One bincount over ``layer * E + index`` for all layers at once. On the CPU this runs in numpy: ``np.bincount`` is
    several times faster than ``torch.bincount``, and small elementwise torch ops split over OpenMP threads slow down
    badly when the cores are shared. On an accelerator it stays in torch.
    """
    num_layers = len(indices)
    size = num_layers * num_experts
    if num_layers == 0:
        raise ValueError("no MoE layers in the routing")
    if indices[0].numel() == 0:
        return torch.zeros(num_layers, num_experts, dtype=torch.int64)
    if indices[0].device.type != "cpu":
        stacked = torch.stack(indices).long()  # [L, N, k]
        if bool((stacked < 0).any()):
            _raise_out_of_range(num_experts)
        stacked += torch.arange(num_layers, device=stacked.device).view(-1, 1, 1) * num_experts
        counts = torch.bincount(stacked.view(-1), minlength=size)
        return _checked(counts, num_layers, num_experts, stacked[0].numel()).cpu()
    dtype = np.int16 if size <= np.iinfo(np.int16).max else np.int32  # small keys: less memory traffic
    stacked = np.stack([t.numpy() for t in indices]).astype(dtype, copy=False)  # [L, N, k], a fresh array
    stacked += (np.arange(num_layers, dtype=dtype) * num_experts)[:, None, None]
    try:
        counts = np.bincount(stacked.reshape(-1), minlength=size)
    except ValueError:  # a negative key
        _raise_out_of_range(num_experts)
    return _checked(torch.from_numpy(counts), num_layers, num_experts, stacked[0].size)


def _checked(counts: torch.Tensor, num_layers: int, num_experts: int, per_layer: int) -> torch.Tensor:
    """``counts`` as ``[L, E]`` int64 after checking that no index fell outside ``0..E-1``.

    An index out of range lands in a neighbouring layer's bins (or past the end), so some layer then holds a total
    other than ``N * k``: this O(L * E) check replaces two extra passes over the indices.
    """
    if counts.numel() != num_layers * num_experts:
        _raise_out_of_range(num_experts)
    counts = counts.view(num_layers, num_experts).to(torch.int64)
    if bool((counts.sum(dim=1) != per_layer).any()):
        _raise_out_of_range(num_experts)
    return counts


def _raise_out_of_range(num_experts: int) -> None:
    raise ValueError(f"routing indices fall outside 0..{num_experts - 1}; were they recorded on this model?")


def _probability_sums(probabilities: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """``[L, E]`` float64 sums over tokens of the router probabilities of every layer."""
    if probabilities[0].shape[-1] != num_experts:
        raise ValueError(f"probabilities have {probabilities[0].shape[-1]} experts; expected {num_experts}")
    if probabilities[0].device.type != "cpu":
        return torch.stack(probabilities).sum(dim=1, dtype=torch.float64).cpu()
    stacked = np.stack([p.detach().numpy() for p in probabilities])  # [L, N, E]
    return torch.from_numpy(stacked.sum(axis=1, dtype=np.float64))


def _ratio(counts: torch.Tensor, tokens: int) -> torch.Tensor:
    return counts.double() / tokens if tokens else torch.zeros_like(counts, dtype=torch.float64)


def top_ranked(scores: torch.Tensor, k: int, threshold: float | None = None) -> torch.Tensor:
    """Flat positions (in increasing order) of the ``k`` highest ``scores`` strictly above ``threshold``; fewer when
    fewer qualify.

    Ties at the k-th value go to the lower position (the earlier layer), so selections are deterministic. Uses
    ``topk`` for the k-th value rather than a full sort (this runs once per batch for the per-batch votes).
    """
    scores = scores.reshape(-1)
    if k >= scores.numel():
        chosen = torch.arange(scores.numel())
    else:
        kth = torch.topk(scores, k).values[-1]
        above = (scores > kth).nonzero().view(-1)
        ties = (scores == kth).nonzero().view(-1)[: k - above.numel()]
        chosen = torch.cat([above, ties]).sort().values
    if threshold is not None:
        chosen = chosen[scores[chosen] > threshold]
    return chosen


# -------------------------------------------------------------------------------------------------------- distributed


def distributed_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of the default (or given) process group; ``(0, 1)`` without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group: Any = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_json(obj: Any, group: Any = None) -> list[Any]:
    """Gather one JSON-serialisable object from every process, in rank order (JSON bytes on the wire, no pickle)."""
    rank, world = distributed_world(group)
    if world == 1:
        return [obj]
    import torch.distributed as dist

    device = collective_device(group)
    payload = torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], device=device), group=group)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [json.loads(bytes(g[: int(s)].cpu().tolist()).decode()) for g, s in zip(gathered, sizes)]
