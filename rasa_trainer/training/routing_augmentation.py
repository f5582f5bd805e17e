"""Routing-robust repair: the expert phase trains a share of its rows under routing an attacker could impose.

The expert phase replays, exactly, the routing every training row received at the phase start. A repair trained only
under that routing may not hold when an attacker with the open weights steers the routers (SteerMoE's activation,
:func:`rasa_trainer.evaluation.steering.steer_toward`). With ``routing_augmentation`` set, each pair row of an
expert-phase batch is, with probability ``routing_augmentation_rate``, trained under a perturbed routing instead;
the other rows (and every retain row) keep exact replay. The perturbation families:

- ``force``: the routing attack. In every MoE layer with a selected expert, the selected experts take the top-k
  slots with the attack's weights: their log-probability becomes the row's maximum plus ``margin``, so (renormalised
  over the new top-k, as the router does) a forced expert weighs ``p_max * exp(margin)`` against ``p_i`` for each of
  the row's own top experts that keep a slot. The top-k weights of a renormalising softmax router depend only on the
  probabilities of the chosen experts, all of which the replayed top-k holds (the highest one included), so this is
  exactly the routing :func:`~rasa_trainer.evaluation.steering.boosted_routing` gives. With more selected experts
  than slots in a layer, ``top_k`` of them are drawn (the attack's tie, broken at random), with equal weights.
- ``force_equal``: the selected experts forced in as by ``force``, then every top-k weight equal.
- ``equal``: the replayed experts kept, their weights equalised (an attacker flattening the routers' preference).

Weights keep the row's top-k sum (the router's scale), so a renormalising router's rule holds after the change.
Only routers that renormalise a softmax top-k are supported (``top_k`` weights alone determine the attack's weights
there); others are refused when the trainer is built.

Which positions change (``positions``): ``reply`` the positions whose next token is a completion token (the decision
position, the prompt's last, and every reply position: where the routing attack acts at every generated position),
``decision`` the decision position only (where the attack that steers the reply's first token acts), ``mixed`` one of
the two per perturbed row (drawn with equal odds), ``all`` every real position of the row (SteerMoE's attack).

Determinism: the rows and their perturbations follow from a generator seeded with (run seed, epoch, the batch's
cache rows), never from the global RNG, so a step gives the same routing when it is re-run or resumed. Rate 0 gives
the replayed routing itself (the same tensors).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from ..moe.discovery import moe_layers
from ..moe.routing import Routing

__all__ = ["AUGMENTATION_FAMILIES", "AUGMENTATION_POSITIONS", "RoutingAugmentation", "augment_routing",
           "check_augmentation_supported"]

AUGMENTATION_FAMILIES = ("none", "force", "force_equal", "equal")
"""``routing_augmentation`` values (``none``: exact replay everywhere, the default)."""
AUGMENTATION_POSITIONS = ("reply", "decision", "mixed", "all")
"""``routing_augmentation_positions`` values."""


def check_augmentation_options(family: str, rate: float, margin: float, positions: str) -> None:
    """Raise ``ValueError`` naming the first invalid option."""
    if family not in AUGMENTATION_FAMILIES:
        raise ValueError(f"routing_augmentation={family!r} is not one of {list(AUGMENTATION_FAMILIES)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and 0 <= rate <= 1):
        raise ValueError(f"routing_augmentation_rate={rate!r}; it must be a number in [0, 1] (the share of pair rows "
                         f"trained under the perturbed routing)")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"routing_augmentation_margin={margin!r}; it must be a finite number >= 0 (added to the row's "
                         f"maximum log-probability, as the routing attack does)")
    if positions not in AUGMENTATION_POSITIONS:
        raise ValueError(f"routing_augmentation_positions={positions!r} is not one of {list(AUGMENTATION_POSITIONS)}")


def check_augmentation_supported(model: torch.nn.Module) -> None:
    """Refuse models whose routers do not renormalise a softmax top-k (their attack weights need the probabilities
    of experts outside the replayed top-k, which the routing cache does not hold)."""
    for layer in moe_layers(model):
        if layer.rule.kind != "softmax" or not layer.rule.normalize:
            raise ValueError(
                f"routing_augmentation needs routers that renormalise a softmax top-k; MoE layer {layer.index} "
                f"({layer.router_name}) uses {layer.rule.kind!r} with normalize={layer.rule.normalize}. Set "
                f"routing_augmentation='none' for this model"
            )


def step_generator(seed: int, epoch: int, rows: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded from the run seed, the epoch and the batch's cache rows (stable across processes and
    Python runs: no ``hash()``)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{int(seed)}/{int(epoch)}/".encode())
    digest.update(rows.detach().cpu().to(torch.int64).numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


def augment_routing(routing: Routing, experts_by_layer: Mapping[int, list[int]], *, family: str, rate: float,
                    positions: torch.Tensor, generator: torch.Generator, margin: float = 0.01,
                    rows_per_batch: int | None = None) -> Routing:
    """The routing with a share ``rate`` of its rows perturbed by ``family`` (see the module docstring).

    Args:
        routing: a batch's replayed routing (``[B * S, k]`` per MoE layer, row-major).
        experts_by_layer: the selected experts per MoE layer (the ones ``force`` puts in the top-k).
        family: one of :data:`AUGMENTATION_FAMILIES`.
        rate: the probability that a row is perturbed (each eligible row drawn independently).
        positions: bool ``[B, S]``: the positions a perturbed row changes (its other positions keep replay).
        generator: the step's generator (:func:`step_generator`).
        margin: ``force``'s margin over the row's maximum log-probability (the attack's).
        rows_per_batch: only the first this many rows may be perturbed (the pair rows; retain rows follow them).

    Returns ``routing`` itself when nothing is perturbed (rate 0, family ``none``, no row drawn).
    """
    check_augmentation_options(family, rate, margin, "all")
    if positions.dim() != 2 or positions.numel() != routing.num_tokens:
        raise ValueError(f"positions has shape {tuple(positions.shape)}; expected [batch, seq] covering the routing's "
                         f"{routing.num_tokens} positions")
    batch, seq = positions.shape
    eligible = batch if rows_per_batch is None else min(int(rows_per_batch), batch)
    chosen = torch.zeros(batch, dtype=torch.bool)
    chosen[:eligible] = torch.rand(eligible, generator=generator) < rate
    if family == "none" or not chosen.any():
        return routing
    where = (positions.cpu().bool() & chosen.unsqueeze(1)).reshape(-1)
    indices, weights = list(routing.indices), list(routing.weights)
    for layer, (idx, w) in enumerate(zip(routing.indices, routing.weights)):
        experts = sorted(int(e) for e in experts_by_layer.get(layer, []))
        if family != "equal" and not experts:
            continue  # the attack leaves layers without a selected expert alone
        rows = where.to(idx.device)
        sub_idx, sub_w = idx[rows].long(), w[rows].float()
        if family == "equal":
            new_idx, new_w = sub_idx, _equal(sub_w)
        else:
            new_idx, new_w = _forced(sub_idx, sub_w, experts, margin, generator)
            if family == "force_equal":
                new_w = _equal(new_w)
        indices[layer], weights[layer] = idx.clone(), w.clone()
        indices[layer][rows] = new_idx.to(idx.dtype)
        weights[layer][rows] = new_w.to(w.dtype)
    return Routing(indices, weights, routing.probabilities)


def _equal(weights: torch.Tensor) -> torch.Tensor:
    """Every top-k weight equal, keeping each row's sum."""
    return weights.sum(dim=-1, keepdim=True).expand_as(weights) / weights.shape[-1]


def _forced(idx: torch.Tensor, w: torch.Tensor, experts: list[int], margin: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The attack's top-k of rows whose replayed top-k is ``(idx, w)`` ``[n, k]``: the selected ``experts`` forced in
    at ``p_max * exp(margin)``, the rest of the slots to the rows' own highest other experts, renormalised to each
    row's sum."""
    n, k = idx.shape
    total = w.sum(dim=-1, keepdim=True)
    selected = torch.tensor(experts, dtype=torch.long)
    if len(experts) >= k:
        # all forced experts tie at the same log-probability: the attack keeps top_k of them (drawn here)
        order = torch.rand(n, len(experts), generator=generator).argsort(dim=-1)[:, :k]
        return selected[order], total.expand(n, k) / k
    forced_weight = w.max(dim=-1, keepdim=True).values * math.exp(margin)
    is_selected = (idx.unsqueeze(-1) == selected).any(dim=-1)
    # the row's own experts that are not forced, highest first; k - len(experts) of them keep a slot
    ranked = w.masked_fill(is_selected, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    kept = ranked[:, :k - len(experts)]
    new_idx = torch.cat([selected.expand(n, -1), idx.gather(1, kept)], dim=1)
    raw = torch.cat([forced_weight.expand(n, len(experts)), w.gather(1, kept)], dim=1)
    return new_idx, raw / raw.sum(dim=-1, keepdim=True) * total


def reply_positions(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, S]``: the positions whose next token is a completion token (labels ``!= -100``): the decision
    position and every reply position."""
    nxt = torch.zeros_like(attention_mask, dtype=torch.bool)
    nxt[:, :-1] = labels[:, 1:] != -100
    return nxt & attention_mask.bool()


class RoutingAugmentation:
    """The expert phase's routing augmentation of one run: given a batch's replayed routing, its cache rows and the
    epoch, the routing it trains under (:func:`augment_routing` with the run's options and a step generator)."""

    def __init__(self, family: str, rate: float, *, experts_by_layer: Mapping[int, list[int]], seed: int,
                 margin: float = 0.01, positions: str = "reply"):
        check_augmentation_options(family, rate, margin, positions)
        if family != "none" and not any(experts_by_layer.values()) and family != "equal":
            raise ValueError(f"routing_augmentation={family!r} forces the selected experts, but the selection is empty")
        self.family, self.rate, self.margin, self.positions = family, float(rate), float(margin), positions
        self.experts_by_layer = {int(k): list(v) for k, v in experts_by_layer.items()}
        self.seed = int(seed)

    @property
    def active(self) -> bool:
        return self.family != "none" and self.rate > 0

    def __call__(self, routing: Routing, inputs: Mapping[str, torch.Tensor], rows: torch.Tensor, epoch: int) -> Routing:
        """``routing`` of the batch ``inputs`` (cache rows ``rows``; its pair rows first, as many as
        ``inputs["rasa_index"]``) perturbed for ``epoch``."""
        if not self.active:
            return routing
        mask = inputs["attention_mask"].cpu()
        generator = step_generator(self.seed, epoch, rows)
        if self.positions == "all":
            where = mask.bool()
        else:
            reply = reply_positions(inputs["labels"].cpu(), mask)
            decision = reply & (reply.cumsum(dim=1) == 1)  # the first position that predicts a completion token
            if self.positions == "mixed":  # drawn first, so the row draw that follows is the same generator's
                use_decision = torch.rand(mask.shape[0], generator=generator) < 0.5
                where = torch.where(use_decision.unsqueeze(1), decision, reply)
            else:
                where = decision if self.positions == "decision" else reply
        return augment_routing(routing, self.experts_by_layer, family=self.family, rate=self.rate, positions=where,
                               generator=generator, margin=self.margin,
                               rows_per_batch=int(inputs["rasa_index"].numel()))
