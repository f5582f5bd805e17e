"""Adapters carry and check their identity: ``rasa_adapter.json`` records the model type, the hidden size and every
MoE layer's experts and expert shapes; ``load_rasa_adapter`` attaches nothing unless the adapter agrees with the
model (type, MoE layers, experts, shapes) and with itself (the rank read from the tensors, both JSON files on rank,
alpha, targets and routers, and non-zero factors exactly for the selected experts). Each difference is named.

As a user meets it: ``rasa_trainer.repairs.adapter.load_rasa_adapter(base_model, "<run>/model/adapter")``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import batch, tiny_model
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.repairs.adapter import load_rasa_adapter, save_peft_adapter
from rasa_trainer.repairs.layer import attach_repairs, repair_modules, upcast_routers

SELECTION = {0: [1, 3], 1: [2]}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A trained-looking LoRA adapter (rank 4, alpha 8) of the tiny qwen3_moe, and the logits it gives."""
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model = tiny_model("qwen3_moe")
    attach_repairs(model, SELECTION, "lora", rank=4, alpha=8)
    upcast_routers(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, repairs in repair_modules(model):
            for p in repairs.parameters():
                p.normal_(0, 0.05)
        expected = model(**batch()).logits
    save_peft_adapter(model, folder)
    return folder, expected


def edited(adapter_folder, tmp_path, file, change):
    copy = tmp_path / "edited"
    shutil.copytree(adapter_folder, copy)
    data = json.loads((copy / file).read_text())
    change(data)
    (copy / file).write_text(json.dumps(data))
    return copy


def test_identity_is_recorded(adapter):
    info = json.loads((adapter[0] / "rasa_adapter.json").read_text())
    assert info["model_type"] == "qwen3_moe" and info["hidden_size"] == 32
    assert [layer["num_experts"] for layer in info["moe_layers"]] == [8, 8]
    assert info["moe_layers"][0]["shapes"] == {"gate_up_proj": [8, 32, 32], "down_proj": [8, 32, 16]}
    assert info["rank"] == 4 and info["alpha"] == 8 and info["selection"] == {"0": [1, 3], "1": [2]}


def test_the_adapter_loads_onto_its_own_model(adapter):
    folder, expected = adapter
    model = load_rasa_adapter(tiny_model("qwen3_moe"), folder)
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, expected)


def test_another_family_of_the_same_shapes_is_refused(adapter):
    olmoe = tiny_model("olmoe")
    # the shapes are those of the adapter: only the identity tells the families apart (PEFT itself loads it)
    assert [tuple(layer.experts.gate_up_proj.shape) for layer in moe_layers(olmoe)] == [(8, 32, 32)] * 2
    with pytest.raises(ValueError, match="was written for another model: model type: adapter qwen3_moe, model olmoe"):
        load_rasa_adapter(olmoe, adapter[0])
    assert not repair_modules(olmoe)  # nothing attached


@pytest.mark.parametrize("overrides, message", [
    ({"num_hidden_layers": 3}, "MoE layers: adapter 2, model 3"),
    ({"moe_intermediate_size": 8}, "MoE layer 0 expert shapes: adapter"),
    ({"num_experts": 4}, "MoE layer 0 experts: adapter 8, model 4"),
])
def test_another_shape_of_the_family_is_refused(adapter, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_rasa_adapter(tiny_model("qwen3_moe", **overrides), adapter[0])


@pytest.mark.parametrize("file, change, message", [
    ("rasa_adapter.json", lambda d: d.update(rank=2), r"rank: rasa_adapter.json 2, adapter_config.json r 4"),
    ("rasa_adapter.json", lambda d: d.update(alpha=16), r"alpha: rasa_adapter.json 16, adapter_config.json lora_alpha 8"),
    ("adapter_config.json", lambda d: d.update(r=8), r"rank: rasa_adapter.json 4, adapter_config.json r 8"),
    ("adapter_config.json", lambda d: d.update(lora_alpha=32), r"alpha: rasa_adapter.json 8, adapter_config.json "
                                                               r"lora_alpha 32"),
    ("rasa_adapter.json", lambda d: d["selection"].update({"0": [1, 2]}),
     r"selection: rasa_adapter.json names experts \[1, 2\] of MoE layer 0, the factors of .* are those of experts "
     r"\[1, 3\]"),
    ("rasa_adapter.json", lambda d: d["selection"].pop("1"), r"targets: adapter_config.json targets"),
    ("rasa_adapter.json", lambda d: d.update(routers=False), r"routers: rasa_adapter.json routers=False"),
])
def test_a_tampered_adapter_is_refused_naming_what_differs(adapter, tmp_path, file, change, message):
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match=f"does not agree with itself: .*{message}"):
        load_rasa_adapter(model, edited(adapter[0], tmp_path, file, change))
    assert not repair_modules(model)


def test_rank_of_the_tensors_is_checked_when_both_files_are_edited(adapter, tmp_path):
    copy = edited(adapter[0], tmp_path, "rasa_adapter.json", lambda d: d.update(rank=2))
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(ValueError, match=r"rank: rasa_adapter.json 2, the tensors of .* 4 \(.*lora_A.weight has 32 rows "
                                         r"for 8 experts\)"):
        load_rasa_adapter(tiny_model("qwen3_moe"), copy)
