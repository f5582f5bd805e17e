"""The router phase's loss: the two forwards (anchor context without gradients, adversarial context with them), the
router-consistency KL between their router probabilities (``losses.router_consistency_kl``), the count of pairs in the
optimiser step the per-pair form divides by, and the scaling that keeps the objective independent of how the pairs are
batched, accumulated or spread over processes (``losses.scale_router_loss``).

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..moe.routing import Routing, record_routing
from .losses import kl as _kl  # noqa: F401 - the names the distributed test jobs import from here
from .losses import masked_mean as _masked_mean  # noqa: F401
from .losses import router_consistency_kl, scale_router_loss

__all__ = ["RouterLoss", "router_context"]


def router_context(inputs: dict[str, torch.Tensor], context: torch.Tensor | None = None) -> torch.Tensor:
    """The adversarial tokens the router probabilities are averaged over: ``context`` (the prompt tokens the collator
    marks), else the batch's ``rasa_context_mask``, else its unlabelled real tokens; never padding."""
    if context is None:
        context = inputs["rasa_context_mask"] if "rasa_context_mask" in inputs else (
            (inputs["labels"] == -100) & inputs["attention_mask"].bool())
    return context.bool() & inputs["attention_mask"].bool()


class RouterLoss:
    """The router-consistency loss of the router phase: ``router_loss`` (``per_pair`` or ``pooled``) and
    ``kl_direction`` (``forward``, ``reverse``, ``symmetric``).

    ``router_loss="pooled"`` (the authors'): token-mean probabilities over all anchor tokens and all prompt tokens of
    the micro-batch, one KL per micro-batch and process. ``"per_pair"``: token-mean probabilities per example, one KL
    per (adversarial, anchor) pair, averaged over the pairs of the whole optimiser step (every micro-batch and
    process), so the objective does not depend on how the pairs are batched.
    """

    def __init__(self, router_loss: str = "per_pair", kl_direction: str = "forward"):
        self.per_pair = router_loss == "per_pair"
        self.direction = kl_direction
        self.pairs_in_step: int | None = None  # pairs of the current optimiser step on every process (per_pair)

    def count_step_pairs(self, batch_samples: list[dict], device: torch.device | str, num_processes: int = 1,
                         gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """The pairs of the optimiser step ``batch_samples`` make, over every micro-batch and (with ``gather``)
        every process, as Trainer counts ``num_items_in_batch`` for tokens."""
        pairs = torch.tensor(sum(int(b["input_ids"].shape[0]) for b in batch_samples), device=device)
        if num_processes > 1:
            pairs = gather(pairs.reshape(1)).sum()
        self.pairs_in_step = int(pairs)

    def kl(self, model: nn.Module, inputs: dict[str, torch.Tensor], anchor_ids: torch.Tensor | None,
           anchor_mask: torch.Tensor, context: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        """The KL of one micro-batch (``inputs``: the adversarial contexts) averaged over the MoE layers (per pair
        ``[B]``, or pooled: a scalar), the adversarial forward's routing, and the context mask it averaged over
        (see :func:`router_context`)."""
        if anchor_ids is None:
            raise ValueError("the router phase needs anchor contexts; the batch has no anchor_input_ids")
        context = router_context(inputs, context)
        with torch.no_grad(), record_routing(model, probabilities=True) as anchor_rec:
            model(input_ids=anchor_ids, attention_mask=anchor_mask, use_cache=False, logits_to_keep=1)
        with record_routing(model, probabilities=True, detach=False) as adv_rec:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                            logits_to_keep=1)
        anchor, adversarial = anchor_rec.routing(), adv_rec.routing()
        kl = router_consistency_kl(anchor.probabilities, adversarial.probabilities, anchor_mask.bool(), context,
                                   per_pair=self.per_pair, direction=self.direction)
        # a zero-valued path through the model's output: FSDP2 re-gathers a unit's parameters for backward from its
        # output's gradient hooks, and the router terms alone leave the last units without one
        return kl + 0.0 * outputs.logits.float().sum(), adversarial, context

    def scale(self, kl: torch.Tensor, *, in_train: bool, num_processes: int, accumulation_steps: int,
              trainer_divides: bool) -> torch.Tensor:
        """The micro-batch loss to backpropagate (see ``losses.scale_router_loss``); outside Trainer's loop
        (``in_train`` false) the per-pair form is the mean over the micro-batch's pairs."""
        return scale_router_loss(kl, per_pair=self.per_pair, pairs_in_step=self.pairs_in_step if in_train else None,
                                 num_processes=num_processes, accumulation_steps=accumulation_steps,
                                 trainer_divides=trainer_divides)
