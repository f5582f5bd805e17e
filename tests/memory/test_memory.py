"""The memory plan: exact counts against real tiny models, the replay-cache size, formulas and errors."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import batch, tiny_config, tiny_model
from rasa_trainer.memory import MemoryEstimate, estimate_memory
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.repairs.layer import attach_repairs
from rasa_trainer.moe.replay_cache import RoutingCache

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
                               + max(phase.activations + phase.transient, phase.gradients + phase.optimizer_step,
                                     phase.gradients + phase.no_grad_forward))
        assert phase.device_total == phase.total + phase.allocator_slack + phase.device_context
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
                   "no-grad forward", "total per device (peak)", "+ allocator slack, context",
                   "total, 2 processes", "for 10,000 tokens"):
        assert needle in text
    assert estimate.to_dict()["phases"]["expert"]["total"] == estimate.phases["expert"].total
    assert estimate.to_dict()["phases"]["expert"]["device_total"] == estimate.phases["expert"].device_total


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


# ---------------------------------------------------------------------------------------------------------------
# What the repaired forward saves for backward, layer by layer, against the tensors autograd really saves
# ---------------------------------------------------------------------------------------------------------------


def _measured_saved_per_layer(model, phase: str, mode: str, mixed_precision: bool, batch_size: int, seq: int):
    """Bytes autograd saves in each decoder layer during one training forward (parameters excluded, storages
    counted once), with RASA's phase set-up: base frozen, repairs or routers trainable, routing replayed in the
    expert phase."""
    import collections
    import contextlib

    from rasa_trainer.repairs.layer import upcast_routers
    from rasa_trainer.moe.routing import record_routing, replay_routing

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad(), record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = moe_layers(model)
    selection = {l.index: list(range(0, l.num_experts, 2)) for l in layers}  # half of the experts: a stable share
    repairs = attach_repairs(model, selection, mode=mode, rank=8)
    routers = upcast_routers(model)
    for p in repairs:
        p.requires_grad_(phase == "expert")
    for p in routers:
        p.requires_grad_(phase == "router")
    model.train()
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = collections.defaultdict(dict)
    current = [None]
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
    model.model.norm.register_forward_pre_hook(lambda m, a: current.__setitem__(0, None))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned and current[0] is not None:
            saved[current[0]][ptr] = t.untyped_storage().nbytes()
        return t

    replay = replay_routing(model, rec.routing()) if phase == "expert" else contextlib.nullcontext()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed_precision else contextlib.nullcontext()
    with replay, autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return [sum(saved[i].values()) for i in range(len(model.model.layers))]


SAVED_CASES = [
    ("qwen3_moe", "expert", "delta", torch.float32, False),
    ("qwen3_moe", "expert", "lora", torch.float32, False),
    ("qwen3_moe", "expert", "delta", torch.bfloat16, True),
    ("qwen3_moe", "expert", "lora", torch.bfloat16, True),
    ("qwen3_moe", "expert", "lora", torch.bfloat16, False),
    ("qwen3_moe", "router", "lora", torch.bfloat16, True),
    ("qwen3_moe", "router", "delta", torch.float32, False),
    ("olmoe", "expert", "lora", torch.bfloat16, True),
    ("olmoe", "router", "delta", torch.bfloat16, True),
]


@pytest.mark.parametrize("family,phase,mode,dtype,mixed", SAVED_CASES)
def test_saved_activations_per_layer_match_autograd(family, phase, mode, dtype, mixed):
    """The per-layer formulas (attention, router, unselected assignments through the kernel, the selected experts'
    delta or LoRA path, per-slot outputs in the router phase) against the bytes autograd saves, within 10% for
    every layer whose input needs a gradient and for the sum (the first layer saves little; 25% there)."""
    H, E = 128, 16
    overrides = dict(hidden_size=H, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=256, num_experts_per_tok=4)
    if family == "qwen3_moe":
        overrides.update(moe_intermediate_size=64, num_experts=E, head_dim=32, intermediate_size=256)
    else:
        overrides.update(intermediate_size=64, num_experts=E, num_key_value_heads=4)
    model = tiny_model(family, **overrides).to(dtype)
    batch_size, seq = 4, 32
    measured = _measured_saved_per_layer(model, phase, mode, mixed, batch_size, seq)
    estimate = estimate_memory(model, 0.5, expert_tuning=mode, lora_rank=8, dtype=dtype, batch_size=batch_size,
                               seq_len=seq, gradient_checkpointing=False, schedule="alternate", mixed_precision=mixed)
    planned = estimate.phases[phase].saved_per_layer
    assert len(planned) == len(measured)
    assert planned[0] == pytest.approx(measured[0], rel=0.25)
    for got, want in zip(planned[1:], measured[1:]):
        assert got == pytest.approx(want, rel=0.10)
    assert sum(planned) == pytest.approx(sum(measured), rel=0.10)


def test_lora_buffers_are_counted():
    """LoRA mode's plan counts its own buffers: the skinny products' fp32 inputs without autocast (16-bit ones
    under it), the autocast copies of the factors, and the B @ A of the merged copy in a forward without gradients;
    it no longer counts the delta mode's effective slices."""
    config = tiny_config("qwen3_moe", hidden_size=128, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
                         head_dim=32)
    kw = dict(dtype="bfloat16", batch_size=4, seq_len=64, gradient_checkpointing=False, schedule="expert_only")
    pure = estimate_memory(config, 0.25, expert_tuning="lora", mixed_precision=False, **kw).phases["expert"]
    amp = estimate_memory(config, 0.25, expert_tuning="lora", mixed_precision=True, **kw).phases["expert"]
    delta = estimate_memory(config, 0.25, expert_tuning="delta", **kw).phases["expert"]
    assert pure.activations > amp.activations  # fp32 copies of x and h vs their bf16 autocast copies
    assert delta.no_grad_forward < amp.no_grad_forward  # B @ A and its scaled copy in the merged-copy forward
    assert amp.activations < delta.activations  # no [S, out, in] effective slices kept for backward


def test_no_grad_forward_is_one_layers_merged_copy():
    """A forward without gradients while repairs are attached copies one layer's fused experts with the repaired
    slices written in (bf16), builds those slices in fp32 (LoRA: with B @ A), and runs the kernel."""
    config = tiny_config("qwen3_moe", hidden_size=128, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
                         head_dim=32)
    model = AutoModelForCausalLM.from_config(config)
    layer = moe_layers(model)[0]
    names = layer.expert_parameter_names()
    fused = sum(getattr(layer.experts, n).numel() for n in names) * 2
    largest = max(getattr(layer.experts, n)[0].numel() for n in names)
    T, k, H, I = 2 * 8, 4, 128, 64
    for mode, fp32_bytes in (("delta", 12), ("lora", 16)):
        est = estimate_memory(config, 0.25, expert_tuning=mode, dtype="bfloat16", batch_size=2, seq_len=8)
        expected = fused + 4 * largest * (2 + fp32_bytes) + T * k * 2 * (2 * H + 3 * I)  # 4 of 16 experts selected
        assert est.phases["expert"].no_grad_forward == expected
        assert est.phases["router"].no_grad_forward == expected  # the anchor pass of the router phase
    router_only = estimate_memory(config, 0.25, dtype="bfloat16", schedule="router_only")
    assert router_only.phases["router"].no_grad_forward == 0  # no repairs attached


def test_allocator_slack_and_device_context():
    config = tiny_config("olmoe")
    cuda = estimate_memory(config, 2, dtype="bfloat16", allocator_slack=0.1, device_context_bytes=2**20)
    for phase in cuda.phases.values():
        assert phase.allocator_slack == int(0.1 * (phase.total - phase.weights))
        assert phase.device_context == 2**20
    cpu = estimate_memory(config, 2, dtype="bfloat16", device="cpu")
    assert all(p.device_context == 0 for p in cpu.phases.values())
    with pytest.raises(ValueError, match="allocator_slack"):
        estimate_memory(config, 2, allocator_slack=1.5)


# ---------------------------------------------------------------------------------------------------------------
# Plans of the shipped configs
# ---------------------------------------------------------------------------------------------------------------

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "configs")


def test_qwen3_30b_one_gpu_config_fits_80_gib():
    """examples/configs/qwen3_30b_a3b_1gpu.yaml, planned from the file itself (its model id resolves to the
    published Qwen3-30B-A3B config values offline): both phases at or under 80 GiB on one device, allocator slack
    and CUDA context included, with the LoRA buffers counted."""
    import yaml

    from rasa_trainer.memory import estimate_memory_from_config

    path = os.path.join(CONFIGS, "qwen3_30b_a3b_1gpu.yaml")
    with open(path) as f:
        values = yaml.safe_load(f)
    assert values["expert_tuning"] == "lora" and values["activation_checkpointing"] is True
    assert values["replay_cache_device"] == "cpu" and values["bf16"] is True and values["dtype"] == "bfloat16"
    assert "gradient_checkpointing" not in values
    plan = estimate_memory_from_config(path)
    assert plan.model_type == "qwen3_moe" and plan.num_moe_layers == 48 and plan.num_experts == 128
    assert plan.num_parameters == pytest.approx(30.5e9, rel=0.01)
    assert plan.selected_experts == 768 and plan.settings["expert_tuning"] == "lora"
    assert plan.settings["lora_rank"] == values["expert_lora_rank"] and plan.settings["mixed_precision"]
    assert set(plan.phases) == {"expert", "router", "full_sft"}
    for name in ("expert", "router"):
        phase = plan.phases[name]
        assert phase.device_total <= 80 * 2**30, (name, phase.device_total / 2**30)
        assert phase.total > plan.weight_bytes  # the plan is not just the weights
        assert phase.no_grad_forward > 0 and phase.allocator_slack > 0 and phase.device_context > 0
        # a no-gradient forward runs these large layers per slot: without the 1.1 GiB copy of a layer's fused
        # experts (the copy path would take 2.16 GiB: the copy, the selected slices merged in fp32, the kernel)
        assert phase.no_grad_forward < 2 * 2**30
    # the authors' multi-GPU config stays delta mode and does not fit one 80 GB device
    authors = estimate_memory_from_config(os.path.join(CONFIGS, "qwen3_30b_a3b.yaml"))
    assert authors.settings["expert_tuning"] == "delta"
    assert authors.phases["expert"].device_total > 80 * 2**30


def test_estimate_from_config_reads_the_training_keys(tmp_path):
    import yaml

    from rasa_trainer.memory import estimate_memory_from_config

    config = tiny_config("olmoe")
    config.save_pretrained(tmp_path / "model")
    values = dict(model_name_or_path=str(tmp_path / "model"), dtype="bfloat16", bf16=True, expert_tuning="lora",
                  expert_lora_rank=4, per_device_train_batch_size=2, max_length=64, activation_checkpointing=False,
                  optim="adamw_bnb_8bit", rasa_schedule="expert_only", sce_num_experts=3, replay_weights="recompute")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    plan = estimate_memory_from_config(str(path))
    direct = estimate_memory(config, 3, expert_tuning="lora", lora_rank=4, dtype="bfloat16", batch_size=2, seq_len=64,
                             gradient_checkpointing=False, optimizer="adamw_8bit", schedule="expert_only",
                             replay_weights="recompute", mixed_precision=True)
    assert plan.to_dict() == direct.to_dict()
    assert estimate_memory_from_config(values, num_processes=2).settings["num_processes"] == 2
    with pytest.raises(ValueError, match="optim"):
        estimate_memory_from_config({**values, "optim": "sgd"})


# ---------------------------------------------------------------------------------------------------------------
# impossible values are refused before any work (issue 21, item 8)


def test_selection_value_is_a_count_or_a_fraction():
    from rasa_trainer.memory.plan import selection_value

    assert selection_value(0.125) == 0.125 and selection_value(8) == 8 and selection_value(8.0) == 8
    assert isinstance(selection_value(8.0), int) and selection_value("0.5") == 0.5
    for bad, fragment in [(1.5, "neither a whole count"), (0, ">= 1"), (-2, ">= 1"), (float("nan"), ">= 1"),
                          (float("inf"), ">= 1"), ("many", "give a count"), (True, "give a count")]:
        with pytest.raises(ValueError, match=fragment):
            selection_value(bad)
    with pytest.raises(ValueError, match="neither a whole count"):
        estimate_memory(tiny_config("olmoe"), 1.5)


def test_impossible_config_values_are_named():
    from rasa_trainer.memory.models import check_config_sizes

    with pytest.raises(ValueError, match=r"--config_kwargs: impossible model values: hidden_size=2\.5 .*; "
                                         r"num_experts=-3"):
        check_config_sizes({"num_experts": -3, "hidden_size": 2.5}, "--config_kwargs")
    with pytest.raises(ValueError, match="num_experts_per_tok=9 is more than the 8 experts"):
        check_config_sizes({"num_experts": 8, "num_experts_per_tok": 9})
    check_config_sizes(tiny_config("olmoe"))


def test_estimate_memory_from_config_refuses_a_fractional_count():
    from rasa_trainer.memory import estimate_memory_from_config

    with pytest.raises(ValueError, match=r"sce_num_experts=1\.5: neither a whole count"):
        estimate_memory_from_config({"sce_num_experts": 1.5}, model=tiny_config("olmoe"))


@pytest.mark.parametrize("argv, fragment", [
    (["--selection", "1.5"], "--selection 1.5: neither a whole count of experts nor a fraction in (0, 1)"),
    (["--selection", "-1"], "--selection -1.0: give a count of experts (>= 1)"),
    (["--selection", "100000"], "--selection 100000: the model has 1024 routed experts; give 1..1024"),
    (["--tokens_in_dataset", "-5"], "--tokens_in_dataset -5: must be at least 0"),
    (["--config_kwargs", '{"num_experts": -3}'], "--config_kwargs: impossible model values: num_experts=-3"),
    (["--config_kwargs", '{"num_experts": 2.5}'], "num_experts=2.5 (a size: give a whole number >= 1)"),
    (["--config_kwargs", '{"num_experts_per_tok": 500}'], "num_experts_per_tok=500 is more than the 64 experts"),
    (["--config_kwargs", '{"rope_theta": "x"}'], "check --config_kwargs"),
])
def test_estimate_memory_cli_refuses_impossible_values(argv, fragment, capsys):
    from rasa_trainer.cli import main

    assert main(["estimate-memory", "--model", "OLMoE-1B-7B", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
