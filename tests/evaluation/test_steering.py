"""Inference-time steering (rasa_trainer.evaluation.steering): deactivated experts are never chosen, nothing else changes."""

from __future__ import annotations

import pytest
import torch

from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.routing import record_routing
from rasa_trainer.evaluation.steering import boosted_routing, steer_away, steer_toward, steered_routing, steering_mask

from conftest import batch, tiny_model

SOFTMAX_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "granitemoe"]


def _routing(model, inputs):
    with torch.no_grad(), record_routing(model) as rec:
        out = model(**inputs)
    return rec.routing(), out.logits


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_nothing_blocked_reproduces_the_router(family):
    model = tiny_model(family)
    for layer in moe_layers(model):
        hidden = torch.randn(11, layer.hidden_size)
        with torch.no_grad():
            scores, weights, indices = layer.router(hidden)
            new_weights, new_indices = steered_routing(layer, scores, torch.zeros(layer.num_experts, dtype=torch.bool),
                                                       out_dtype=weights.dtype)
        # same choice (top-k order may differ where the router sorts differently) and the same weights
        assert torch.equal(new_indices.sort(-1).values, indices.long().sort(-1).values)
        order_new, order_old = new_indices.argsort(-1), indices.long().argsort(-1)
        torch.testing.assert_close(new_weights.gather(-1, order_new), weights.gather(-1, order_old))


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_blocked_experts_are_never_chosen_and_hooks_go_away(family):
    model = tiny_model(family)
    inputs = batch()
    before, logits_before = _routing(model, inputs)
    # block each layer's most used expert and one more
    selection = {}
    for l, idx in enumerate(before.indices):
        counts = torch.bincount(idx.reshape(-1).long(), minlength=moe_layers(model)[l].num_experts)
        selection[l] = counts.topk(2).indices.tolist()
    with steer_away(model, selection) as mask:
        steered, logits_steered = _routing(model, inputs)
    assert int(mask.sum()) == 2 * len(selection)
    for l, idx in enumerate(steered.indices):
        assert not torch.isin(idx.long(), torch.tensor(selection[l])).any()
    assert not torch.allclose(logits_before, logits_steered)
    after, logits_after = _routing(model, inputs)  # hooks removed on exit
    assert all(torch.equal(a, b) for a, b in zip(before.indices, after.indices))
    torch.testing.assert_close(logits_after, logits_before)


def test_renormalised_weights_sum_to_one():
    model = tiny_model("qwen3_moe", norm_topk_prob=True)
    layer = moe_layers(model)[0]
    blocked = torch.zeros(layer.num_experts, dtype=torch.bool)
    blocked[:3] = True
    with torch.no_grad():
        scores, _, _ = layer.router(torch.randn(9, layer.hidden_size))
        weights, indices = steered_routing(layer, scores, blocked)
    torch.testing.assert_close(weights.sum(-1), torch.ones(9))
    assert (indices >= 3).all()


def test_selection_formats_and_errors():
    model = tiny_model("qwen3_moe")
    layers = moe_layers(model)
    mask = steering_mask(model, {0: [1, 2]})
    assert mask.shape == (len(layers), layers[0].num_experts) and mask.sum() == 2 and mask[0, 1] and mask[0, 2]
    assert torch.equal(steering_mask(model, mask), mask)
    with pytest.raises(ValueError, match="MoE layer 7"):
        steering_mask(model, {7: [0]})
    with pytest.raises(ValueError, match="expert 99"):
        steering_mask(model, {0: [99]})
    with pytest.raises(ValueError, match="fewer than top_k"):
        with steer_away(model, {0: list(range(layers[0].num_experts - 1))}):
            pass


def test_sigmoid_routers_are_not_supported():
    model = tiny_model("deepseek_v3")
    with pytest.raises(NotImplementedError, match="sigmoid"):
        with steer_away(model, {0: [0]}):
            pass


# --------------------------------------------------------------------------------------------------------------------
# Steering toward experts (the routing attack)


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_boosted_experts_take_the_top_k_with_steermoe_weights(family):
    model = tiny_model(family)
    for layer in moe_layers(model):
        boosted = torch.zeros(layer.num_experts, dtype=torch.bool)
        boosted[[1, 5][: layer.top_k]] = True
        with torch.no_grad():
            scores, weights, _ = layer.router(torch.randn(13, layer.hidden_size))
            new_weights, indices = boosted_routing(layer, scores, boosted, margin=0.5, out_dtype=weights.dtype)
        chosen = torch.zeros(13, layer.num_experts, dtype=torch.bool).scatter_(1, indices.long(), True)
        assert torch.equal(chosen, boosted.expand(13, -1))  # every row: exactly the boosted experts
        # by hand: log-probabilities, the boosted ones set to the row's maximum + 0.5, softmax, gathered
        logp = scores.float().log_softmax(-1) if layer.rule.first_output == "logits" else scores.float().log()
        changed = torch.where(boosted, logp.max(-1, keepdim=True).values + 0.5, logp).softmax(-1)
        expect = changed.gather(-1, indices.long())
        if layer.rule.normalize:
            expect = expect / expect.sum(-1, keepdim=True)
        torch.testing.assert_close(new_weights.float(), (expect * layer.rule.scale).to(weights.dtype).float())


def test_boosted_routing_with_a_zero_margin_ties_the_maximum():
    model = tiny_model("qwen3_moe", norm_topk_prob=True)
    layer = moe_layers(model)[0]
    scores = torch.tensor([[0.0, 3.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]])
    boosted = torch.zeros(layer.num_experts, dtype=torch.bool)
    boosted[3] = True
    weights, indices = boosted_routing(layer, scores, boosted, margin=0.0)
    assert sorted(indices[0].tolist()) == [1, 3]  # expert 3 raised to expert 1's log-probability
    torch.testing.assert_close(weights, torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="margin"):
        boosted_routing(layer, scores, boosted, margin=-1.0)


def _generated_routing(model, inputs, max_new_tokens=3):
    with torch.no_grad(), record_routing(model, probabilities=False) as rec:
        model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=0)
    return rec.calls


def test_steering_generated_positions_only_changes_the_positions_that_produce_tokens():
    model = tiny_model("qwen3_moe")
    inputs = batch(padding="left")
    plain = _generated_routing(model, inputs)
    selection = {l: [3, 6] for l in range(len(moe_layers(model)))}
    with steer_toward(model, selection, positions="generated") as mask:
        steered = _generated_routing(model, inputs)
    assert int(mask.sum()) == 4 and len(steered) == len(plain) == 3
    batch_size, seq = inputs["input_ids"].shape
    for step, (a, b) in enumerate(zip(plain, steered)):
        for layer, (ia, ib) in enumerate(zip(a.indices, b.indices)):
            generated = torch.ones(ia.shape[0], dtype=torch.bool)
            if step == 0:  # the prefill: only each row's last position produces a token
                generated = (torch.arange(ia.shape[0]) % seq) == seq - 1
            assert (ib[generated].long().sort(-1).values == torch.tensor([3, 6])).all()
            assert torch.equal(ib[~generated], ia[~generated])
    with steer_toward(model, selection, positions="decision"):
        decision = _generated_routing(model, inputs)
    for step, (a, b) in enumerate(zip(plain, decision)):
        for ia, ib in zip(a.indices, b.indices):
            steered_rows = (torch.arange(ia.shape[0]) % seq) == seq - 1 if step == 0 else torch.zeros(ia.shape[0], dtype=bool)
            assert (ib[steered_rows].long().sort(-1).values == torch.tensor([3, 6])).all()
            assert torch.equal(ib[~steered_rows], ia[~steered_rows])
    with steer_toward(model, selection, positions="all"):
        everywhere = _generated_routing(model, inputs)
    assert all((i.long().sort(-1).values == torch.tensor([3, 6])).all() for c in everywhere for i in c.indices)
    with steer_away(model, selection, positions="generated"):
        away = _generated_routing(model, inputs)
    first = away[0].indices[0]
    assert not torch.isin(first[seq - 1 :: seq].long(), torch.tensor([3, 6])).any()
    with pytest.raises(ValueError, match="positions"):
        with steer_toward(model, selection, positions="prompt"):
            pass
    assert _generated_routing(model, inputs)[0].indices[0].equal(plain[0].indices[0])  # hooks removed


def test_steer_toward_rejects_unsteerable_routers():
    with pytest.raises(NotImplementedError, match="sigmoid"):
        with steer_toward(tiny_model("deepseek_v3"), {0: [0]}):
            pass
