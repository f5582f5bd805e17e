"""The RASA losses on plain tensors (rasa_trainer/training/losses.py): the router-consistency KL computed by hand, its
directions and layer mean, the per-pair objective's independence of how pairs are split over micro-batches and
processes, and the retain-weighted cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch

from rasa_trainer.training.losses import (
    directed_kl,
    kl,
    loss_scaled_for_accumulation,
    masked_mean,
    part_token_means,
    per_pair_mean,
    retain_weighted_cross_entropy,
    router_consistency_kl,
    scale_router_loss,
    token_losses,
)

P = torch.tensor([0.5, 0.5])
Q = torch.tensor([0.9, 0.1])
KL_PQ = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
KL_QP = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)


# ------------------------------------------------------------------------------------------------------ the KL


def test_kl_of_two_experts_by_hand():
    assert float(kl(P, Q)) == pytest.approx(KL_PQ, rel=1e-6)
    assert float(kl(Q, P)) == pytest.approx(KL_QP, rel=1e-6)
    assert float(kl(P, P)) == pytest.approx(0.0, abs=1e-7)
    rows = kl(torch.stack([P, Q]), torch.stack([Q, P]))  # one value per leading index
    torch.testing.assert_close(rows, torch.tensor([KL_PQ, KL_QP]))


def test_directions():
    assert float(directed_kl(P, Q, "forward")) == pytest.approx(KL_PQ, rel=1e-6)
    assert float(directed_kl(P, Q, "reverse")) == pytest.approx(KL_QP, rel=1e-6)
    assert float(directed_kl(P, Q, "symmetric")) == pytest.approx(0.5 * (KL_PQ + KL_QP), rel=1e-6)


def test_means_over_masked_tokens():
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [9.0, 9.0]])  # 2 examples x 2 tokens, flattened
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(per_pair_mean(values, mask), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="an example has no context tokens"):
        per_pair_mean(values, torch.tensor([[True, True], [False, False]]))
    with pytest.raises(ValueError, match="a batch has no context tokens"):
        masked_mean(values, torch.zeros(2, 2, dtype=torch.bool))


def _layer(*token_probs) -> torch.Tensor:
    return torch.stack([torch.tensor(p) for p in token_probs])


def test_router_consistency_kl_is_the_layer_mean():
    # one example, one token per context, two MoE layers: layer 0 compares P with Q, layer 1 Q with Q
    anchor = [_layer([0.5, 0.5]), _layer([0.9, 0.1])]
    adversarial = [_layer([0.9, 0.1]), _layer([0.9, 0.1])]
    one = torch.ones(1, 1, dtype=torch.bool)
    for direction, expected in (("forward", KL_PQ / 2), ("reverse", KL_QP / 2),
                                ("symmetric", (KL_PQ + KL_QP) / 4)):
        pooled = router_consistency_kl(anchor, adversarial, one, one, per_pair=False, direction=direction)
        per_pair = router_consistency_kl(anchor, adversarial, one, one, per_pair=True, direction=direction)
        assert pooled.shape == () and per_pair.shape == (1,)
        assert float(pooled) == pytest.approx(expected, rel=1e-6)
        assert float(per_pair[0]) == pytest.approx(expected, rel=1e-6)  # one pair: the pooled form


def test_per_pair_kl_averages_tokens_within_each_pair_only():
    # two pairs, two tokens each; pair 0's anchor tokens average to P, pair 1's adversarial to Q
    anchor = [_layer([1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.9, 0.1])]
    adversarial = [_layer([0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5])]
    mask = torch.ones(2, 2, dtype=torch.bool)
    per_pair = router_consistency_kl(anchor, adversarial, mask, mask, per_pair=True, direction="forward")
    torch.testing.assert_close(per_pair, torch.tensor([KL_PQ, KL_QP]))
    pooled = router_consistency_kl(anchor, adversarial, mask, mask, per_pair=False, direction="forward")
    p_anchor, p_adv = torch.tensor([0.7, 0.3]), torch.tensor([0.7, 0.3])  # the token means over both pairs
    assert float(pooled) == pytest.approx(float(kl(p_anchor, p_adv)), abs=1e-7)


# ------------------------------------------------------------------------------------------------------ scaling


def _step_loss(per_pair_kl: torch.Tensor, micro_batches: int, processes: int, trainer_divides: bool) -> float:
    """The objective one optimiser step minimises when the pairs are split over micro-batches and processes: the
    processes' gradients are averaged (DDP), the micro-batches' losses summed, divided by the accumulation steps
    where Trainer divides."""
    chunks = per_pair_kl.chunk(micro_batches * processes)
    total = 0.0
    for chunk in chunks:
        loss = scale_router_loss(chunk, per_pair=True, pairs_in_step=len(per_pair_kl), num_processes=processes,
                                 accumulation_steps=micro_batches, trainer_divides=trainer_divides)
        total += float(loss) / (micro_batches if trainer_divides else 1)
    return total / processes


@pytest.mark.parametrize("trainer_divides", [True, False])
def test_per_pair_objective_does_not_depend_on_the_split(trainer_divides):
    per_pair_kl = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.8, 0.6, 0.5, 0.7])
    mean = float(per_pair_kl.mean())
    for micro_batches, processes in ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (8, 1)):
        assert _step_loss(per_pair_kl, micro_batches, processes, trainer_divides) == pytest.approx(mean, rel=1e-6)


def test_scaling_outside_the_loop_and_pooled():
    values = torch.tensor([0.2, 0.4])
    out = scale_router_loss(values, per_pair=True, pairs_in_step=None, num_processes=2, accumulation_steps=4,
                            trainer_divides=True)
    assert float(out) == pytest.approx(0.3)  # outside Trainer's loop: the micro-batch's mean
    pooled = torch.tensor(0.6)
    assert float(scale_router_loss(pooled, per_pair=False, pairs_in_step=8, num_processes=2, accumulation_steps=3,
                                   trainer_divides=True)) == pytest.approx(0.6)
    assert float(scale_router_loss(pooled, per_pair=False, pairs_in_step=8, num_processes=2, accumulation_steps=3,
                                   trainer_divides=False)) == pytest.approx(0.2)


def test_accumulation_rule():
    assert loss_scaled_for_accumulation(True, False, None, None) is True
    assert loss_scaled_for_accumulation(False, True, torch.tensor(5), object()) is False  # explicit flag wins
    assert loss_scaled_for_accumulation(None, True, torch.tensor(5), None) is True
    assert loss_scaled_for_accumulation(None, True, None, None) is False
    assert loss_scaled_for_accumulation(None, False, torch.tensor(5), None) is False
    assert loss_scaled_for_accumulation(None, False, None, lambda *a: 0) is True


# ------------------------------------------------------------------------------------------------------ retain rows


PER_TOKEN = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0]])  # 2 pair rows, then 1 retain row


def test_retain_weighted_cross_entropy_by_hand():
    loss = retain_weighted_cross_entropy(PER_TOKEN, 2, 3, 3, 0.5)
    assert float(loss) == pytest.approx((1 + 2 + 3) / 3 + 0.5 * (4 + 5 + 6) / 3)
    # a part without tokens counts as one (0 tokens, 0 loss)
    assert float(retain_weighted_cross_entropy(PER_TOKEN[:2], 2, 3, 0, 2.0)) == pytest.approx(2.0)
    assert float(retain_weighted_cross_entropy(PER_TOKEN, 2, torch.tensor(3), torch.tensor(3), 0.0)) == 2.0


def test_retain_weighted_means_sum_over_micro_batches():
    """Each part's mean runs over the step's tokens: the micro-batch losses add up to the step's two means."""
    first = torch.tensor([[1.0, 2.0], [5.0, 0.0]])  # pair row, retain row
    second = torch.tensor([[3.0, 4.0], [6.0, 7.0]])
    pair_items, retain_items = 4, 3
    total = sum(float(retain_weighted_cross_entropy(b, 1, pair_items, retain_items, 2.0)) for b in (first, second))
    assert total == pytest.approx((1 + 2 + 3 + 4) / 4 + 2.0 * (5 + 6 + 7) / 3)


def test_token_losses_and_part_means():
    log_probs = torch.log(torch.tensor([[0.5, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(token_losses(log_probs, "nll"), -log_probs)
    torch.testing.assert_close(token_losses(log_probs, "dft"), -log_probs * log_probs.exp())
    mask = torch.tensor([[1, 1], [1, 0]])
    means = part_token_means(log_probs, mask, num_pairs=1)
    assert means["completion_loss"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert means["retain_loss"] == pytest.approx(math.log(2))
    assert part_token_means(log_probs, torch.tensor([[1, 0], [0, 0]]), 1).keys() == {"completion_loss"}
