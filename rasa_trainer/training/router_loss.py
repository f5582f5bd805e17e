"""The router phase's loss: KL between the router probabilities of the anchor and the adversarial contexts, per pair
(or pooled per micro-batch), averaged over the MoE layers, scaled so the objective does not depend on how the pairs are
batched, accumulated or spread over processes.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import torch

from ..moe.replay_cache import assignment_shift
from ..moe.routing import record_routing

def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [N, E]`` over the rows where the flat ``mask [N]`` is set."""
    mask = mask.reshape(-1).to(values.device)
    if not mask.any():
        raise ValueError("a batch has no context tokens to average router probabilities over")
    return values[mask].mean(dim=0)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension (one value per leading index)."""
    eps = 1e-12
    return (p * ((p + eps).log() - (q + eps).log())).sum(dim=-1)


def _per_pair_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example, the mean of ``values [B * T, E]`` over its positions where ``mask [B, T]`` is set: ``[B, E]``."""
    batch, length = mask.shape
    weights = mask.to(values.device, values.dtype).reshape(batch, length, 1)
    counts = weights.sum(dim=1)
    if (counts == 0).any():
        raise ValueError("an example has no context tokens to average router probabilities over")
    return (values.reshape(batch, length, -1) * weights).sum(dim=1) / counts


class RouterLossMixin:
    """RASATrainer's router-consistency loss."""

    def _router_loss(self, model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch, context=None):
        """The router-consistency loss of one micro-batch: KL(anchor || adversarial) (``kl_direction``) of the router
        probability over experts, averaged over the MoE layers.

        ``router_loss="pooled"`` (the authors'): token-mean probabilities over all anchor tokens and all prompt
        tokens of the micro-batch, one KL per micro-batch and process. ``"per_pair"``: token-mean probabilities per
        example, one KL per (adversarial, anchor) pair, averaged over the pairs of the whole optimiser step (every
        micro-batch and process), so the objective does not depend on how the pairs are batched.
        """
        if anchor_ids is None:
            raise ValueError("the router phase needs anchor contexts; the batch has no anchor_input_ids")
        if context is None:
            context = inputs["rasa_context_mask"] if "rasa_context_mask" in inputs else (
                (inputs["labels"] == -100) & inputs["attention_mask"].bool())
        context = context.bool() & inputs["attention_mask"].bool()
        with torch.no_grad(), record_routing(model, probabilities=True) as anchor_rec:
            model(input_ids=anchor_ids, attention_mask=anchor_mask, use_cache=False, logits_to_keep=1)
        with record_routing(model, probabilities=True, detach=False) as adv_rec:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                            logits_to_keep=1)
        anchor, adversarial = anchor_rec.routing(), adv_rec.routing()
        per_pair = self.args.router_loss == "per_pair"
        terms = []
        for p_anchor_tokens, p_adv_tokens in zip(anchor.probabilities, adversarial.probabilities):
            if per_pair:
                p_anchor = _per_pair_mean(p_anchor_tokens, anchor_mask.bool())  # [B, E]
                p_adv = _per_pair_mean(p_adv_tokens, context)
                terms.append(self._kl_term(p_anchor, p_adv))  # [B]
            else:
                p_anchor = _masked_mean(p_anchor_tokens, anchor_mask.bool())
                p_adv = _masked_mean(p_adv_tokens, context)
                terms.append(self._kl_term(p_anchor, p_adv))
        kl = torch.stack(terms).mean(dim=0)  # mean over MoE layers: a scalar (pooled) or one value per pair
        # a zero-valued path through the model's output: FSDP2 re-gathers a unit's parameters for backward from its
        # output's gradient hooks, and the router terms alone leave the last units without one
        kl = kl + 0.0 * outputs.logits.float().sum()
        self._metrics["train"]["router_kl"].append(kl.detach().mean().item())
        if self._initial_routing is not None and rows is not None:
            # prompt tokens of this batch, now vs at the start of the run
            start = self._initial_routing.batch_routing(self._positions(rows), inputs["attention_mask"])
            flat = context.reshape(-1).cpu()
            shift = assignment_shift(adversarial.stacked_indices().cpu()[flat], start.stacked_indices()[flat])
            self._metrics["train"]["routing_shift_prompt"].append(float(shift))
        trainer_divides = not self._loss_scaled_for_accumulation(num_items_in_batch)
        if per_pair:
            if not (self.is_in_train and self._pairs_in_step):
                return kl.mean()  # outside Trainer's loop: the mean over this batch's pairs
            # sum over this micro-batch's pairs / pairs of the whole step on every process; DDP averages gradients
            # over processes, hence the factor; Trainer's own division by the accumulation steps is undone
            loss = kl.sum() * self.accelerator.num_processes / self._pairs_in_step
            return loss * self.current_gradient_accumulation_steps if trainer_divides else loss
        # a micro-batch mean: averaged over the accumulation steps (by Trainer, or here when Trainer leaves it to
        # the loss); DDP averages the processes' gradients
        return kl if trainer_divides else kl / self.current_gradient_accumulation_steps

    def _kl_term(self, p_anchor: torch.Tensor, p_adv: torch.Tensor) -> torch.Tensor:
        direction = self.args.kl_direction
        if direction == "forward":
            return _kl(p_anchor, p_adv)
        if direction == "reverse":
            return _kl(p_adv, p_anchor)
        return 0.5 * (_kl(p_anchor, p_adv) + _kl(p_adv, p_anchor))

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether Trainer.training_step takes the loss as already averaged over the accumulation steps (the rule it
        applies: ``loss_is_scaled_for_ga``, else a loss normalised by ``num_items_in_batch``)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
