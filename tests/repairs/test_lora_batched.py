"""LoRA repairs in a training forward run all selected experts of a layer at once (a grouped GEMM for the base
products, the skinny products against every selected expert's factors side by side): their gradients equal those of
the merged weights ``W + scaling * B @ A`` differentiated directly, for the factors and for the layer's input."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from conftest import batch, tiny_model
from rasa_trainer.repairs.layer import attach_repairs, disable_repairs, repair_modules


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "qwen3_moe"])  # gate/up fused, transposed with biases
@pytest.mark.parametrize("kernel", ["grouped_mm", "eager"])
def test_lora_gradients_equal_the_merged_weights(family, kernel):
    model = tiny_model(family)
    model.set_experts_implementation(kernel)
    attach_repairs(model, {0: [0, 2, 5], 1: [1, 3]}, "lora", rank=4, alpha=8)
    torch.manual_seed(2)
    factors = []
    with torch.no_grad():
        for _, repairs in repair_modules(model):
            for p in repairs.parameters():
                p.normal_(0, 0.1)
                factors.append(p)
    inputs = batch(batch_size=3, seq=8)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)

    def loss(out):
        return out.logits.float().pow(2).mean()

    got = torch.autograd.grad(loss(model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])),
                              [embeds, *factors])
    merged = {}
    for layer, repairs in repair_modules(model):
        for name in repairs.names:
            delta = repairs.delta(name)  # scaling * B @ A, differentiable in the factors
            if delta is not None:
                weight = getattr(layer.experts, name)
                merged[f"{layer.experts_name}.{name}"] = weight.index_put(
                    (repairs.selected,), weight[repairs.selected] + delta)
    with disable_repairs(model):
        out = functional_call(model, merged, kwargs=dict(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]))
        want = torch.autograd.grad(loss(out), [embeds, *factors])
    assert all(g.abs().sum() > 0 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
