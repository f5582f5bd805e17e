"""Inference-time steering (rasa_trainer.steering): deactivated experts are never chosen, nothing else changes."""

from __future__ import annotations

import pytest
import torch

from rasa_trainer.moe import moe_layers
from rasa_trainer.routing import record_routing
from rasa_trainer.steering import steer_away, steered_routing, steering_mask

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
