"""The router phase's loss without a Trainer (rasa_trainer/training/router_loss.py): the context it averages over, the
KL of a micro-batch equal to the pure KL of independently recorded router probabilities, the step's pair count."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from rasa_trainer.moe.routing import record_routing
from rasa_trainer.training.losses import router_consistency_kl
from rasa_trainer.training.router_loss import RouterLoss, router_context


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 9, 12, 17, 3, 0], [22, 7, 8, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_context_is_the_given_mask_else_the_collators_else_the_unlabelled_tokens():
    inputs = batch()
    unlabelled = (inputs["labels"] == -100) & inputs["attention_mask"].bool()
    assert torch.equal(router_context(inputs), unlabelled)
    marked = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    marked[:, 0] = True
    assert torch.equal(router_context({**inputs, "rasa_context_mask": marked}), marked)
    everything = torch.ones_like(inputs["input_ids"])
    assert torch.equal(router_context(inputs, everything), inputs["attention_mask"].bool())  # never padding


@pytest.mark.parametrize("router_loss", ["per_pair", "pooled"])
def test_kl_of_a_micro_batch(router_loss):
    model = tiny_model("olmoe").eval()
    inputs = batch()
    anchor_ids = torch.tensor([[4, 6, 8], [10, 11, 0]])
    anchor_mask = (anchor_ids != 0).long()
    loss = RouterLoss(router_loss, "symmetric")
    kl, routing, context = loss.kl(model, inputs, anchor_ids, anchor_mask)
    with torch.no_grad(), record_routing(model, probabilities=True) as anchor:
        model(input_ids=anchor_ids, attention_mask=anchor_mask)
    with torch.no_grad(), record_routing(model, probabilities=True) as adversarial:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    expected = router_consistency_kl(anchor.routing().probabilities, adversarial.routing().probabilities,
                                     anchor_mask.bool(), router_context(inputs), per_pair=router_loss == "per_pair",
                                     direction="symmetric")
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-5, atol=1e-7)
    assert kl.shape == ((2,) if router_loss == "per_pair" else ())
    assert kl.requires_grad and torch.equal(context, router_context(inputs))
    assert routing.stacked_indices().shape[0] == inputs["input_ids"].numel()
    with pytest.raises(ValueError, match="needs anchor contexts"):
        loss.kl(model, inputs, None, None)


def test_pairs_of_the_step_over_micro_batches_and_processes():
    loss = RouterLoss("per_pair")
    samples = [{"input_ids": torch.zeros(3, 5)}, {"input_ids": torch.zeros(2, 4)}]
    loss.count_step_pairs(samples, "cpu")
    assert loss.pairs_in_step == 5
    loss.count_step_pairs(samples, "cpu", num_processes=2, gather=lambda t: torch.cat([t, t + 1]))
    assert loss.pairs_in_step == 11  # this process's 5 and the other's 6
    kl = torch.tensor([0.2, 0.4, 0.6])
    assert float(loss.scale(kl, in_train=True, num_processes=2, accumulation_steps=1, trainer_divides=True)) == \
        pytest.approx(1.2 * 2 / 11)
    assert float(loss.scale(kl, in_train=False, num_processes=2, accumulation_steps=1, trainer_divides=True)) == \
        pytest.approx(0.4)
