"""Sharded routing recording and active-group gradient reduction under DDP, for tests/training/test_distributed.py.

``python ddp_sharded.py OUT single``: one process, 2 pairs per micro-batch, 2 accumulation steps (a global batch of 4).
``torchrun --nproc_per_node 2 ddp_sharded.py OUT ddp``: two processes (gloo), 2 pairs each, no accumulation (the same
global batch). Both train two rounds (expert, router, expert, router) on the same 16 pairs and write the trained
weights (``weights_<mode>.safetensors``) and a report (``report_<mode>.json``):

- ``recorded_rows``: per process, the rows each routing record ran through the model (counted by a forward hook on
  the model in eval mode, so it counts the compute, not what the recorder says);
- ``routing_shift_phase_start``: the logged values;
- under DDP, ``allreduced``: per phase, the elements and bytes ``torch.distributed.all_reduce`` moved inside training
  steps (DDP's gradient buckets), and the element counts of the repair and router groups; ``stock``: the same run with
  torch's stock all-reduce hook registered first (every trainable gradient reduced, as DDP's built-in reduction
  does; RASA keeps a comm hook it finds), with its counts and whether its weights equal RASA's bit for bit;
  ``uneven``: sharded records whose batches do not split evenly (3 batches, and 1 batch, over 2 processes) against a
  one-process record of the same rows: equal bit for bit, with the forwards each process ran. The single run reports
how far training moved the weights from the base model (``moved_from_base``).
"""

import json
import os
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import tiny_model  # noqa: E402
from tiny_chat import tiny_chat_tokenizer, tiny_pairs  # noqa: E402

from rasa_trainer import RASAConfig, RASATrainer  # noqa: E402
from rasa_trainer.detection.selection import SafetyCriticalExperts, SelectedExpert  # noqa: E402
from rasa_trainer.moe.discovery import moe_layers  # noqa: E402
from rasa_trainer.training.routing_replay import RoutingReplay  # noqa: E402

SELECTED = {0: [1, 3], 1: [2]}
PAIRS = 16


def selection_of(model) -> SafetyCriticalExperts:
    layers = moe_layers(model)
    experts = [SelectedExpert(layers[l].layer_index, l, e, 0.5, 0.6, 0.1) for l, es in SELECTED.items() for e in es]
    return SafetyCriticalExperts(
        experts=experts, model_type=model.config.model_type, num_moe_layers=len(layers),
        num_experts=layers[0].num_experts, top_k=layers[0].top_k, moe_layer_indices=[l.layer_index for l in layers],
        selection={"policy": "test"})


class EvalRows:
    """Rows of every eval-mode forward of a model (the routing records run in eval mode; training steps do not)."""

    def __init__(self, model):
        self.rows = 0
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not module.training:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.rows += ids.shape[0]


class AllReduceCounter:
    """Elements and bytes of every ``torch.distributed.all_reduce`` issued inside a training step, by phase."""

    def __init__(self):
        self.trainer = None
        self.by_phase = defaultdict(lambda: {"calls": 0, "elements": 0, "bytes": 0})
        self._all_reduce = dist.all_reduce
        dist.all_reduce = self._counted

    def _counted(self, tensor, *args, **kwargs):
        if self.trainer is not None and self.trainer.in_step:
            entry = self.by_phase[self.trainer.phases.phase]
            entry["calls"] += 1
            entry["elements"] += tensor.numel()
            entry["bytes"] += tensor.numel() * tensor.element_size()
        return self._all_reduce(tensor, *args, **kwargs)


class StepTrainer(RASATrainer):
    in_step = False

    def training_step(self, *args, **kwargs):
        self.in_step = True
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self.in_step = False


class StockHookFirst(TrainerCallback):
    """Registers torch's stock all-reduce hook on the DDP model before RASA's controller sees it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.trainer.model_wrapped.register_comm_hook(None, allreduce_hook)


def train(out: str, mode: str, counter: AllReduceCounter | None = None, stock: bool = False):
    distributed = mode == "ddp"
    args = RASAConfig(
        output_dir=os.path.join(out, f"run_{mode}{'_stock' if stock else ''}"), rasa_rounds=2,
        per_device_train_batch_size=2, gradient_accumulation_steps=1 if distributed else 2, use_cpu=True,
        bf16=False, report_to="none", save_strategy="no", expert_learning_rate=1e-2, router_learning_rate=1e-2,
        seed=0, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, weight_decay=0.1)
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    eval_rows = EvalRows(model)
    trainer = StepTrainer(model, args=args, train_dataset=tiny_pairs(PAIRS), processing_class=tokenizer,
                          safety_critical_experts=selection_of(model))
    if stock:
        trainer.pop_callback(trainer.phases)
        trainer.add_callback(StockHookFirst(trainer))
        trainer.add_callback(trainer.phases)
    recorded = []
    record = trainer.routing.record

    def counted_record(*a, **k):
        before = eval_rows.rows
        cache = record(*a, **k)
        recorded.append({"forward_rows": eval_rows.rows - before, "recorded_rows": trainer.routing.recorded_rows,
                         "cache_rows": cache.num_examples})
        return cache

    trainer.routing.record = counted_record
    if counter is not None:
        counter.trainer = trainer
    trainer.train()
    if counter is not None:
        counter.trainer = None
    groups = {name: sum(p.numel() for p in params) for name, params in trainer.param_groups.groups.items()}
    weights = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters()}
    shifts = [h["routing_shift_phase_start"] for h in trainer.state.log_history if "routing_shift_phase_start" in h]
    return trainer, weights, {"recorded": recorded, "routing_shift_phase_start": shifts, "group_elements": groups}


def uneven_records(trainer) -> list[dict]:
    """Sharded records of 5 and of 2 rows (batches of 2, 3 retain rows only in the first) against one process's."""
    model = trainer.model
    eval_rows = EvalRows(model)
    results = []
    for rows, retain in ((5, 3), (2, 0)):
        dataset = trainer.train_dataset.select(range(rows))
        retain_rows = [{"input_ids": trainer.train_dataset[i]["input_ids"], "labels": trainer.train_dataset[i]["labels"]}
                       for i in range(PAIRS - retain, PAIRS)]
        common = dict(batch_size=2, device="cpu", replay_weights="cached")
        sharded = RoutingReplay(dataset, trainer.data_collator.base, process_index=dist.get_rank(),
                                num_processes=dist.get_world_size(), **common)
        alone = RoutingReplay(dataset, trainer.data_collator.base, **common)
        for routing in (sharded, alone):
            routing.add_retain_examples(retain_rows)
        before = eval_rows.rows
        got = sharded.record(model, "sharded", keep_weights=True, retain=True)
        forwards = eval_rows.rows - before
        want = alone.record(model, "alone", keep_weights=True, retain=True)
        results.append({
            "rows": rows + retain, "forward_rows": forwards, "recorded_rows": sharded.recorded_rows,
            "equal": torch.equal(got.indices, want.indices) and torch.equal(got.weights, want.weights)
            and torch.equal(got.offsets, want.offsets)})
    return results


def gathered(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main(out: str, mode: str) -> None:
    if mode == "single":
        _, weights, report = train(out, mode)
        base = dict(tiny_model("qwen3_moe", vocab_size=len(tiny_chat_tokenizer())).named_parameters())
        report["moved_from_base"] = max(float((w - base[n]).abs().max()) for n, w in weights.items() if n in base)
        save_file(weights, os.path.join(out, "weights_single.safetensors"))
        with open(os.path.join(out, "report_single.json"), "w") as f:
            json.dump(report, f, indent=2)
        return
    counter = AllReduceCounter()
    trainer, weights, report = train(out, mode, counter)
    allreduced = dict(counter.by_phase)
    uneven = uneven_records(trainer)
    counter.by_phase.clear()
    _, stock_weights, stock_report = train(out, mode, counter, stock=True)
    digest = [float(w.double().sum()) for w in weights.values()]
    result = {
        "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "wrapped": type(trainer.model_wrapped).__name__,
        "recorded": gathered(report["recorded"]), "routing_shift_phase_start": gathered(
            report["routing_shift_phase_start"]),
        "group_elements": report["group_elements"], "allreduced": gathered(allreduced),
        "stock": {"allreduced": gathered(dict(counter.by_phase)),
                  "weights_equal": gathered(all(torch.equal(weights[n], stock_weights[n]) for n in weights)),
                  "recorded": gathered(stock_report["recorded"])},
        "uneven": gathered(uneven), "ranks_identical": len(set(map(tuple, gathered(digest)))) == 1,
    }
    if dist.get_rank() == 0:
        save_file(weights, os.path.join(out, "weights_ddp.safetensors"))
        with open(os.path.join(out, "report_ddp.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
