"""MoE discovery on tiny random models of every supported family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import tiny_model
from rasa_trainer.moe.discovery import moe_layers

EXPECTED_RULES = {
    "olmoe": ("softmax", None),  # None: renormalised iff the config's norm_topk_prob
    "qwen2_moe": ("softmax", None),
    "qwen3_moe": ("softmax", None),
    "mixtral": ("softmax", True),
    "deepseek_v3": ("sigmoid", True),
    "gpt_oss": ("softmax", True),  # top-k then softmax == softmax, top-k, renormalise
    "granitemoe": ("softmax", True),
    "phimoe": ("sparsemixer", False),
}


def test_discovery_finds_every_moe_layer(family):
    model = tiny_model(family)
    layers = moe_layers(model)
    dense_first = 1 if family == "deepseek_v3" else 0
    assert [l.layer_index for l in layers] == list(range(dense_first, model.config.num_hidden_layers))
    assert [l.index for l in layers] == list(range(len(layers)))
    for layer in layers:
        assert (layer.num_experts, layer.top_k) == (8, 2)
        assert layer.first_output == "logits"
        kind, normalize = EXPECTED_RULES[family]
        normalize = model.config.norm_topk_prob if normalize is None else normalize
        assert (layer.scoring, layer.rule.normalize) == (kind, normalize)
        assert dict(model.named_modules())[layer.router_name] is layer.router
        assert layer.experts.down_proj.shape[0] == 8


def test_deepseek_scaling_factor_is_identified():
    model = tiny_model("deepseek_v3")
    assert moe_layers(model)[0].rule.scale == pytest.approx(model.config.routed_scaling_factor)


def test_recomputed_weights_match_router(family):
    """The identified rule reproduces the router's own top-k weights on real hidden states."""
    model = tiny_model(family)
    for layer in moe_layers(model):
        hidden = torch.randn(20, model.config.hidden_size)
        first, weights, indices = layer.router(hidden)
        torch.testing.assert_close(layer.rule.topk_weights(first, indices).to(weights.dtype), weights, rtol=1e-5, atol=1e-6)
        probs = layer.router_probabilities(first)
        torch.testing.assert_close(probs.sum(-1), torch.ones(20))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_projections_canonical_layout(family):
    """Per-expert weights in [out, in] layout reproduce the experts module's own output for one expert."""
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    experts = layer.experts
    x = torch.randn(5, model.config.hidden_size)
    e = 3
    out = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
    w = layer.expert_projections(e)
    gate = x @ w["gate"].T + w.get("gate_bias", 0)
    up = x @ w["up"].T + w.get("up_bias", 0)
    if family == "gpt_oss":
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(-experts.limit, experts.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    else:
        hidden = experts.act_fn(gate) * up
    manual = hidden @ w["down"].T + w.get("down_bias", 0)
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)
    # views, not copies: writing through them changes the model
    assert w["down"].data_ptr() in {p.data_ptr() for p in [experts.down_proj[e]]} or w["down"]._base is not None


def test_discovery_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen3_moe")
    plain = moe_layers(model)
    wrapped = get_peft_model(
        model, LoraConfig(r=2, target_parameters=["model.layers.0.mlp.experts.gate_up_proj"], lora_dropout=0.0)
    )
    layers = moe_layers(wrapped)
    assert [l.router for l in layers] == [l.router for l in plain]
    assert [l.experts for l in layers] == [l.experts for l in plain]
    assert layers[0].router_name.startswith("base_model.model.")


def test_expert_index_out_of_range():
    layer = moe_layers(tiny_model("olmoe"))[0]
    with pytest.raises(IndexError, match="expert 8 out of range"):
        layer.expert_parameters(8)


def test_dense_model_raises():
    config = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*dense model.*olmoe, qwen2_moe"):
        moe_layers(model)


def test_malformed_router_raises(monkeypatch):
    model = tiny_model("olmoe")
    router_cls = type(moe_layers(model)[0].router)
    monkeypatch.setattr(router_cls, "forward", lambda self, h: torch.nn.functional.linear(h, self.weight))
    with pytest.raises(ValueError, match=r"OlmoeForCausalLM has a router \(OlmoeTopKRouter\) that returns Tensor"):
        moe_layers(model)


def test_router_with_unknown_rule_raises(monkeypatch):
    model = tiny_model("olmoe")
    router_cls = type(moe_layers(model)[0].router)
    original = router_cls.forward

    def odd(self, h):
        logits, w, idx = original(self, h)
        return logits, w.square(), idx

    monkeypatch.setattr(router_cls, "forward", odd)
    with pytest.raises(ValueError, match="follow no known scoring rule"):
        moe_layers(model)
