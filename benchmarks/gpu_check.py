"""The GPU check: one command, one table, under 4 minutes on one H100 / H200.

    python benchmarks/gpu_check.py                    # on the GPU (OLMoE-1B-7B and Qwen3-30B-A3B shapes)
    python benchmarks/gpu_check.py --device cpu --tiny  # the same rows at tiny shapes on the CPU (what CI runs)

Models are built from the published config values (``rasa_trainer.memory.PRESETS``; no download) with
random weights in bf16, directly on the device. Rows, each in its own ``try`` (a failing row prints its error in
the table and the check goes on) and within a total time budget (``--budget`` seconds; rows that would not fit print
``skipped``):

- **exactness**: zero repairs are bit-identical to no repairs in bf16 under the family's default experts
  implementation: delta repairs in a forward without and with gradients, LoRA repairs (B = 0) without gradients.
  LoRA with gradients runs two skinny products per selected expert projection instead of the kernel (by design not
  bit-identical); its largest logit difference is shown beside.
- **training steps** on the OLMoE-1B-7B shape (bf16 weights, ``bf16=True``, activation checkpointing, AdamW, batch
  ``B x n`` of synthetic pairs): RASA expert phase with delta repairs and with LoRA repairs (rank 8) of 12.5% of the
  routed experts, RASA router phase, full-parameter ``SFTTrainer``, and the anchor: ``SFTTrainer`` with PEFT LoRA on
  every expert (``target_parameters``, rank 8). Median step time (``on_step_begin`` to ``on_step_end``, synchronised)
  and the run's peak (``torch.cuda.max_memory_allocated``; reserved beside it).
- **detection generation** throughput on the OLMoE-1B-7B shape, batch 1 / 8 / 32, ``min_new_tokens = max_new_tokens``:
  bare ``model.generate`` on pre-tokenised left-padded batches, and rasa_trainer's ``generate_replies`` with the
  routing capture detection uses; the speed-up of batch 8 over batch 1 is printed, and where the HF path stays under
  4x a profile of one batch-8 generation says where the time goes.
- **Qwen3-30B-A3B expert phase** (only where the device has room for its plan): one expert-phase step of the
  one-GPU config (``examples/configs/qwen3_30b_a3b_1gpu.yaml``: LoRA rank 16, batch 4 x 512, bf16, activation
  checkpointing) with its measured peak against ``estimate_memory_from_config`` on that file.

``--tiny`` shrinks every shape (and the step and token counts) so the whole table runs in well under a minute on a
CPU; on the CPU, peaks are the torch profiler's allocator events (every allocation and free of the CPU allocator,
summed in time order, on top of what is alive at the start). ``--json PATH`` also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

ONE_GPU_CONFIG = os.path.join(ROOT, "examples", "configs", "qwen3_30b_a3b_1gpu.yaml")
FRACTION = 0.125
TINY_OVERRIDES = {
    "OLMoE-1B-7B": dict(hidden_size=64, num_hidden_layers=2, num_experts=16, num_experts_per_tok=4,
                        intermediate_size=32, vocab_size=1024, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=512),
    "Qwen3-30B-A3B": dict(hidden_size=64, num_hidden_layers=2, num_experts=16, num_experts_per_tok=4,
                          moe_intermediate_size=32, intermediate_size=128, vocab_size=1024, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
}


# ------------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------------


def model_config(preset: str, tiny: bool):
    from transformers import AutoConfig

    from rasa_trainer.memory import PRESETS

    model_type, values = PRESETS[preset]
    values = {**values, **(TINY_OVERRIDES[preset] if tiny else {}), "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2}
    return AutoConfig.for_model(model_type, **values)


def build_model(preset: str, device: str, tiny: bool, seed: int = 0):
    """Random bf16 weights, initialised on the device (no CPU copy of a 7B or 30B model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(preset, tiny)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if tiny:  # sharper routers on tiny shapes, so top-k has no ties and every expert gets tokens
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0.0, 0.5)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak bytes held by live tensors inside the block: ``max_memory_allocated`` on CUDA; on the CPU the profiler's
    allocator events summed in time order, on top of ``alive`` (the tensors alive when the block starts)."""

    def __init__(self, device: str, alive: int = 0):
        self.device, self.alive = device, alive
        self.peak = self.reserved = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.reserved = torch.cuda.max_memory_reserved()
            return False
        self._prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        level = top = 0
        for _, nbytes in events:
            level += nbytes
            top = max(top, level)
        self.peak = self.alive + top
        return False


def alive_bytes(*modules) -> int:
    storages = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def step_timer(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start, self.trainable = [], None, None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.trainable is None and model is not None:
                self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


# ------------------------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------------------------


def exactness_row(ctx) -> dict:
    """Zero repairs against no repairs, bit for bit, in bf16 under the default experts implementation."""
    from rasa_trainer.moe.discovery import moe_layers
    from rasa_trainer.repairs.layer import attach_repairs, repair_modules, unload_repairs

    model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny)
    implementation = model.config._experts_implementation
    layers = moe_layers(model)
    selection = {l.index: list(range(0, l.num_experts, 8)) for l in layers}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(1000, model.config.vocab_size), (2, 16 if ctx.tiny else 64), generator=g).to(ctx.device)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0

    def logits(grad: bool):
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, attention_mask=mask).logits.detach()

    with torch.no_grad():
        plain = logits(False)
    checks = {}
    attach_repairs(model, selection, mode="delta")
    checks["delta, no grad"] = torch.equal(logits(False), plain)
    checks["delta, grad"] = torch.equal(logits(True), plain)
    unload_repairs(model, merge=False)
    attach_repairs(model, selection, mode="lora", rank=8)
    for _, repairs in repair_modules(model):
        for name in repairs.names:
            factors = repairs.factors(name)
            if factors is not None:
                assert not factors[1].any()  # B = 0: the update is exactly zero
    checks["lora, no grad"] = torch.equal(logits(False), plain)
    lora_grad_diff = (logits(True).float() - plain.float()).abs().max().item()
    unload_repairs(model, merge=False)
    exact = all(checks.values())
    detail = ", ".join(f"{k}: {'bit-identical' if v else 'DIFFERS'}" for k, v in checks.items())
    return {"check": f"zero repairs exact (bf16, experts '{implementation}')", "result": "exact" if exact else "NOT exact",
            "detail": f"{detail}; lora with grad (skinny products): max |dlogit| {lora_grad_diff:.3g}"}


def _pairs_and_tokenizer(rows: int, seq: int):
    import bench_trainer as bt

    return bt.synthetic_pairs(rows, seq_len=seq, seed=0), bt.chat_tokenizer()


def trainer_row(ctx, kind: str) -> dict:
    """One training run of ``ctx.steps`` timed steps (after one warm-up step) on the OLMoE-1B-7B shape."""
    import bench_trainer as bt
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rasa_trainer import RASAConfig, RASATrainer

    batch, seq = ctx.batch, ctx.seq
    steps = ctx.steps + 1
    pairs, tokenizer = _pairs_and_tokenizer(steps * batch, seq)
    model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(output_dir=tmp, per_device_train_batch_size=batch, use_cpu=ctx.device == "cpu", bf16=True,
                      report_to="none", logging_steps=10_000, save_strategy="no", disable_tqdm=True, seed=0,
                      dataloader_num_workers=0, activation_checkpointing=True, max_length=seq + 16,
                      optim="adamw_torch", num_train_epochs=1)
        timer = step_timer(ctx.device)
        if kind in ("full", "peft"):
            from peft import LoraConfig

            data = Dataset.from_list([{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]}
                                      for r in pairs])
            peft_config = None
            if kind == "peft":
                from rasa_trainer.moe.discovery import moe_layers

                targets = [f"{l.experts_name}.{n}" for l in moe_layers(model) for n in l.expert_parameter_names()
                           if getattr(l.experts, n).dim() == 3]
                peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=targets,
                                         lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
            args = SFTConfig(learning_rate=5e-5, lr_scheduler_type="constant", **common)
            trainer = SFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
        else:
            schedule = "router_only" if kind == "router" else "expert_only"
            args = RASAConfig(rasa_rounds=1, rasa_schedule=schedule, expert_tuning="lora" if kind == "lora" else "delta",
                              expert_lora_rank=8, **common)
            trainer = RASATrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                  safety_critical_experts=bt.selection(model, FRACTION)
                                  if schedule == "expert_only" else None)
        trainer.add_callback(timer)
        with PeakMemory(ctx.device, alive_bytes(trainer.model)) as peak:
            trainer.train()
    trainable = timer.trainable or 0
    timed = timer.times[1:] or timer.times
    label = {"delta": "RASA expert phase, delta", "lora": "RASA expert phase, LoRA r8", "router": "RASA router phase",
             "full": "full-parameter SFT (SFTTrainer)", "peft": "PEFT LoRA r8 on all experts (anchor)"}[kind]
    row = {"check": f"{label}, {ctx.shape_name}, {batch}x{seq}", "time": f"{statistics.median(timed):.3f} s/step",
           "peak": gib(peak.peak), "reserved": gib(peak.reserved), "detail": f"{trainable:,} trainable parameters"}
    del trainer, model
    free_memory(ctx.device)
    return row


def detection_rows(ctx) -> list[dict]:
    """Generation throughput at batch 1 / 8 / 32: bare ``model.generate`` and ``generate_replies`` with capture."""
    import random

    import bench_trainer as bt

    from rasa_trainer.detection.generation import generate_replies

    model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny)
    tokenizer = bt.chat_tokenizer()
    tokenizer.padding_side = "left"
    rng = random.Random(0)
    words = lambda: " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randrange(26, 31)))  # noqa: E731
    chats = [[{"role": "user", "content": words()}] for _ in range(32)]
    new = ctx.new_tokens
    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]

    def bare(batch: int, count: int) -> float:
        sync(ctx.device)
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, count, batch):
                inputs = tokenizer(rendered[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
                model.generate(**{k: v.to(ctx.device) for k, v in inputs.items()}, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               temperature=None, top_p=None, top_k=None)
        sync(ctx.device)
        return count * new / (time.perf_counter() - start)

    def captured(batch: int, count: int) -> float:
        sync(ctx.device)
        start = time.perf_counter()
        for out in generate_replies(model, tokenizer, chats[:count], batch_size=batch, max_new_tokens=new,
                                    min_new_tokens=new, with_routing=True, progress=False):
            assert out.routing is not None
        sync(ctx.device)
        return count * new / (time.perf_counter() - start)

    bare(8, 8)  # warm-up (kernels, allocator)
    counts = {1: 2 if ctx.tiny else 4, 8: 8, 32: 32}
    rows, tps = [], {}
    for batch, count in counts.items():
        if ctx.out_of_time(8 if ctx.tiny else 30):
            rows.append({"check": f"detection generation, batch {batch}", "result": "skipped (time budget)"})
            continue
        b, c = bare(batch, count), captured(batch, count)
        tps[batch] = (b, c)
        rows.append({"check": f"detection generation, batch {batch}, {new} new tokens",
                     "time": f"{b:.0f} tok/s bare, {c:.0f} tok/s with capture",
                     "detail": f"capture {100 * (b / c - 1):+.1f}% time"
                               + (f"; {b / tps[1][0]:.1f}x / {c / tps[1][1]:.1f}x batch 1" if 1 in tps and batch > 1 else "")})
    if 1 in tps and 8 in tps and tps[8][1] / tps[1][1] < 4 and not ctx.out_of_time(10):
        rows.append({"check": "detection batch 8 < 4x batch 1: where the time goes", "detail": profile_generation(ctx, model, tokenizer, rendered, new)})
    del model
    free_memory(ctx.device)
    return rows


def profile_generation(ctx, model, tokenizer, rendered, new: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.startswith("cuda") else [])
    inputs = tokenizer(rendered[:8], return_tensors="pt", padding=True, add_special_tokens=False)
    with profile(activities=activities) as prof, torch.no_grad():
        model.generate(**{k: v.to(ctx.device) for k, v in inputs.items()}, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        sync(ctx.device)
    key = "device_time_total" if ctx.device.startswith("cuda") else "cpu_time_total"
    stats = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(getattr(e, "self_" + key, 0) for e in stats) or 1
    top = sorted(stats, key=lambda e: getattr(e, "self_" + key, 0), reverse=True)[:4]
    return "top ops by self time: " + ", ".join(f"{e.key} {100 * getattr(e, 'self_' + key, 0) / total:.0f}%" for e in top)


def qwen_row(ctx) -> dict:
    """One expert-phase step of the one-GPU Qwen3-30B-A3B config, its peak against the plan of that file."""
    import yaml

    import bench_trainer as bt

    from rasa_trainer import RASAConfig, RASATrainer
    from rasa_trainer.memory import estimate_memory_from_config

    with open(ONE_GPU_CONFIG) as f:
        values = yaml.safe_load(f)
    batch, seq = (2, 64) if ctx.tiny else (values["per_device_train_batch_size"], values["max_length"])
    model_config_ = model_config("Qwen3-30B-A3B", ctx.tiny)

    def plan_of(length: int):
        return estimate_memory_from_config(
            {**values, "per_device_train_batch_size": batch, "max_length": length, "use_cpu": ctx.device == "cpu"},
            model=model_config_, schedule="expert_only").phases["expert"]

    phase = plan_of(seq)
    label = f"Qwen3-30B-A3B expert phase, 1-GPU config, {'tiny shape, ' if ctx.tiny else ''}{batch}x{seq}"
    if ctx.device.startswith("cuda"):
        free_memory(ctx.device)
        free, _ = torch.cuda.mem_get_info()
        if free < phase.device_total:
            return {"check": label, "result": "skipped (no room)",
                    "detail": f"plan {gib(phase.device_total)} with slack > {gib(free)} free"}
    pairs, tokenizer = _pairs_and_tokenizer(batch, seq - 4)
    model = build_model("Qwen3-30B-A3B", ctx.device, ctx.tiny)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        args = RASAConfig(output_dir=tmp, rasa_rounds=1, rasa_schedule="expert_only", expert_tuning="lora",
                          expert_lora_rank=values["expert_lora_rank"], expert_lora_alpha=values["expert_lora_alpha"],
                          per_device_train_batch_size=batch, use_cpu=ctx.device == "cpu", bf16=True,
                          activation_checkpointing=True, max_length=seq, report_to="none", save_strategy="no",
                          disable_tqdm=True, seed=0, dataloader_num_workers=0, logging_steps=10_000,
                          optim="adamw_torch", num_train_epochs=1, replay_cache_device="cpu")
        trainer = RASATrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                              safety_critical_experts=bt.selection(model, FRACTION))
        timer = step_timer(ctx.device)
        trainer.add_callback(timer)
        with PeakMemory(ctx.device, alive_bytes(trainer.model)) as peak:
            trainer.train()
        padded = max(len(r["input_ids"]) for r in trainer.train_dataset)
    phase = plan_of(padded)  # the plan of the batches that ran (padded to their longest row)
    ratio = phase.total / peak.peak
    detail = (f"estimate {gib(phase.total)} allocated ({gib(phase.device_total)} with slack + context) vs measured "
              f"{gib(peak.peak)}: {ratio:.3f}; padded length {padded}")
    if peak.reserved:
        detail += f"; reserved/allocated {peak.reserved / peak.peak:.3f}"
    del trainer, model
    free_memory(ctx.device)
    return {"check": label, "time": f"{statistics.median(timer.times):.3f} s/step", "peak": gib(peak.peak),
            "reserved": gib(peak.reserved), "result": "within 15%" if abs(ratio - 1) <= 0.15 else "OFF by > 15%",
            "detail": detail}


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        self.device, self.tiny = args.device, args.tiny
        self.batch, self.seq = (2, 48) if args.tiny else (8, 512)
        self.steps = 1 if args.tiny else args.steps
        self.new_tokens = 4 if args.tiny else 64
        self.shape_name = "OLMoE-1B-7B tiny shape" if args.tiny else "OLMoE-1B-7B"
        self.deadline = time.perf_counter() + args.budget

    def out_of_time(self, needed: float) -> bool:
        return time.perf_counter() + needed > self.deadline


ROWS = [
    ("exactness", exactness_row, 20),
    ("expert_delta", lambda c: trainer_row(c, "delta"), 25),
    ("expert_lora", lambda c: trainer_row(c, "lora"), 25),
    ("router", lambda c: trainer_row(c, "router"), 25),
    ("full_sft", lambda c: trainer_row(c, "full"), 30),
    ("peft_lora", lambda c: trainer_row(c, "peft"), 25),
    ("detection", detection_rows, 45),
    ("qwen3_30b", qwen_row, 60),
]
TINY_NEEDS = 3  # seconds a tiny row needs at least


def print_table(rows: list[dict], header: str) -> None:
    columns = ["check", "time", "peak", "reserved", "result", "detail"]
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    widths[-1] = len(columns[-1])  # the detail column is not padded
    print(header)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)).rstrip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and counts (CPU CI)")
    parser.add_argument("--budget", type=float, default=225.0, help="total seconds for all rows")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per run (after one warm-up)")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in ROWS], help="run these rows only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu --tiny")
    start = time.perf_counter()
    ctx = Context(args)
    import transformers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    rows: list[dict] = []
    for name, fn, needs in ROWS:
        if args.only and name not in args.only:
            continue
        if ctx.out_of_time(TINY_NEEDS if args.tiny else needs):
            rows.append({"check": name, "result": "skipped (time budget)"})
            continue
        try:
            out = fn(ctx)
            rows.extend(out if isinstance(out, list) else [out])
        except Exception as err:  # noqa: BLE001 - the table reports the failure and the check goes on
            message = f"{type(err).__name__}: {err}".replace("\n", " ")
            rows.append({"check": name, "result": "ERROR", "detail": message[:300]})
            traceback.print_exc(file=sys.stderr)
            free_memory(args.device)
    elapsed = time.perf_counter() - start
    header = (f"gpu_check on {device_name} ({args.device}{', tiny shapes' if args.tiny else ''}), torch "
              f"{torch.__version__}, transformers {transformers.__version__}, bf16 weights; {elapsed:.0f} s of a "
              f"{args.budget:.0f} s budget")
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "elapsed_s": elapsed}, f, indent=2)
    return 1 if any(r.get("result") == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
