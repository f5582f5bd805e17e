"""The memory plan: exact counts against real tiny models, the replay-cache size, formulas and errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import batch, tiny_config, tiny_model
from rasa_trainer.memory import MemoryEstimate, estimate_memory
from rasa_trainer.moe import moe_layers
from rasa_trainer.repairs import attach_repairs
from rasa_trainer.replay_cache import RoutingCache

COUNT_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe"]


def _selection(model, count):
    """``count`` experts spread over the MoE layers (round robin)."""
    layers = moe_layers(model)
    chosen: dict[int, list[int]] = {}
    for j in range(count):
        chosen.setdefault(j % len(layers), []).append(j // len(layers))
    return chosen


@pytest.mark.parametrize("family", COUNT_FAMILIES)
def test_parameter_counts_equal_the_real_model(family):
    config = tiny_config(family)
    estimate = estimate_memory(config, 2, dtype="float32")
    model = AutoModelForCausalLM.from_config(config)
    assert estimate.num_parameters == sum(p.numel() for p in model.parameters())
    layers = moe_layers(model)
    assert estimate.num_moe_layers == len(layers)
    assert estimate.num_routed_experts == sum(l.num_experts for l in layers)
    assert estimate.trainable_parameters_router == sum(p.numel() for l in layers for p in l.router.parameters())
    tensors = sum(p.numel() * p.element_size() for p in model.parameters())
    tensors += sum(b.numel() * b.element_size() for b in model.buffers())
    assert estimate.weight_bytes == tensors


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("mode", ["delta", "lora"])
def test_trainable_parameters_equal_the_attached_repairs(family, mode):
    model = tiny_model(family)
    count = 5
    own = sum(p.numel() for p in model.parameters())
    params = attach_repairs(model, _selection(model, count), mode=mode, rank=4)
    estimate = estimate_memory(model, count, expert_tuning=mode, lora_rank=4, dtype="float32", schedule="expert_only")
    assert estimate.trainable_parameters_expert == sum(p.numel() for p in params)
    assert estimate.num_parameters == own  # attached repairs are not counted as the model's own parameters
    assert estimate.phases["expert"].trainable_parameters == estimate.trainable_parameters_expert
    assert estimate.phases["expert"].gradients == 4 * estimate.trainable_parameters_expert


def test_delta_is_the_selected_experts_slices_and_lora_the_formula():
    model = tiny_model("qwen3_moe")
    layer = moe_layers(model)[0]
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    per_expert = gate_up[0].numel() + down[0].numel()
    delta = estimate_memory(model, 3)
    assert delta.parameters_per_expert == per_expert
    assert delta.trainable_parameters_expert == 3 * per_expert
    r = 4
    lora = estimate_memory(model, 3, expert_tuning="lora", lora_rank=r)
    per_expert_lora = r * (gate_up.shape[1] + gate_up.shape[2]) + r * (down.shape[1] + down.shape[2])
    assert lora.trainable_parameters_expert == 3 * per_expert_lora


def test_selection_fraction_of_routed_experts():
    config = tiny_config("olmoe")  # 2 MoE layers x 8 experts
    assert estimate_memory(config, 0.125).selected_experts == 2
    assert estimate_memory(config, 0.5).selected_experts == 8
    assert estimate_memory(config, 16).selected_experts == 16
    assert estimate_memory(config, 3.0).selected_experts == 3


@pytest.mark.parametrize("dtype,weight_bytes", [("float32", 4), ("bfloat16", 2)])
def test_cache_bytes_per_token_formula(dtype, weight_bytes):
    config = tiny_config("olmoe")
    estimate = estimate_memory(config, 2, dtype=dtype, tokens_in_dataset=1000)
    L, k = 2, 2
    assert estimate.replay_cache_bytes_per_token == L * k * (2 + weight_bytes)
    assert estimate.replay_cache_copies == 2  # initial routing + the expert phase's routing
    # the expert phase's cache with weights, the run-start routing with indices only
    assert estimate.replay_cache_bytes == 1000 * (L * k * (2 + weight_bytes) + L * k * 2)
    recompute = estimate_memory(config, 2, dtype=dtype, tokens_in_dataset=1000, replay_weights="recompute")
    assert recompute.replay_cache_bytes_per_token == L * k * 2
    assert recompute.replay_cache_bytes == 1000 * 2 * L * k * 2
    router_only = estimate_memory(config, 2, dtype=dtype, tokens_in_dataset=1000, schedule="router_only")
    assert router_only.replay_cache_copies == 1
    assert router_only.replay_cache_bytes == 1000 * L * k * 2


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token_equal_the_recorded_cache(family, dtype):
    model = tiny_model(family).to(dtype)
    cache = RoutingCache.record(model, [batch()])
    estimate = estimate_memory(model, 2, dtype=dtype, schedule="expert_only")
    assert estimate.replay_cache_bytes_per_token == cache.nbytes_per_token()
    indices_only = RoutingCache.record(model, [batch()], keep_weights=False)
    recompute = estimate_memory(model, 2, dtype=dtype, schedule="expert_only", replay_weights="recompute")
    assert recompute.replay_cache_bytes_per_token == indices_only.nbytes_per_token() == recompute.replay_initial_bytes_per_token


def test_optimizer_state_and_phase_totals():
    config = tiny_config("olmoe")
    est = estimate_memory(config, 4, dtype="bfloat16", schedule="expert_only", optimizer="adamw")
    n = est.trainable_parameters_expert
    expert = est.phases["expert"]
    assert 8 * n <= expert.optimizer_state <= 2.1 * 4 * n
    eight_bit = estimate_memory(config, 4, dtype="bfloat16", schedule="expert_only", optimizer="adamw_8bit")
    assert eight_bit.phases["expert"].optimizer_state < expert.optimizer_state / 3
    alternate = estimate_memory(config, 4, dtype="bfloat16")
    assert set(alternate.phases) == {"expert", "router", "full_sft"}
    # from the second phase on AdamW holds both groups' state
    assert alternate.phases["router"].optimizer_state == alternate.phases["expert"].optimizer_state
    for phase in alternate.phases.values():
        assert phase.total == (phase.weights + phase.optimizer_state + phase.replay_cache
                               + max(phase.activations + phase.transient, phase.gradients + phase.optimizer_step))
    assert alternate.phases["expert"].total < alternate.phases["full_sft"].total
    # torch's AdamW is multi-tensor on accelerators (temporaries for every parameter) and per tensor on the CPU
    on_cpu = estimate_memory(config, 4, dtype="bfloat16", device="cpu")
    assert on_cpu.phases["full_sft"].optimizer_step < alternate.phases["full_sft"].optimizer_step
    assert alternate.phases["full_sft"].optimizer_step == 2 * alternate.num_parameters


def test_activations_scale_with_tokens_and_checkpointing_saves_memory():
    config = tiny_config("qwen3_moe")
    small = estimate_memory(config, 2, batch_size=2, seq_len=16, gradient_checkpointing=False)
    big = estimate_memory(config, 2, batch_size=4, seq_len=16, gradient_checkpointing=False)
    for phase in ("expert", "router", "full_sft"):
        assert big.phases[phase].activations > 1.8 * small.phases[phase].activations
    deep = tiny_config("qwen3_moe", num_hidden_layers=8)
    plain = estimate_memory(deep, 2, seq_len=256, gradient_checkpointing=False)
    checkpointed = estimate_memory(deep, 2, seq_len=256, gradient_checkpointing=True)
    assert checkpointed.phases["full_sft"].activations < plain.phases["full_sft"].activations


def test_from_local_config_path_and_model_object(tmp_path):
    config = tiny_config("mixtral")
    config.save_pretrained(tmp_path)
    by_dir = estimate_memory(str(tmp_path), 2)
    by_file = estimate_memory(tmp_path / "config.json", 2)
    by_config = estimate_memory(config, 2)
    assert by_dir.num_parameters == by_file.num_parameters == by_config.num_parameters
    loose = tmp_path / "plan.json"
    loose.write_text(json.dumps(config.to_dict()))
    assert estimate_memory(str(loose), 2).num_parameters == by_config.num_parameters


def test_format_is_a_table():
    estimate = estimate_memory(tiny_config("olmoe"), 0.25, tokens_in_dataset=10_000, num_processes=2)
    assert isinstance(estimate, MemoryEstimate)
    text = estimate.format()
    for needle in ("expert phase", "router phase", "full SFT", "optimizer state", "activations", "routing-replay cache",
                   "total per device (peak)", "total, 2 processes", "for 10,000 tokens"):
        assert needle in text
    assert estimate.to_dict()["phases"]["expert"]["total"] == estimate.phases["expert"].total


def test_errors_are_clear():
    config = tiny_config("olmoe")
    for bad in (0, -1, 17, 1.5, True, "x"):
        with pytest.raises((ValueError, TypeError)):
            estimate_memory(config, bad)
    with pytest.raises(ValueError, match="dtype"):
        estimate_memory(config, 2, dtype="int3")
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(config, 2, optimizer="sgd")
    with pytest.raises(ValueError, match="expert_tuning"):
        estimate_memory(config, 2, expert_tuning="full")
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory(config, 2, batch_size=0)
    with pytest.raises(ValueError, match="offline"):
        estimate_memory("no-such-org/no-such-moe-model-xyz", 2)
    with pytest.raises(TypeError):
        estimate_memory(12, 2)
    from transformers import AutoConfig

    llama = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)
    with pytest.raises(ValueError, match="dense model"):
        estimate_memory(llama, 2)
