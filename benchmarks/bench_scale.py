"""RASA at real layer shapes on the CPU: two OLMoE-1B-7B-shaped MoE layers against full-parameter SFT and PEFT LoRA on
every expert, in one run.

Model: OLMoE with OLMoE-1B-7B-0125's shapes (``rasa_trainer.memory.PRESETS``: hidden 2048, 64 experts, top-8, expert
intermediate 1024, 16 heads), two decoder layers and a 1024-entry vocabulary (the embedding is not what is compared),
random bf16 weights (about 0.8 B parameters, 1.6 GB). Data: synthetic pairs of about ``--seq`` tokens for a
word-level chat tokenizer, batch ``--batch``. Every run: ``bf16=True``, activation checkpointing, AdamW (torch), one
epoch of ``--steps`` steps, the same data, a fresh copy of the same model.

Runs: RASA expert phase with ``delta`` repairs and with LoRA repairs (rank 8) of 12.5% of the routed experts (drawn at
random, fixed seed), RASA router phase, full-parameter ``SFTTrainer``, and ``SFTTrainer`` with PEFT LoRA (rank 8) on
every expert (``target_parameters``).

Measured per run:

- **step time**: the median of the steps between the first and the last (``on_step_begin`` to ``on_step_end``:
  forward, backward, clipping, optimiser step); with ``--steps 2`` the first;
- **peak**: the bytes alive at the start of the last step (parameters, buffers, gradients, optimiser state) plus the
  CPU allocator's peak during that step (the torch profiler's memory events; ``rasa_trainer.memory.measure``);
  the last step is profiled and not timed;
- **RASA's bookkeeping** (RASA runs): wall time per step in the step's routing built from the cache, the replay's
  move of it (entering and leaving ``replay_routing``), the repair layer's split of each layer's assignments, and the
  routers' fp32 hooks, as a share of the step; and the phase-start routing record, once per expert phase;
- **a mid-training save** (after the delta run's first step, repairs attached): the CPU allocator's peak of the
  save's in-place merge and of the whole ``trainer.save_model``, against the memory plan's save terms
  (``save_merge`` + ``save_host_bytes``: host and device are one memory here) and one layer's expert weights.

Ratios are printed against full-parameter SFT. The CPU's times are not a GPU's; the ratios of work and memory are
what carries over. Default: under 5 minutes on 2 cores (``OMP_WAIT_POLICY=PASSIVE``).

Usage: ``python benchmarks/bench_scale.py [--steps 3] [--batch 2] [--seq 64] [--threads 2] [--only delta full]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

FRACTION = 0.125
RUNS = ("delta", "lora", "router", "full", "peft")
LABELS = {"delta": "RASA expert phase, delta", "lora": "RASA expert phase, LoRA r8", "router": "RASA router phase",
          "full": "full-parameter SFT (SFTTrainer)", "peft": "PEFT LoRA r8 on every expert"}
MIB = 2**20


# --smoke: the same runs at a small width, to check the script end to end in a minute (its numbers mean nothing)
SMOKE = dict(hidden_size=256, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def olmoe_two_layers(seed: int = 0, smoke: bool = False):
    """OLMoE-1B-7B's layer shapes, two layers, a small vocabulary, random bf16 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rasa_trainer.memory import PRESETS

    model_type, values = PRESETS["OLMoE-1B-7B"]
    config = AutoConfig.for_model(model_type, **{**values, "num_hidden_layers": 2, "vocab_size": 1024,
                                                  "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                                  **(SMOKE if smoke else {})})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.train()


# ------------------------------------------------------------------------------------------------------------------
# RASA's bookkeeping, timed where it runs
# ------------------------------------------------------------------------------------------------------------------


class Bookkeeping:
    """Wall time in RASA's bookkeeping, by part, while :meth:`patched` is active (module functions wrapped)."""

    PARTS = ("routing of the step", "replay move", "assignment split", "router fp32 hooks", "phase-start record")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    def _timed(self, part: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
        return wrapper

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def patched(self):
        import rasa_trainer.repairs.layer as layer
        import rasa_trainer.training.routing_replay as replay

        original_replay = replay.replay_routing
        book = self

        @contextlib.contextmanager
        def timed_replay(*args, **kwargs):
            start = time.perf_counter()
            manager = original_replay(*args, **kwargs)
            manager.__enter__()
            book.seconds["replay move"] += time.perf_counter() - start
            try:
                yield
            finally:
                start = time.perf_counter()
                manager.__exit__(None, None, None)
                book.seconds["replay move"] += time.perf_counter() - start

        saved = [(replay, "replay_routing", original_replay),
                 (replay.RoutingReplay, "batch_routing", replay.RoutingReplay.batch_routing),
                 (replay.RoutingReplay, "record", replay.RoutingReplay.record),
                 (layer, "_split_assignments", layer._split_assignments),
                 (layer, "_cast_input_fp32", layer._cast_input_fp32),
                 (layer, "_cast_weights_back", layer._cast_weights_back)]
        replay.replay_routing = timed_replay
        replay.RoutingReplay.batch_routing = self._timed("routing of the step", replay.RoutingReplay.batch_routing)
        replay.RoutingReplay.record = self._timed("phase-start record", replay.RoutingReplay.record)
        layer._split_assignments = self._timed("assignment split", layer._split_assignments)
        layer._cast_input_fp32 = self._timed("router fp32 hooks", layer._cast_input_fp32)
        layer._cast_weights_back = self._timed("router fp32 hooks", layer._cast_weights_back)
        try:
            yield self
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)


# ------------------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------------------


def _state_bytes(trainer) -> int:
    """Bytes alive between steps: parameters, buffers, gradients and optimiser state (storages counted once)."""
    storages = {}
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def build_trainer(kind: str, model, pairs, tokenizer, out_dir: str, args):
    import bench_trainer as bt
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rasa_trainer import RASAConfig, RASATrainer

    common = dict(output_dir=out_dir, per_device_train_batch_size=args.batch, use_cpu=True, bf16=True,
                  report_to="none", logging_steps=10_000, save_strategy="no", disable_tqdm=True, seed=0,
                  dataloader_num_workers=0, activation_checkpointing=True, max_length=args.seq + 16,
                  optim="adamw_torch", num_train_epochs=1)
    if kind in ("full", "peft"):
        peft_config = None
        if kind == "peft":
            from peft import LoraConfig

            from rasa_trainer.moe.discovery import moe_layers

            targets = [f"{l.experts_name}.{n}" for l in moe_layers(model) for n in l.expert_parameter_names()
                       if getattr(l.experts, n).dim() == 3]
            peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=targets,
                                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        data = Dataset.from_list([{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]}
                                  for r in pairs])
        return SFTTrainer(model, args=SFTConfig(learning_rate=5e-5, lr_scheduler_type="constant", **common),
                          train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    schedule = "router_only" if kind == "router" else "expert_only"
    config = RASAConfig(rasa_rounds=1, rasa_schedule=schedule, expert_tuning="lora" if kind == "lora" else "delta",
                        expert_lora_rank=8, **common)
    return RASATrainer(model, args=config, train_dataset=pairs, processing_class=tokenizer,
                       safety_critical_experts=bt.selection(model, FRACTION) if schedule == "expert_only" else None)


def run(kind: str, pristine, pairs, tokenizer, args, book: Bookkeeping) -> dict:
    """One training run: step times of all steps but the last, the last step's peak, the bookkeeping per step."""
    from transformers import TrainerCallback

    model = copy.deepcopy(pristine)
    result = {"kind": kind, "times": [], "book": []}
    with tempfile.TemporaryDirectory() as tmp:
        book.reset()
        with book.patched():
            trainer = build_trainer(kind, model, pairs, tokenizer, tmp, args)

            class Measure(TrainerCallback):
                def on_step_begin(self, a, state, control, **kw):
                    book.seconds = {k: (v if k == "phase-start record" else 0.0) for k, v in book.seconds.items()}
                    self.last = state.global_step == args.steps - 1
                    if self.last:
                        from torch.profiler import ProfilerActivity, profile

                        result["alive"] = _state_bytes(trainer)
                        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                        self.prof.__enter__()
                    self.start = time.perf_counter()

                def on_step_end(self, a, state, control, **kw):
                    elapsed = time.perf_counter() - self.start
                    result.setdefault("trainable", sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
                    if not self.last:
                        result["times"].append(elapsed)
                        result["book"].append({k: v for k, v in book.seconds.items() if k != "phase-start record"})
                        if kind == "delta" and state.global_step == 1:  # mid-training: the repairs are attached
                            result["save"] = save_peak(trainer, tmp, args)
                        return
                    self.prof.__exit__(None, None, None)
                    level = top = 0
                    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                                            if e.name() == "[memory]"):
                        level += nbytes
                        top = max(top, level)
                    result["transient"], result["peak"] = top, result["alive"] + top

            trainer.add_callback(Measure())
            trainer.train()
        result["record_s"] = book.seconds["phase-start record"]
        result["rasa"] = kind in ("delta", "lora", "router")
    del trainer, model
    gc.collect()
    return result


def save_peak(trainer, tmp: str, args) -> dict:
    """A save in the middle of the expert phase (delta repairs attached): the CPU allocator's peak of the in-place
    merge the save runs (``merged_for_saving``) and of the whole ``save_model`` (which adds the writer's host
    buffers), against the plan's save terms (the merge of one fused parameter plus, host = device here, the selected
    experts' original slices kept aside) and one layer's expert weights."""
    from rasa_trainer.memory import estimate_memory
    from rasa_trainer.memory.measure import cpu_allocated_peak
    from rasa_trainer.moe.discovery import moe_layers
    from rasa_trainer.repairs.layer import merged_for_saving

    model = trainer.model

    def merge():
        with merged_for_saving(model):
            pass

    merge_peak = cpu_allocated_peak(merge)
    save = cpu_allocated_peak(lambda: trainer.save_model(os.path.join(tmp, "save")))
    layer = moe_layers(model)[0]
    one_layer = sum(getattr(layer.experts, n).numel() * getattr(layer.experts, n).element_size()
                    for n in layer.expert_parameter_names())
    estimate = estimate_memory(model.config, FRACTION, expert_tuning="delta", dtype="bfloat16", batch_size=args.batch,
                               seq_len=args.seq, schedule="expert_only", mixed_precision=True)
    plan = estimate.phases["expert"].save_merge + estimate.save_host_bytes
    return {"merge": merge_peak, "save": save, "plan": plan, "one_layer": one_layer}


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def report(results: dict, args, model_params: int) -> None:
    med = statistics.median
    base = results.get("full")
    print()
    print(f"bench_scale: OLMoE-1B-7B layer shapes (hidden 2048, 64 experts, top-8, expert intermediate 1024), 2 layers, "
          f"vocab 1024, {model_params / 1e6:.0f} M params, bf16 weights, bf16=True, activation checkpointing, AdamW; "
          f"batch {args.batch} x ~{args.seq} tokens; {args.steps - 1} timed steps + 1 profiled; {args.threads} threads; "
          f"torch {torch.__version__}")
    header = ("run", "step", "x full", "peak", "x full", "transient", "trainable", "bookkeeping")
    rows = []
    for kind in RUNS:
        r = results.get(kind)
        if r is None:
            continue
        step = med(r["times"][1:] or r["times"])
        book = "-"
        if r["rasa"] and r["book"]:
            per_step = {k: med(b[k] for b in r["book"][1:] or r["book"]) for k in r["book"][0]}
            total = sum(per_step.values())
            parts = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in per_step.items() if v > 0)
            book = f"{100 * total / step:.2f}% of the step ({parts}); record {r['record_s']:.2f} s/phase"
        rows.append((LABELS[kind], f"{step:.2f} s", f"{step / med(base['times'][1:] or base['times']):.3f}" if base else "-",
                     f"{r['peak'] / MIB:.0f} MiB", f"{r['peak'] / base['peak']:.3f}" if base else "-",
                     f"{r['transient'] / MIB:.0f} MiB", f"{r['trainable']:,}", book))
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(len(header) - 1)]
    for line in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1])
    save = results.get("delta", {}).get("save")
    if save:
        print(f"mid-training save (delta repairs attached): in-place merge peak {save['merge'] / MIB:.1f} MiB, plan's "
              f"save terms (one parameter's merge + the originals kept aside) {save['plan'] / MIB:.1f} MiB: "
              f"measured/plan {save['merge'] / max(save['plan'], 1):.3f}; whole save_model {save['save'] / MIB:.1f} MiB "
              f"(with the writer's host buffers); one layer's expert weights {save['one_layer'] / MIB:.0f} MiB "
              f"(merge peak / layer {save['merge'] / save['one_layer']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per run: all but the last timed, the last profiled")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=RUNS, help="these runs only (ratios need 'full')")
    parser.add_argument("--smoke", action="store_true", help="small width: checks the script, measures nothing")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the last step is profiled, the others timed")
    torch.set_num_threads(args.threads)
    import bench_trainer as bt

    start = time.perf_counter()
    pristine = olmoe_two_layers(smoke=args.smoke)
    pairs, tokenizer = bt.synthetic_pairs(args.steps * args.batch, seq_len=args.seq, seed=0), bt.chat_tokenizer()
    book, results = Bookkeeping(), {}
    for kind in RUNS:
        if args.only and kind not in args.only:
            continue
        t0 = time.perf_counter()
        results[kind] = run(kind, pristine, pairs, tokenizer, args, book)
        print(f"{LABELS[kind]}: {time.perf_counter() - t0:.0f} s", flush=True)
    report(results, args, sum(p.numel() for p in pristine.parameters()))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
