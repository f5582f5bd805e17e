"""A checkpoint's merged weights without a copy of every repaired layer: ``merged_for_saving`` writes the repairs into
the fused tensors in place and restores the selected experts' original slices exactly on exit."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny_model
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.repairs.layer import attach_repairs, merged_for_saving, merged_state_dict, repair_modules
from rasa_trainer.memory.measure import cpu_allocated_peak as _allocated_peak


def _repaired(family: str, mode: str = "delta", num_layers: int | None = None):
    model = tiny_model(family, **({"num_hidden_layers": num_layers} if num_layers else {}))
    attach_repairs(model, {l.index: [1] for l in moe_layers(model)}, mode)  # every layer, one expert
    torch.manual_seed(1)
    with torch.no_grad():
        for _, repairs in repair_modules(model):
            for p in repairs.parameters():
                p.normal_(0, 0.05)
    return model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["delta", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_for_saving_equals_the_merged_state_dict_and_restores_the_model(family, mode):
    model = _repaired(family, mode)
    before = _snapshot(model)
    expected = merged_state_dict(model)
    live = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with merged_for_saving(model) as state:
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
            assert state[key].data_ptr() == live[key], f"{key} was copied"  # the live weights, merged in place
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit-exact restore


def test_merged_for_saving_restores_the_model_when_the_save_fails():
    model = _repaired("qwen3_moe")
    before = _snapshot(model)
    with pytest.raises(OSError, match="disk full"):
        with merged_for_saving(model):
            raise OSError("disk full")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_merged_for_saving_leaves_a_given_state_dict_as_it_found_it():
    """Under FSDP/ZeRO-3 the save passes the gathered full state dict: it gets the same merge and the same restore."""
    model = _repaired("olmoe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    with merged_for_saving(model, state) as merged:
        expected = merged_state_dict(model, before)
        assert all(torch.equal(merged[k], v) for k, v in expected.items())
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_a_save_holds_the_selected_slices_not_a_copy_of_every_repaired_layer():
    """Measured on the CPU allocator, with one of 8 experts repaired in each of 4 layers: the clone path holds every
    repaired layer's fused tensors at once; the in-place path holds the selected experts' slices (1/8 of them) plus
    one parameter's transient merge."""
    model = _repaired("qwen3_moe", num_layers=4)
    fused = sum(getattr(l.experts, n).numel() * getattr(l.experts, n).element_size()
                for l, r in repair_modules(model) for n in r.names)
    selected_slices = fused // 8

    def with_copies():
        state = merged_state_dict(model)
        del state

    def in_place():
        with merged_for_saving(model):
            pass

    copies, merged = _allocated_peak(with_copies), _allocated_peak(in_place)
    assert copies >= fused
    assert merged <= 3 * selected_slices, (merged, selected_slices, fused)


@pytest.mark.parametrize("mode", ["delta", "lora"])
def test_the_memory_plan_counts_a_save(mode):
    """``estimate_memory`` gains the save: the selected experts' original slices held on the host
    (``save_host_bytes``) and one fused parameter's transient merge on the device (``save_merge``, inside the peak);
    together they bound what the CPU allocator measures for ``merged_for_saving`` on the same model, and the host
    part is what it holds throughout."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from rasa_trainer.memory import estimate_memory

    config = tiny_config("qwen3_moe", hidden_size=128, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
                         head_dim=32)
    plan = estimate_memory(config, 0.25, expert_tuning=mode, dtype="bfloat16", batch_size=2, seq_len=8)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    attach_repairs(model, {l.index: [0, 5, 9, 12] for l in moe_layers(model)}, mode)  # 4 of 16 in every layer
    with torch.no_grad():
        for _, repairs in repair_modules(model):
            for p in repairs.parameters():
                p.normal_(0, 0.05)

    def in_place():
        with merged_for_saving(model):
            pass

    measured = _allocated_peak(in_place)
    phase = plan.phases["expert"]
    assert phase.save_merge > 0 and plan.phases["router"].save_merge == phase.save_merge
    assert plan.save_host_bytes <= measured <= plan.save_host_bytes + phase.save_merge, (measured, plan.save_host_bytes,
                                                                                        phase.save_merge)
    assert phase.total >= phase.weights + phase.optimizer_state + phase.save_merge
