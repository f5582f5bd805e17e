"""Expert repairs as a PEFT-style tuner: exactness against the merged model under every experts kernel, the
lifecycle (merge, unmerge, disable, unload), LoRA without materialising B @ A, and the PEFT adapter round trip."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, batch, tiny_model
import rasa_trainer.repairs.layer as repairs_module
from rasa_trainer.repairs.adapter import load_rasa_adapter, save_peft_adapter
from rasa_trainer.memory.measure import cpu_allocated_peak
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.repairs.layer import (
    attach_repairs,
    disable_repairs,
    merge_repairs,
    merged_state_dict,
    repair_modules,
    unload_repairs,
    unmerge_repairs,
    upcast_routers,
)

KERNELS = ["eager", "grouped_mm", "batched_mm"]
DTYPES = [torch.float32, torch.bfloat16]


def _model(family, dtype, kernel):
    model = tiny_model(family).to(dtype)
    model.set_experts_implementation(kernel)
    return model


def _selection(model):
    return {0: [1, 3], len(moe_layers(model)) - 1: [0]}


def _randomise(model, std=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for _, repairs in repair_modules(model):
            for p in repairs.parameters():
                p.normal_(0, std)


def _repaired_and_merged(family, dtype, kernel, mode):
    """A model with random repairs of its selected experts, and the plain model loaded from its merged checkpoint."""
    model = _model(family, dtype, kernel)
    attach_repairs(model, _selection(model), mode)
    _randomise(model)
    merged = _model(family, dtype, kernel)
    merged.load_state_dict(merged_state_dict(model))
    return model, merged


def _logits(model, inputs, grad=False):
    with torch.set_grad_enabled(grad):
        return model(**inputs).logits.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_repairs_are_bit_identical(family):
    inputs = batch(batch_size=4, seq=9)
    for kernel in KERNELS:
        for dtype in DTYPES:
            model = _model(family, dtype, kernel)
            reference = _logits(model, inputs)
            for mode in ("delta", "lora"):
                attach_repairs(model, _selection(model), mode)
                assert torch.equal(_logits(model, inputs), reference), (kernel, dtype, mode, "no grad")
                # training forwards: exact in bf16 everywhere. In fp32, grouped_mm's CPU kernel rounds differently
                # when it sees a subset of the rows, and LoRA's own products differ from batched_mm's (~1e-10)
                if dtype == torch.bfloat16 or kernel == "eager" or (kernel == "batched_mm" and mode == "delta"):
                    assert torch.equal(_logits(model, inputs, grad=True), reference), (kernel, dtype, mode, "grad")
                unload_repairs(model)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_repaired_model_computes_the_merged_checkpoint(family):
    inputs = batch(batch_size=4, seq=9)
    for kernel in KERNELS:
        for dtype in DTYPES:
            for mode in ("delta", "lora"):
                model, merged = _repaired_and_merged(family, dtype, kernel, mode)
                expected = _logits(merged, inputs)
                assert torch.equal(_logits(model, inputs), expected), (kernel, dtype, mode)
                if mode == "delta" and dtype == torch.bfloat16:  # training forward, bit for bit
                    assert torch.equal(_logits(model, inputs, grad=True), expected), (kernel, dtype, mode)
                if mode == "lora":  # two skinny products instead of B @ A: exact in real arithmetic only
                    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                    torch.testing.assert_close(_logits(model, inputs, grad=True), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_no_grad_per_slot_path_computes_the_merged_checkpoint(family, monkeypatch):
    """A large layer is not copied for a forward without gradients when its assignments need less memory: the
    per-slot path (made the choice here by lowering the size floor) computes the merged model bit for bit in bf16 on
    every kernel and in fp32 on eager and batched_mm (fp32 grouped_mm on the CPU rounds a subset of rows apart)."""
    monkeypatch.setattr(repairs_module, "_COPY_FLOOR", 0)
    inputs = batch(batch_size=2, seq=3)  # 6 tokens: far fewer assignment rows than the layer's weights
    calls = []
    real = repairs_module.no_grad_working_set
    monkeypatch.setattr(repairs_module, "no_grad_working_set", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    for kernel in KERNELS:
        for dtype in DTYPES:
            for mode in ("delta", "lora"):
                model, merged = _repaired_and_merged(family, dtype, kernel, mode)
                calls.clear()
                got = _logits(model, inputs)
                assert calls and all(path == "per_slot" for path, _ in calls)
                if dtype == torch.bfloat16 or kernel != "grouped_mm":
                    assert torch.equal(got, _logits(merged, inputs)), (kernel, dtype, mode)
                else:
                    torch.testing.assert_close(got, _logits(merged, inputs), rtol=0, atol=1e-5)


_allocated_peak = cpu_allocated_peak  # what the CPU allocator really holds during a call


@pytest.mark.parametrize("kernel", ["grouped_mm", "eager"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_working_set_is_measured(kernel, dtype, monkeypatch):
    """The bytes no_grad_working_set states for each path bound what the CPU allocator really holds during one
    forward of a repaired experts layer without gradients (at most 10% under; for grouped_mm, whose working set the
    figures model, at most 2x over), and on a layer much larger than its assignments the per-slot path holds a
    fraction of the merged copy."""
    model = tiny_model("qwen3_moe", hidden_size=256, moe_intermediate_size=128, num_experts=64,
                       num_experts_per_tok=4).to(dtype)
    model.set_experts_implementation(kernel)
    layer = moe_layers(model)[0]
    attach_repairs(model, {0: [1, 3]}, "delta")
    _randomise(model)
    repairs = repair_modules(model)[0][1]
    torch.manual_seed(0)
    tokens, k = 256, layer.top_k
    x = torch.randn(tokens, 256, dtype=dtype)
    index = torch.stack([torch.randperm(64)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k), -1).to(dtype)
    measured, stated = {}, {}
    for floor, path in ((float("inf"), "merged_copy"), (0, "per_slot")):
        monkeypatch.setattr(repairs_module, "_COPY_FLOOR", floor)
        chosen, stated[path] = repairs_module.no_grad_working_set(
            layer.experts, repairs.names, "delta", 2, tokens, k, x.element_size(), weights.element_size())
        assert chosen == path
        with torch.no_grad():
            measured[path] = _allocated_peak(lambda: layer.experts(x, index, weights))
        assert measured[path] <= 1.1 * stated[path], (path, measured[path], stated[path])
        if kernel == "grouped_mm":  # the kernel the figures model; eager works expert by expert and holds less
            assert measured[path] >= stated[path] / 2, (path, measured[path], stated[path])
    assert measured["per_slot"] < 0.35 * measured["merged_copy"]


def test_small_layers_keep_the_merged_copy_and_large_ones_do_not(monkeypatch):
    """Below the floor (every tiny test and demo model) the copy is kept; on Qwen3-30B-A3B's shapes the per-slot
    path saves the 1.1 GiB copy of each layer in the anchor pass of a 4 x 512 batch."""
    from rasa_trainer.memory import PRESETS
    from rasa_trainer.memory.models import meta_model
    from transformers import AutoConfig

    small = tiny_model("qwen3_moe")
    layer = moe_layers(small)[0]
    names = layer.expert_parameter_names()
    assert repairs_module.no_grad_working_set(layer.experts, names, "delta", 1, 1, layer.top_k, 4)[0] == "merged_copy"
    model_type, values = PRESETS["Qwen3-30B-A3B"]
    big = moe_layers(meta_model(AutoConfig.for_model(model_type, **values)))[0]
    names = big.expert_parameter_names()
    args = (big.experts, names, "lora", 16, 4 * 512, big.top_k, 2, 2)
    path, nbytes = repairs_module.no_grad_working_set(*args)
    monkeypatch.setattr(repairs_module, "_COPY_FLOOR", float("inf"))
    copy_path, copy_bytes = repairs_module.no_grad_working_set(*args)
    layer_copy = sum(getattr(big.experts, n).numel() for n in names) * 2
    assert (path, copy_path) == ("per_slot", "merged_copy") and layer_copy > 2**30
    assert copy_bytes - nbytes > 0.8 * layer_copy


def test_merge_unmerge_disable_round_trip():
    inputs = batch(batch_size=4, seq=9)
    model = _model("qwen3_moe", torch.bfloat16, "grouped_mm")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model, inputs)
    attach_repairs(model, _selection(model), "delta")
    _randomise(model)
    repaired = _logits(model, inputs)
    assert not torch.equal(repaired, base)
    with disable_repairs(model):
        assert torch.equal(_logits(model, inputs), base)
    merge_repairs(model)
    assert torch.equal(_logits(model, inputs), repaired)  # merged weights, repairs skipped
    with disable_repairs(model):  # unmerged meanwhile
        assert torch.equal(_logits(model, inputs), base)
    assert torch.equal(_logits(model, inputs), repaired)
    unmerge_repairs(model)
    for key, value in base_state.items():
        assert torch.equal(model.state_dict()[key], value), key  # the original slices, bit for bit
    assert torch.equal(_logits(model, inputs), repaired)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_unload_gives_back_a_plain_transformers_model(family):
    inputs = batch(batch_size=4, seq=9)
    fresh = tiny_model(family).to(torch.bfloat16)
    model = tiny_model(family).to(torch.bfloat16)
    attach_repairs(model, _selection(model), "lora")
    routers = upcast_routers(model)
    _randomise(model)
    with torch.no_grad():
        for p in routers:
            p.add_(0.01)
    repaired = _logits(model, inputs)
    merged_state = merged_state_dict(model)
    unload_repairs(model)
    assert model.config._experts_implementation == fresh.config._experts_implementation
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in fresh.named_modules()]
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: p.dtype for n, p in fresh.named_parameters()}
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not any(k.startswith("_rasa") for k in vars(module)), name
    for name, value in model.state_dict().items():  # experts merged; routers cast back to bf16
        assert torch.equal(value, merged_state[name].to(value.dtype)), name
    torch.testing.assert_close(_logits(model, inputs), repaired, rtol=0, atol=0.1)  # bf16 routers now


def test_lora_training_forward_never_materialises_b_at_a(monkeypatch):
    model = _model("olmoe", torch.float32, "grouped_mm")
    attach_repairs(model, _selection(model), "lora")
    _randomise(model)
    calls = []
    original = torch.bmm

    def counting_bmm(a, b, *args, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "bmm", counting_bmm)
    loss = model(**batch(batch_size=4, seq=9)).logits.float().pow(2).mean()
    loss.backward()
    assert calls == []  # _lora_delta (B @ A per expert) is the only bmm of the repairs
    for _, repairs in repair_modules(model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repairs.parameters() if p.dim() == 3)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_peft_adapter_round_trip(tmp_path, family):
    from peft import PeftModel

    inputs = batch(batch_size=4, seq=9)
    model = tiny_model(family)
    attach_repairs(model, _selection(model), "lora", rank=4, alpha=8)
    routers = upcast_routers(model)
    _randomise(model)
    with torch.no_grad():
        for p in routers:
            p.add_(torch.randn_like(p) * 0.01)
    expected = _logits(model, inputs)
    save_peft_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(peft_model, inputs), expected, rtol=0, atol=1e-6)
    # only the selected experts and the routers differ from the base model once PEFT merges
    base, merged = tiny_model(family).state_dict(), peft_model.merge_and_unload().state_dict()
    selection = _selection(model)
    for layer in moe_layers(tiny_model(family)):
        for name in ("gate_up_proj", "down_proj"):
            key = f"{layer.experts_name}.{name}"
            changed = (merged[key] != base[key]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == sorted(selection.get(layer.index, [])), key
    back = load_rasa_adapter(tiny_model(family), tmp_path / "adapter")
    assert torch.equal(_logits(back, inputs), expected)


def test_adapter_refuses_delta_repairs(tmp_path):
    model = tiny_model("qwen3_moe")
    attach_repairs(model, _selection(model), "delta")
    with pytest.raises(ValueError, match="LoRA repairs"):
        save_peft_adapter(model, tmp_path / "adapter")


def test_empty_selection_is_an_error():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="names no experts"):
        attach_repairs(model, {0: []}, "delta")
