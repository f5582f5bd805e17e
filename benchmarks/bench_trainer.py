"""RASATrainer expert and router phases against plain TRL SFTTrainer full-parameter training, on the same model,
data and machine (CPU).

Model: the OLMoE of ``bench_routing.py`` (4 layers, 64 experts, top-8, hidden 256, expert intermediate 128, vocab
1024, 4 heads, routers at std 0.5). Data: synthetic pairs for a word-level chat tokenizer, about 64 tokens per
training row (batch 8 x ~64). Selection: 32 of the 256 routed experts (12.5%), drawn at random with a fixed seed,
repaired in ``delta`` mode.

Settings, the same for every run: fp32 (``bf16=False``), ``gradient_checkpointing=False`` (SFTConfig's default is
True; the targets compare the training work itself, and checkpointing would add a recompute to every run alike),
AdamW (torch), ``per_device_train_batch_size=8``, no gradient accumulation, ``max_grad_norm=1.0`` (the default), one
epoch of ``--steps`` steps, no logging or saving during the timed steps, ``dataloader_num_workers=0``.

Runs:

- ``full``: ``trl.SFTTrainer`` on the plain model, every parameter trainable (completion-only loss; TRL turns on the
  model's load-balancing loss for MoE models, as any user of plain SFT gets);
- ``expert``: ``RASATrainer`` with ``rasa_schedule="expert_only"`` (repairs of the 32 experts, replayed routing);
- ``router``: ``RASATrainer`` with ``rasa_schedule="router_only"`` (routers only, router-consistency KL);
- ``expert_lora``: the expert phase with LoRA repairs (rank 8) of the same 32 experts instead of deltas.

Transient memory per step (expert phases): the torch profiler's allocator events during one training step (the
third), summed in time order; the peak above the level at the step's start is what the step allocates and frees
(activations, gradients, optimiser temporaries). It is shown against the size of the selected experts' fp32 delta,
which is what a LoRA forward that materialised ``B @ A`` would allocate (and keep for backward) on every step.

Timing: the CPU is shared with other work whose load swings by several times within minutes, so the three trainers
are built in one process and stepped in rotation (full, expert, router, full, ...; each trainer runs in a thread and
only the thread holding a baton runs, so they never overlap). Every ratio is taken between neighbouring steps of one
round, and the median over rounds is reported, for wall-clock and for process CPU time. A step is the time from
``on_step_begin`` to ``on_step_end`` (forward, backward, gradient clipping, optimiser step, zeroing gradients; not data
loading, and not the routing records the expert phase makes once per epoch). The first ``--warmup`` steps are left
out. "forward-backward" is ``Trainer.training_step`` alone.

Memory: torch has no CPU allocator statistics, and ``tracemalloc`` does not see torch's allocations, so peak memory
is the resident set size (RSS, from ``psutil``) of a separate process per run: a thread samples RSS every
millisecond during ``train()``; "peak" is the highest sample minus the RSS right after the imports (before the model
is built), i.e. the model, gradients, optimiser state, activations, routing caches and allocator slack of that run.
"training delta" is the highest sample minus the RSS just before ``train()`` (model and trainer built).

Usage: ``python benchmarks/bench_trainer.py [--steps 14] [--warmup 2] [--memory-steps 4] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = ("full", "expert", "router", "expert_lora")
SELECTED_FRACTION = 0.125
TARGETS = {
    "optimizer_state": 2.1,  # x selected params x 4 bytes
    "expert_step": 0.7,  # x full SFT step
    "expert_peak": 0.6,  # x full SFT peak
    "router_step": 2.5,  # x one full-SFT forward-backward
}


# ------------------------------------------------------------------------------------------------------------------
# Shared pieces (also used by bench_memory.py)
# ------------------------------------------------------------------------------------------------------------------


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the highest sample."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def chat_tokenizer(vocab_size: int = 1024):
    """A word-level chat tokenizer (as tests/tiny_chat.py): pad/bos/eos/unk, role markers, then words w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tok


def synthetic_pairs(n: int, seq_len: int = 64, vocab_words: int = 1000, seed: int = 0) -> list[dict]:
    """Pair-contract rows whose chat-formatted prompt + completion is about ``seq_len`` tokens (at most)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(k))  # noqa: E731
    completion_words = 8
    overhead = 5  # <|user|> <|end|> <|assistant|> <|end|> + one spare
    rows = []
    for _ in range(n):
        prompt_words = rng.randrange(seq_len - completion_words - overhead - 6, seq_len - completion_words - overhead + 1)
        rows.append({
            "prompt": [{"role": "user", "content": words(prompt_words)}],
            "anchor_prompt": words(rng.randrange(12, 20)),
            "completion": words(completion_words),
        })
    return rows


def selection(model, fraction: float = SELECTED_FRACTION, seed: int = 0):
    """A SafetyCriticalExperts of ``fraction`` of all routed experts, drawn at random (fixed seed)."""
    from rasa_trainer.moe.discovery import moe_layers
    from rasa_trainer.detection.selection import SafetyCriticalExperts, SelectedExpert

    layers = moe_layers(model)
    pairs = [(l.index, e) for l in layers for e in range(l.num_experts)]
    chosen = sorted(random.Random(seed).sample(pairs, round(fraction * len(pairs))))
    experts = [SelectedExpert(layers[l].layer_index, l, e, 0.5, 0.6, 0.1) for l, e in chosen]
    return SafetyCriticalExperts(
        experts=experts, model_type=model.config.model_type, num_moe_layers=len(layers),
        num_experts=layers[0].num_experts, top_k=layers[0].top_k,
        moe_layer_indices=[l.layer_index for l in layers], selection={"policy": "random", "seed": seed},
    )


def selected_parameter_count(model, sce) -> int:
    from rasa_trainer.moe.discovery import moe_layers

    layers = moe_layers(model)
    total = 0
    for moe_layer, experts in sce.by_moe_layer().items():
        layer = layers[moe_layer]
        total += sum(t.numel() for e in experts for t in layer.expert_parameters(e).values())
    return total


def optimizer_state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values() if hasattr(t, "numel"))


def build_trainer(mode: str, rows: int, out_dir: str, batch_size: int = 8, seq_len: int = 64, seed: int = 0,
                  gradient_checkpointing: bool = False, expert_tuning: str = "delta", model_seed: int = 0, model=None,
                  fraction: float = SELECTED_FRACTION, lora_rank: int = 8):
    """(trainer, model, sce) for one benchmark run; ``mode`` is full / expert / router. ``model`` defaults to the
    benchmark OLMoE (its vocabulary must cover the 1024-entry tokenizer)."""
    import torch  # noqa: F401
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, HERE)
    from bench_routing import benchmark_model

    from rasa_trainer import RASAConfig, RASATrainer

    tokenizer = chat_tokenizer()
    if model is None:
        model = benchmark_model(seed=model_seed, vocab_size=len(tokenizer))
    model.train()
    pairs = synthetic_pairs(rows, seq_len=seq_len, seed=seed)
    common = dict(
        output_dir=out_dir, per_device_train_batch_size=batch_size, use_cpu=True, bf16=False, report_to="none",
        logging_steps=10_000, save_strategy="no", disable_tqdm=True, seed=seed, dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing, max_length=seq_len + 16, optim="adamw_torch",
    )
    sce = selection(model, fraction)
    if mode == "full":
        data = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]} for r in pairs]
        args = SFTConfig(num_train_epochs=1, learning_rate=5e-5, lr_scheduler_type="constant", **common)
        trainer = _timed(SFTTrainer)(model, args=args, train_dataset=_dataset(data), processing_class=tokenizer)
    else:
        schedule = {"expert": "expert_only", "expert_lora": "expert_only", "router": "router_only"}[mode]
        tuning = "lora" if mode == "expert_lora" else expert_tuning
        args = RASAConfig(rasa_rounds=1, rasa_schedule=schedule, expert_tuning=tuning,
                          expert_lora_rank=lora_rank, **common)
        trainer = _timed(RASATrainer)(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                      safety_critical_experts=sce if schedule == "expert_only" else None)
    return trainer, model, sce


def _dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def _timed(cls):
    """``cls`` with ``training_step`` (forward + backward) timed into ``self.fb_times``."""

    class Timed(cls):
        def training_step(self, *args, **kwargs):
            start = time.perf_counter()
            out = super().training_step(*args, **kwargs)
            self.__dict__.setdefault("fb_times", []).append(time.perf_counter() - start)
            return out

    Timed.__name__ = f"Timed{cls.__name__}"
    return Timed


def step_timer(trainer):
    """A callback recording step times and the trainable parameters seen at the first step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.trainable, self._start = [], None, None

        def on_step_begin(self, args, state, control, **kw):
            if self.trainable is None:
                self.trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    trainer.add_callback(timer)
    return timer


# ------------------------------------------------------------------------------------------------------------------
# Worker: one run in its own process
# ------------------------------------------------------------------------------------------------------------------


def worker(mode: str, steps: int, batch_size: int, seq_len: int, warmup: int, threads: int, out: str) -> None:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import rasa_trainer  # noqa: F401

    rss0 = rss()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, model, sce = build_trainer(mode, steps * batch_size, tmp, batch_size, seq_len)
        timer = step_timer(trainer)
        rss_ready = rss()
        wall = time.perf_counter()
        with PeakRSS() as peak:
            trainer.train()
        wall = time.perf_counter() - wall
    transient = step_transient_bytes(mode, batch_size, seq_len) if mode.startswith("expert") else None
    step_times = timer.times[warmup:]
    fb_times = trainer.fb_times[warmup:]
    lengths = [len(r["input_ids"]) for r in trainer.train_dataset]
    result = {
        "mode": mode,
        "step_s": statistics.median(step_times),
        "fb_s": statistics.median(fb_times),
        "steps": len(timer.times),
        "setup_s": wall - sum(timer.times),
        "trainable": timer.trainable,
        "selected_params": selected_parameter_count(model, sce),
        "total_params": sum(p.numel() for n, p in model.named_parameters() if ".rasa_repairs." not in n),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "peak_bytes": peak.peak - rss0,
        "train_delta_bytes": peak.peak - rss_ready,
        "step_transient_bytes": transient,
        "mean_row_tokens": sum(lengths) / len(lengths),
        "max_row_tokens": max(lengths),
    }
    with open(out, "w") as f:
        json.dump(result, f)


def step_transient_bytes(mode: str, batch_size: int, seq_len: int, step: int = 3) -> int:
    """Peak bytes allocated (and freed) by torch during one training step, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class ProfileOneStep(TrainerCallback):
        def __init__(self):
            self.prof, self.events = None, []

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == step - 1:
                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and not self.events:
                self.prof.__exit__(None, None, None)
                self.events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                                     if e.name() == "[memory]")

    with tempfile.TemporaryDirectory() as tmp:
        trainer, _, _ = build_trainer(mode, (step + 1) * batch_size, tmp, batch_size, seq_len)
        probe = ProfileOneStep()
        trainer.add_callback(probe)
        trainer.train()
    level = top = 0
    for _, nbytes in probe.events:
        level += nbytes
        top = max(top, level)
    return top


def run_worker(mode: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--out", out, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{proc.stderr[-4000:]}")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


# ------------------------------------------------------------------------------------------------------------------
# Timing: the three trainers in one process, one step at a time in rotation
# ------------------------------------------------------------------------------------------------------------------


class _Baton:
    """Lets exactly one of several threads run at a time, in a fixed rotation, switching at step ends."""

    def __init__(self, names):
        self.order, self.turn, self.active = list(names), 0, set(names)
        self.cv = threading.Condition()

    def wait(self, name):
        with self.cv:
            self.cv.wait_for(lambda: self.order[self.turn] == name)

    def _advance(self):
        n = len(self.order)
        for i in range(1, n + 1):
            if self.order[(self.turn + i) % n] in self.active:
                self.turn = (self.turn + i) % n
                return

    def pass_on(self, name):
        with self.cv:
            self._advance()
            self.cv.notify_all()
        self.wait(name)

    def done(self, name):
        with self.cv:
            self.active.discard(name)
            if self.active:
                self._advance()
            self.cv.notify_all()


def interleaved_timing(args) -> dict[str, dict[str, list[float]]]:
    """Step and forward-backward times of the three runs, built in this process and stepped in rotation
    (full, expert, router, full, ...), so that consecutive steps of different runs see the same machine load.
    Everything else each trainer does (setup, the routing records of the expert phase) also runs only while it holds
    the baton, so the runs never overlap."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    baton = _Baton(MODES)
    results = {m: {"wall": [], "cpu": [], "fb_wall": [], "fb_cpu": []} for m in MODES}
    errors = []

    def run(mode, tmp):
        baton.wait(mode)
        try:
            trainer, _, _ = build_trainer(mode, args.steps * args.batch, tmp, args.batch, args.seq)
            rec = results[mode]

            class Rotate(TrainerCallback):
                def on_step_begin(self, a, state, control, **kw):
                    self.t0, self.c0 = time.perf_counter(), time.process_time()

                def on_step_end(self, a, state, control, **kw):
                    rec["wall"].append(time.perf_counter() - self.t0)
                    rec["cpu"].append(time.process_time() - self.c0)
                    baton.pass_on(mode)

            trainer.add_callback(Rotate())
            original = trainer.training_step

            def training_step(*a, **kw):
                t0, c0 = time.perf_counter(), time.process_time()
                out = original(*a, **kw)
                rec["fb_wall"].append(time.perf_counter() - t0)
                rec["fb_cpu"].append(time.process_time() - c0)
                return out

            trainer.training_step = training_step
            trainer.train()
        except BaseException as err:  # noqa: BLE001 - reported by the driver
            errors.append((mode, err))
        finally:
            baton.done(mode)

    with tempfile.TemporaryDirectory() as tmp:
        threads = [threading.Thread(target=run, args=(m, os.path.join(tmp, m))) for m in MODES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"{errors[0][0]} run failed") from errors[0][1]
    return results


# ------------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=14, help="training steps per run in the timing (one epoch)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing")
    parser.add_argument("--memory-steps", type=int, default=4, help="training steps per memory run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.batch, args.seq, args.warmup, args.threads, args.out)
        return

    timing = interleaved_timing(args)
    memory = {}
    for mode in MODES:
        mem_args = argparse.Namespace(**{**vars(args), "steps": args.memory_steps, "warmup": 1})
        memory[mode] = run_worker(mode, mem_args)
        print(f"memory run {mode:<6}: peak {memory[mode]['peak_bytes'] / 2**20:7.1f} MiB", flush=True)
    report(timing, memory, args)


def report(timing: dict, memory: dict, args) -> None:
    full, expert, router = memory["full"], memory["expert"], memory["router"]
    selected = expert["selected_params"]
    w = args.warmup
    t = {m: {k: v[w:] for k, v in timing[m].items()} for m in MODES}
    rounds = min(len(t[m]["wall"]) for m in MODES)
    med = statistics.median
    per_round = lambda num, den, kn, kd: med([t[num][kn][i] / t[den][kd][i] for i in range(rounds)])  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    rows = []

    def row(name, value, ratio_text="", target="", met=None):
        rows.append((name, value, ratio_text, target, "" if met is None else ("yes" if met else "NO")))

    row("trainable params, full SFT", f"{full['trainable']:,}")
    row("trainable params, expert phase", f"{expert['trainable']:,}", f"selected experts: {selected:,}",
        "== selected", expert["trainable"] == selected)
    row("trainable params, router phase", f"{router['trainable']:,}", "all router weights")
    opt_ratio = expert["optimizer_state_bytes"] / (selected * 4)
    row("optimizer state, expert phase", mib(expert["optimizer_state_bytes"]), f"{opt_ratio:.3f} x (selected x 4 B)",
        f"<= {TARGETS['optimizer_state']}", opt_ratio <= TARGETS["optimizer_state"])
    row("optimizer state, full SFT", mib(full["optimizer_state_bytes"]),
        f"{full['optimizer_state_bytes'] / (full['trainable'] * 4):.3f} x (all params x 4 B)")
    for clock, key, fb in (("wall", "wall", "fb_wall"), ("CPU", "cpu", "fb_cpu")):
        row(f"step time, full SFT ({clock})", f"{med(t['full'][key]) * 1e3:.1f} ms", "1")
        row(f"forward-backward, full SFT ({clock})", f"{med(t['full'][fb]) * 1e3:.1f} ms")
        r = per_round("expert", "full", key, key)
        row(f"step time, expert phase ({clock})", f"{med(t['expert'][key]) * 1e3:.1f} ms", f"{r:.3f} x full step",
            f"<= {TARGETS['expert_step']}", r <= TARGETS["expert_step"])
        r = per_round("router", "full", key, fb)
        row(f"step time, router phase ({clock})", f"{med(t['router'][key]) * 1e3:.1f} ms", f"{r:.3f} x full fwd-bwd",
            f"<= {TARGETS['router_step']}", r <= TARGETS["router_step"])
    row("peak memory, full SFT", mib(full["peak_bytes"]), "1")
    r = expert["peak_bytes"] / full["peak_bytes"]
    row("peak memory, expert phase", mib(expert["peak_bytes"]), f"{r:.3f} x full", f"<= {TARGETS['expert_peak']}",
        r <= TARGETS["expert_peak"])
    row("peak memory, router phase", mib(router["peak_bytes"]), f"{router['peak_bytes'] / full['peak_bytes']:.3f} x full")
    for mode in MODES:
        row(f"training delta RSS, {mode}", mib(memory[mode]["train_delta_bytes"]))
    lora = memory["expert_lora"]
    for clock, key in (("wall", "wall"), ("CPU", "cpu")):
        r = per_round("expert_lora", "expert", key, key)
        row(f"step time, expert phase LoRA ({clock})", f"{med(t['expert_lora'][key]) * 1e3:.1f} ms", f"{r:.3f} x delta")
    row("peak memory, expert phase LoRA", mib(lora["peak_bytes"]), f"{lora['peak_bytes'] / expert['peak_bytes']:.3f} x delta")
    row("trainable params, expert phase LoRA", f"{lora['trainable']:,}", f"{lora['trainable'] / selected:.4f} x selected")
    row("optimizer state, expert phase LoRA", mib(lora["optimizer_state_bytes"]))
    delta_bytes = selected * 4
    for mode, label in (("expert", "delta"), ("expert_lora", "LoRA")):
        moved = memory[mode]["step_transient_bytes"]
        row(f"transient memory per step, {label}", mib(moved), f"{moved / delta_bytes:.3f} x selected delta (fp32)")

    print()
    print(f"bench_trainer: OLMoE 4 layers x 64 experts top-8 (hidden 256, expert intermediate 128, vocab 1024), "
          f"{full['total_params']:,} params; batch {args.batch} x <= {full['max_row_tokens']} tokens (mean row "
          f"{full['mean_row_tokens']:.1f}); {selected:,} params in 32/256 selected experts (delta); fp32, "
          f"gradient_checkpointing=False, AdamW (torch), max_grad_norm 1.0; {args.threads} threads")
    print(f"timing: the three runs in one process, stepped in rotation, {rounds} rounds after {w} warm-up steps; ratios "
          f"are medians over rounds of per-round ratios (wall clock, and process CPU time); memory: one subprocess "
          f"per run ({args.memory_steps} steps), peak RSS minus RSS after imports")
    header = ("measure", "value", "ratio", "target", "met")
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(5)]
    for line in [header] + rows:
        print("  ".join(str(c).ljust(wd) for c, wd in zip(line, widths)))


if __name__ == "__main__":
    main()
