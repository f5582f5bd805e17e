"""The RASA losses as pure functions of tensors: the router-consistency KL, the retain-weighted cross-entropy, and the
rules that scale a micro-batch's loss for gradient accumulation and processes.

Nothing here runs a model or reads a trainer: the callers (``router_loss.py``, ``retain.py``, the trainer) hand in
router probabilities, per-token log-probabilities, masks and counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_EPS = 1e-12


# ------------------------------------------------------------------------------------------ router-consistency KL


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension (one value per leading index)."""
    return (p * ((p + _EPS).log() - (q + _EPS).log())).sum(dim=-1)


def directed_kl(p_anchor: torch.Tensor, p_adversarial: torch.Tensor, direction: str) -> torch.Tensor:
    """``forward``: KL(anchor || adversarial); ``reverse``: KL(adversarial || anchor); ``symmetric``: their mean."""
    if direction == "forward":
        return kl(p_anchor, p_adversarial)
    if direction == "reverse":
        return kl(p_adversarial, p_anchor)
    return 0.5 * (kl(p_anchor, p_adversarial) + kl(p_adversarial, p_anchor))


def check_mean_mask(mask: torch.Tensor, per_pair: bool) -> None:
    """Refuse a mask that leaves nothing to average: no set position at all (pooled) or an example without one
    (``per_pair``). One host read per mask: callers check once per step, not once per MoE layer."""
    empty = bool((mask.reshape(mask.shape[0], -1).sum(dim=1) == 0).any()) if per_pair else not bool(mask.any())
    if empty:
        what = "an example has" if per_pair else "a batch has"
        raise ValueError(f"{what} no context tokens to average router probabilities over")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Mean of ``values [N, E]`` over the rows where the flat ``mask [N]`` is set (``check=False``: the caller has
    checked the mask with :func:`check_mean_mask`)."""
    if check:
        check_mean_mask(mask, per_pair=False)
    weights = mask.reshape(-1, 1).to(values.device, values.dtype)
    return (values * weights).sum(dim=0) / weights.sum()


def per_pair_mean(values: torch.Tensor, mask: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Per example, the mean of ``values [B * T, E]`` over its positions where ``mask [B, T]`` is set: ``[B, E]``
    (``check=False``: the caller has checked the mask with :func:`check_mean_mask`)."""
    if check:
        check_mean_mask(mask, per_pair=True)
    batch, length = mask.shape
    weights = mask.to(values.device, values.dtype).reshape(batch, length, 1)
    return (values.reshape(batch, length, -1) * weights).sum(dim=1) / weights.sum(dim=1)


def router_consistency_kl(anchor_probabilities: Sequence[torch.Tensor],
                          adversarial_probabilities: Sequence[torch.Tensor], anchor_mask: torch.Tensor,
                          context_mask: torch.Tensor, *, per_pair: bool, direction: str) -> torch.Tensor:
    """The router-consistency KL averaged over the MoE layers.

    Each sequence holds one ``[B * T, E]`` tensor of router probabilities per MoE layer (the anchor and the adversarial
    contexts); ``anchor_mask [B, T_a]`` and ``context_mask [B, T]`` mark the tokens averaged over. ``per_pair``: one
    KL per (anchor, adversarial) pair between token-mean probabilities per example (``[B]``); else pooled: one KL
    between the token means over the whole micro-batch (a scalar).
    """
    check_mean_mask(anchor_mask, per_pair)  # once per step: the masks are the same for every MoE layer
    check_mean_mask(context_mask, per_pair)
    mean = per_pair_mean if per_pair else masked_mean
    terms = [directed_kl(mean(p_anchor, anchor_mask, check=False), mean(p_adversarial, context_mask, check=False),
                         direction)
             for p_anchor, p_adversarial in zip(anchor_probabilities, adversarial_probabilities)]
    return torch.stack(terms).mean(dim=0)


# ------------------------------------------------------------------------------------------ scaling rules


def loss_scaled_for_accumulation(loss_is_scaled_for_ga: bool | None, model_accepts_loss_kwargs: bool,
                                 num_items_in_batch: torch.Tensor | int | None,
                                 compute_loss_func: Callable | None) -> bool:
    """Whether ``Trainer.training_step`` takes a loss as already averaged over the accumulation steps (its rule:
    ``loss_is_scaled_for_ga`` when set, else a loss normalised by ``num_items_in_batch`` or a custom loss function);
    when it does not, Trainer divides the loss by the accumulation steps itself."""
    if loss_is_scaled_for_ga is not None:
        return bool(loss_is_scaled_for_ga)
    return bool((model_accepts_loss_kwargs and num_items_in_batch is not None) or compute_loss_func is not None)


def scale_router_loss(kl_values: torch.Tensor, *, per_pair: bool, pairs_in_step: int | None, num_processes: int,
                      accumulation_steps: int, trainer_divides: bool) -> torch.Tensor:
    """The micro-batch loss Trainer backpropagates, so the optimiser step minimises the intended objective.

    ``per_pair``: ``kl_values`` holds one KL per pair of the micro-batch; the objective is the mean over the
    ``pairs_in_step`` pairs of the whole optimiser step (every micro-batch and process). DDP averages gradients over
    processes (hence the factor ``num_processes``), and Trainer's own division by the accumulation steps is undone.
    Without ``pairs_in_step`` (outside Trainer's loop) it is the mean over the micro-batch's pairs.
    Pooled: ``kl_values`` is the micro-batch's KL, averaged over the accumulation steps (by Trainer, or here when
    Trainer leaves it to the loss).
    """
    if per_pair:
        if not pairs_in_step:
            return kl_values.mean()
        loss = kl_values.sum() * num_processes / pairs_in_step
        return loss * accumulation_steps if trainer_divides else loss
    return kl_values if trainer_divides else kl_values / accumulation_steps


# ------------------------------------------------------------------------------------------ cross-entropy with retain rows


def token_losses(log_probs: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-token losses from per-token log-probabilities: ``nll`` (cross-entropy), or ``dft`` (weighted by the
    detached probability, as TRL does)."""
    per_token = -log_probs
    if loss_type == "dft":
        per_token = per_token * log_probs.exp().detach()
    return per_token


def retain_weighted_cross_entropy(per_token: torch.Tensor, num_pairs: int, pair_items: torch.Tensor | int,
                                  retain_items: torch.Tensor | int, retain_loss_weight: float) -> torch.Tensor:
    """The pairs' mean loss plus ``retain_loss_weight`` times the retain rows' mean loss, each over its own tokens.

    ``per_token [B, T]`` holds the per-token losses (zero off the completion tokens); rows ``[0, num_pairs)`` are
    pairs, the rest retain rows. ``pair_items`` / ``retain_items`` are the token counts each mean divides by (those
    of the whole optimiser step, to sum to the step's means over micro-batches); a part without tokens counts as one,
    as TRL does (0 tokens, 0 loss).
    """
    def clamp(n):
        return torch.as_tensor(n, device=per_token.device).clamp(min=1)

    return (per_token[:num_pairs].sum() / clamp(pair_items)
            + retain_loss_weight * per_token[num_pairs:].sum() / clamp(retain_items))


def part_token_means(log_probs: torch.Tensor, label_mask: torch.Tensor, num_pairs: int) -> dict[str, float]:
    """``completion_loss`` (rows ``[0, num_pairs)``) and ``retain_loss`` (the rest): each part's mean cross-entropy
    over its completion tokens; a part without tokens is left out."""
    means = {}
    for key, part in (("completion_loss", slice(0, num_pairs)), ("retain_loss", slice(num_pairs, None))):
        tokens = label_mask[part].sum()
        if tokens > 0:
            means[key] = float(-(log_probs[part] * label_mask[part]).sum() / tokens)
    return means
