"""The expert phase's hot path makes the host wait for the device a fixed number of times per training step, however
many MoE layers the model has: replayed routing is moved to the device once per step and the repair layer splits a
layer's assignments on the host copy of the replayed indices (no ``nonzero``, ``bincount().tolist()`` or per-expert
loop). Counted with the GPU check's CPU counter (``benchmarks/gpu_check.py::SyncCounter``): on the CPU it counts the
ops that would wait on an accelerator, where they are called."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import TrainerCallback

from conftest import tiny_model
from tiny_chat import tiny_chat_tokenizer, tiny_pairs
from rasa_trainer import RASAConfig, RASATrainer
from rasa_trainer.detection.selection import SafetyCriticalExperts, SelectedExpert
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.routing import host_indices, record_routing, replay_routing
from rasa_trainer.repairs.layer import attach_repairs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
from gpu_check import SyncCounter  # noqa: E402

OURS = ("layer.py", "routing.py")  # the repair layer and the replay: no per-layer waits may come from there


def _selection(model, per_layer: int = 3) -> SafetyCriticalExperts:
    layers = moe_layers(model)
    experts = [SelectedExpert(l.layer_index, l.index, e, 0.5, 0.6, 0.1) for l in layers for e in range(per_layer)]
    return SafetyCriticalExperts(
        experts=experts, model_type=model.config.model_type, num_moe_layers=len(layers),
        num_experts=layers[0].num_experts, top_k=layers[0].top_k, moe_layer_indices=[l.layer_index for l in layers],
        selection={"policy": "test"})


def _syncs_per_step(tmp_path, num_layers: int, tuning: str, kernel: str) -> list:
    """The counter of each expert-phase training step (forward, backward, clipping, optimiser step)."""
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tokenizer), num_hidden_layers=num_layers)
    model.set_experts_implementation(kernel)
    args = RASAConfig(output_dir=str(tmp_path / f"{num_layers}-{tuning}-{kernel}"), rasa_rounds=1,
                      rasa_schedule="expert_only", expert_tuning=tuning, per_device_train_batch_size=4, use_cpu=True,
                      report_to="none", logging_steps=1000, save_strategy="no", disable_tqdm=True, seed=0,
                      dataloader_num_workers=0)
    trainer = RASATrainer(model, args=args, train_dataset=tiny_pairs(8), processing_class=tokenizer,
                          safety_critical_experts=_selection(model))
    counters = []

    class Count(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            counters.append(SyncCounter("cpu").__enter__())

        def on_step_end(self, *args, **kwargs):
            counters[-1].__exit__(None, None, None)

    trainer.add_callback(Count())
    trainer.train()
    assert len(counters) == 2
    return counters


@pytest.mark.parametrize("tuning,kernel", [("delta", "grouped_mm"), ("lora", "grouped_mm"), ("delta", "batched_mm")])
def test_expert_step_syncs_do_not_grow_with_the_number_of_layers(tmp_path, tuning, kernel):
    two, four = _syncs_per_step(tmp_path, 2, tuning, kernel), _syncs_per_step(tmp_path, 4, tuning, kernel)
    for step, (a, b) in enumerate(zip(two, four)):
        assert a.total == b.total, (f"step {step}: {a.total} waits with 2 MoE layers, {b.total} with 4",
                                    dict(a.counts), dict(b.counts))
        assert a.total > 0  # the step's own reads (loss, metrics, the batch's cache rows) are seen
        assert not [site for site in b.counts if site.split(":")[0].split()[-1] in OURS], dict(b.counts)


def test_the_counter_sees_the_per_layer_read_of_live_routing():
    """Without replay the repair layer reads one count per repaired layer (the size of its two groups): the counter
    sees it there, once per layer, so the test above would see per-layer waits come back."""
    torch.manual_seed(0)
    counts = {}
    for num_layers in (2, 4):
        model = tiny_model("olmoe", num_hidden_layers=num_layers)
        model.set_experts_implementation("grouped_mm")
        attach_repairs(model, {l.index: [0, 1, 2] for l in moe_layers(model)}, "delta")
        ids = torch.randint(3, 128, (2, 6))
        with SyncCounter("cpu") as counter:
            model(input_ids=ids).logits.sum().backward()
        counts[num_layers] = sum(n for site, n in counter.counts.items() if "layer.py" in site)
    assert counts == {2: 2, 4: 4}


def test_counter_counts_each_kind_of_wait():
    x = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter("cpu") as counter:
        x.nonzero()
        x.tolist()
        float(x.sum())
        x.cpu()
        x[x > 0]
        torch.bincount(torch.tensor([1, 2]))
        x.numpy()  # host only: never a device wait
    kinds = sorted(site.rsplit(" ", 1)[0] for site in counter.counts)
    assert kinds == ["_local_scalar_dense", "bincount", "cpu", "index[bool mask]", "nonzero", "tolist"]
    assert counter.total == 6


def test_replayed_indices_carry_their_host_copy_until_changed():
    model = tiny_model("olmoe")
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad(), record_routing(model) as rec:
        model(input_ids=ids)
    routing = rec.routing()
    seen = []
    layer = moe_layers(model)[0]
    handle = layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad(), replay_routing(model, routing):
        model(input_ids=ids)
    handle.remove()
    (replayed,) = seen
    host = host_indices(replayed)
    assert host is not None and host.dtype.name == "int64"
    assert torch.equal(torch.from_numpy(host), routing.indices[0].long())
    live = routing.indices[0].long().clone()
    assert host_indices(live) is None  # live routing has no host copy
    replayed.add_(0)  # an in-place change voids it
    assert host_indices(replayed) is None
