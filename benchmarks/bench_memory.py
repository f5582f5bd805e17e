"""Measured peak memory of real training runs against rasa_trainer.memory.estimate_memory (CPU).

Runs (each in its own subprocess): RASATrainer expert phase (``expert_only``, 12.5% of routed experts) with ``delta``
repairs and with LoRA repairs (rank 8, the forward with two skinny products per selected expert projection),
RASATrainer router phase (``router_only``) and plain TRL SFTTrainer (full fine-tuning, the estimate's ``full_sft``
reference), on two models: the OLMoE of ``bench_routing.py`` (4 layers, 64 experts top-8, hidden 256, batch 8 x ~64
tokens; without and with gradient checkpointing) and a Qwen3-MoE of another shape (6 layers, 32 experts top-4, hidden
192, expert intermediate 96, 6 heads / 2 key-value heads, batch 4 x ~128 tokens), in fp32; and the Qwen3-MoE in
bf16 with ``bf16=True`` (``qwen3-moe-b+bf16``: bf16 weights under CPU autocast, as accelerate runs a bf16 model with
``bf16=True``; the LoRA products then run in bf16, the repairs and routers stay fp32). AdamW (torch),
``gradient_checkpointing=False`` except for ``olmoe-bench+gc``.

Measured, per run:

- **torch peak**: the highest number of bytes held by live torch tensors during ``train()``, exact: the profiler's
  allocator events (``profile_memory=True``; every allocation and free of the CPU allocator) are summed in time
  order, on top of the tensors alive when ``train()`` starts (parameters, buffers and repairs). This is what the
  estimate models (on an accelerator it is what the caching allocator reports as allocated).
- **RSS peak**: the resident set size of a second, unprofiled run of the same configuration, sampled every
  millisecond, minus the RSS right after the imports; it adds allocator slack and everything that is not a tensor
  (Python objects, the dataset, the CPU kernels' workspaces), so it is shown for reference.

The estimate is ``estimate_memory(config, 0.125, dtype="float32", batch_size=B, seq_len=<padded length of the
training batches>, gradient_checkpointing=<as the run>, schedule=<expert_only | router_only>, device="cpu")``
(``device="cpu"``: torch's AdamW runs per tensor on the CPU, so its step temporaries are smaller); the table gives
estimate / measured for the phase totals (target: within 15% of the torch peak).

Usage: ``python benchmarks/bench_memory.py [--steps 3] [--threads 2] [--models ...] [--runs ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

RUNS = ("expert", "expert_lora", "router", "full")
LORA_RANK = 8
MODELS = {
    "olmoe-bench": dict(batch=8, seq=64, gc=False, bf16=False),
    "olmoe-bench+gc": dict(batch=8, seq=64, gc=True, bf16=False),  # the same with gradient checkpointing
    "qwen3-moe-b": dict(batch=4, seq=128, gc=False, bf16=False),
    "qwen3-moe-b+bf16": dict(batch=4, seq=128, gc=False, bf16=True),  # bf16 weights, bf16=True (autocast)
}
TOLERANCE = 0.15


def make_model(name: str, vocab_size: int = 1024):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench_routing import benchmark_model

    if name.startswith("olmoe-bench"):
        return benchmark_model(vocab_size=vocab_size)
    if MODELS[name]["bf16"]:
        return make_model(name.split("+")[0], vocab_size).to(torch.bfloat16)
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=vocab_size, hidden_size=192, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=32, num_experts=32,
        num_experts_per_tok=4, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model.eval()


def worker(model_name: str, run: str, steps: int, threads: int, out: str, profiled: bool) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_trainer as bt

    torch.set_num_threads(threads)
    import datasets  # noqa: F401 - libraries are loaded before the baseline, as in bench_trainer.py
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import rasa_trainer  # noqa: F401

    rss0 = bt.rss()
    shape = MODELS[model_name]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(model_name)
        trainer = build_trainer(run, steps * shape["batch"], tmp, model, shape)
        storages = {}
        for t in list(trainer.model.parameters()) + list(trainer.model.buffers()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        alive = sum(storages.values())
        if not profiled:  # RSS only: the profiler's own records would inflate it
            with bt.PeakRSS() as peak:
                trainer.train()
            with open(out, "w") as f:
                json.dump({"rss_peak": peak.peak - rss0}, f)
            return
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.train()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        level = top = 0
        for _, nbytes in events:
            level += nbytes
            top = max(top, level)
        lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
        # padded length of the batches (rows are batched in order of the sampler; the longest row bounds them)
        result = {"torch_peak": alive + top, "alive_at_start": alive,
                  "seq_len": max(lengths), "batch": shape["batch"], "events": len(events)}
    with open(out, "w") as f:
        json.dump(result, f)


def build_trainer(run: str, rows: int, out_dir: str, model, shape: dict):
    """bench_trainer's runs (full / expert / expert_lora / router), with ``bf16=True`` for the bf16 model."""
    import bench_trainer as bt

    if not shape["bf16"]:
        trainer, _, _ = bt.build_trainer(run, rows, out_dir, shape["batch"], shape["seq"], model=model,
                                         gradient_checkpointing=shape["gc"], lora_rank=LORA_RANK)
        return trainer
    from trl import SFTConfig, SFTTrainer

    from rasa_trainer import RASAConfig, RASATrainer

    tokenizer = bt.chat_tokenizer()
    model.train()
    pairs = bt.synthetic_pairs(rows, seq_len=shape["seq"], seed=0)
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=shape["batch"], use_cpu=True, bf16=True, report_to="none",
        logging_steps=10_000, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        gradient_checkpointing=shape["gc"], max_length=shape["seq"] + 16, optim="adamw_torch",
    )
    if run == "full":
        data = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]} for r in pairs]
        args = SFTConfig(num_train_epochs=1, learning_rate=5e-5, lr_scheduler_type="constant", **common)
        return SFTTrainer(model, args=args, train_dataset=bt._dataset(data), processing_class=tokenizer)
    schedule = "router_only" if run == "router" else "expert_only"
    args = RASAConfig(rasa_rounds=1, rasa_schedule=schedule, expert_tuning="lora" if run == "expert_lora" else "delta",
                      expert_lora_rank=LORA_RANK, **common)
    return RASATrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                       safety_critical_experts=bt.selection(model) if schedule == "expert_only" else None)


def run_worker(model_name: str, run: str, args, profiled: bool = True) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", run, "--model", model_name, "--out", out,
           "--steps", str(args.steps), "--threads", str(args.threads)] + ([] if profiled else ["--rss-only"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {model_name}/{run} failed:\n{proc.stderr[-4000:]}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.worker, args.steps, args.threads, args.out, profiled=not args.rss_only)
        return

    from rasa_trainer.memory import estimate_memory

    rows = []
    for model_name in args.models:
        model = make_model(model_name)
        for run in args.runs:
            measured = run_worker(model_name, run, args)
            measured["rss_peak"] = run_worker(model_name, run, args, profiled=False)["rss_peak"]
            schedule = {"expert": "expert_only", "expert_lora": "expert_only", "router": "router_only",
                        "full": "expert_only"}[run]
            bf16 = MODELS[model_name]["bf16"]
            estimate = estimate_memory(model, 0.125, dtype="bfloat16" if bf16 else "float32", batch_size=measured["batch"],
                                       seq_len=measured["seq_len"], gradient_checkpointing=MODELS[model_name]["gc"],
                                       schedule=schedule, device="cpu", mixed_precision=bf16,
                                       expert_tuning="lora" if run == "expert_lora" else "delta", lora_rank=LORA_RANK)
            phase = estimate.phases[{"full": "full_sft", "expert_lora": "expert"}.get(run, run)]
            rows.append((model_name, run, phase, measured))
            print(f"{model_name} {run}: estimate {phase.total / 2**20:.1f} MiB, torch peak "
                  f"{measured['torch_peak'] / 2**20:.1f} MiB, RSS peak {measured['rss_peak'] / 2**20:.1f} MiB", flush=True)

    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    header = ("model", "phase", "B x n", "weights", "grads", "optim", "activ", "transient", "step", "no-grad",
              "estimate MiB", "torch peak MiB", "est/torch", "RSS peak MiB", "est/RSS", "within 15%")
    table = []
    for model_name, run, p, m in rows:
        ratio = p.total / m["torch_peak"]
        table.append((model_name, run, f"{m['batch']}x{m['seq_len']}", mib(p.weights), mib(p.gradients),
                      mib(p.optimizer_state), mib(p.activations), mib(p.transient), mib(p.optimizer_step),
                      mib(p.no_grad_forward), mib(p.total), mib(m["torch_peak"]),
                      f"{ratio:.3f}", mib(m["rss_peak"]), f"{p.total / m['rss_peak']:.3f}",
                      "yes" if abs(ratio - 1) <= TOLERANCE else "NO"))
    print()
    print(f"bench_memory: estimate_memory vs measured peaks (fp32 except +bf16 (bf16 weights, bf16=True autocast), AdamW, "
          f"gradient checkpointing in +gc only, 12.5% of routed experts, delta or LoRA rank {LORA_RANK} (expert_lora); "
          f"{args.steps} steps per run; torch peak = profiler allocator events; component columns are the estimate's, "
          f"in MiB; estimate = weights + optim + max(activ + transient, grads + step, grads + no-grad))")
    widths = [max(len(str(r[i])) for r in table + [header]) for i in range(len(header))]
    for line in [header] + table:
        print("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths))))


if __name__ == "__main__":
    main()
