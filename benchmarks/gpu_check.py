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


def model_config(preset: str, tiny: bool, **overrides):
    from transformers import AutoConfig

    from rasa_trainer.memory import PRESETS

    model_type, values = PRESETS[preset]
    values = {**values, **(TINY_OVERRIDES[preset] if tiny else {}), "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, **overrides}
    return AutoConfig.for_model(model_type, **values)


def build_model(preset: str, device: str, tiny: bool, seed: int = 0, **overrides):
    """Random bf16 weights, initialised on the device (no CPU copy of a 7B or 30B model); ``overrides`` change the
    preset's config (e.g. fewer layers)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(preset, tiny, **overrides)
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


class SyncCounter:
    """Counts the times the host waits for the device inside the block, with where (``counts``: ``"what file:line"``
    -> count; ``total``).

    CUDA: torch's own sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``): every synchronising call (a read
    of a device value, a blocking copy, a synchronising kernel) warns, and the warnings are counted. CPU: no call
    waits, so the ops that would wait on an accelerator are counted where they are called (a dispatch mode and a
    function mode): scalar reads (``item``, ``int()``, ``bool()``), ``tolist``, ``.cpu()``, ``nonzero``,
    ``masked_select``, ``unique``, ``bincount``, ``equal``, ``repeat_interleave`` without ``output_size``, indexing
    with a bool mask. Host tensors count as if they lived on the device, so the CPU count is an upper bound of the
    device's; host-only work in numpy is not counted (it never touches a device).
    """

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                "unique_consecutive", "bincount", "equal", "is_nonzero", "repeat_interleave"}
    MASK_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
    HOST_READS = {"tolist", "cpu"}

    def __init__(self, device: str):
        import collections

        self.device, self.counts = device, collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def top(self, n: int = 3) -> str:
        return ", ".join(f"{site} x{count}" for site, count in self.counts.most_common(n)) or "none"

    @staticmethod
    def _site() -> str:
        import traceback

        ours = [f for f in traceback.extract_stack()[:-2]
                if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
        return f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"

    def __enter__(self):
        if self.device.startswith("cuda"):
            import warnings

            torch.cuda.synchronize()
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            return self
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func._overloadpacket.__name__
                if name in counter.SYNC_OPS and not (name == "repeat_interleave" and kwargs.get("output_size")):
                    counter.counts[f"{name} {counter._site()}"] += 1
                elif name in counter.MASK_OPS:
                    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                    if any(t is not None and t.dtype == torch.bool for t in indices):
                        counter.counts[f"{name}[bool mask] {counter._site()}"] += 1
                return func(*args, **kwargs)

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in counter.HOST_READS:
                    counter.counts[f"{func.__name__} {counter._site()}"] += 1
                return func(*args, **(kwargs or {}))

        self._modes = [Function(), Dispatch()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode(self._mode)
            self._warnings.__exit__(*exc)
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    self.counts[f"sync {os.path.basename(w.filename)}:{w.lineno}"] += 1
            return False
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
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


# Rows that fail loudly on what CPU tests cannot see: the device placement of repairs and adapters, a save's device
# peak against the plan, and the host's waits for the device per training step. They use OLMoE-1B-7B's layer shapes
# with a few layers (a small vocabulary): what they check does not depend on depth, and they stay quick.
SMALL = dict(num_hidden_layers=2, vocab_size=1024)


def _random_repairs(model, seed: int = 1) -> None:
    from rasa_trainer.repairs.layer import repair_modules

    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for _, repairs in repair_modules(model):
            for p in repairs.parameters():
                p.copy_((torch.randn(p.shape, generator=g) * 1e-2).to(p.device, p.dtype))


def _inputs(ctx, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 16 if ctx.tiny else 64), generator=g).to(ctx.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _off_device(model, device: str) -> list[str]:
    """Repair parameters and buffers not on ``device`` (names)."""
    want = torch.device(device).type
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if ".rasa_repairs." in n and t.device.type != want]


def device_repairs_row(ctx) -> dict:
    """Repairs attached to a model already on the device: every repair tensor there, and a training forward and
    backward that compute the merged checkpoint (delta: bit for bit in bf16; LoRA: its skinny products, close)."""
    from rasa_trainer.moe.discovery import moe_layers
    from rasa_trainer.repairs.layer import attach_repairs, merged_state_dict, unload_repairs

    model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny, **SMALL)
    merged = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny, **SMALL)
    for p in model.parameters():  # the base frozen, as in training: gradients reach the repairs only
        p.requires_grad_(False)
    selection = {l.index: list(range(0, l.num_experts, 8)) for l in moe_layers(model)}
    inputs, problems, detail = _inputs(ctx, model.config.vocab_size), [], []
    for mode in ("delta", "lora"):
        params = attach_repairs(model, selection, mode=mode, rank=8)
        _random_repairs(model)
        problems += [f"{mode}: {n} off the device" for n in _off_device(model, ctx.device)]
        merged.load_state_dict(merged_state_dict(model))
        with torch.no_grad():
            want = merged(**inputs).logits
        got = model(**inputs).logits  # a training forward (gradients recorded)
        got.float().pow(2).mean().backward()
        grads = [p.grad for p in params]
        if any(g is None or not g.abs().sum() > 0 for g in grads):
            problems.append(f"{mode}: repairs got no gradient")
        diff = (got.detach().float() - want.float()).abs().max().item()
        if mode == "delta" and diff != 0:
            problems.append(f"delta: training forward differs from the merged checkpoint by {diff:.3g}")
        if mode == "lora" and not diff <= 3e-2 * max(1.0, want.float().abs().max().item()):
            problems.append(f"lora: training forward differs from the merged checkpoint by {diff:.3g}")
        detail.append(f"{mode}: max |dlogit| vs merged {diff:.3g}")
        unload_repairs(model, merge=False)
    del model, merged
    free_memory(ctx.device)
    return {"check": f"repairs attached on {ctx.device} (train forward + backward vs merged)",
            "result": "FAIL: " + "; ".join(problems) if problems else "ok", "detail": "; ".join(detail)}


def device_adapter_row(ctx) -> dict:
    """``load_rasa_adapter`` onto a model on the device: the repairs land there and reproduce the saved model."""
    from rasa_trainer.moe.discovery import moe_layers
    from rasa_trainer.repairs.adapter import load_rasa_adapter, save_peft_adapter
    from rasa_trainer.repairs.layer import attach_repairs

    model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny, **SMALL)
    attach_repairs(model, {l.index: list(range(0, l.num_experts, 8)) for l in moe_layers(model)}, "lora", rank=8)
    _random_repairs(model)
    inputs = _inputs(ctx, model.config.vocab_size)
    with torch.no_grad():
        want = model(**inputs).logits
    with tempfile.TemporaryDirectory() as tmp:
        save_peft_adapter(model, tmp, routers=False)
        del model
        fresh = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny, **SMALL)
        load_rasa_adapter(fresh, tmp)
    problems = [f"{n} off the device" for n in _off_device(fresh, ctx.device)]
    with torch.no_grad():
        got = fresh(**inputs).logits
    if not torch.equal(got, want):
        problems.append(f"logits differ from the saved model by {(got.float() - want.float()).abs().max().item():.3g}")
    del fresh
    free_memory(ctx.device)
    return {"check": f"load_rasa_adapter on {ctx.device} (LoRA repairs, logits vs the saved model)",
            "result": "FAIL: " + "; ".join(problems) if problems else "exact"}


def save_peak_row(ctx) -> dict:
    """A save in the middle of an expert phase (delta repairs): the peak it adds on the device, against the memory
    plan's save term. CUDA: ``max_memory_allocated`` during ``trainer.save_model``; CPU (host = device): the CPU
    allocator's peak of the in-place merge the save runs (``merged_for_saving``), as the write's own host buffers
    would be counted too."""
    import bench_trainer as bt

    from rasa_trainer import RASAConfig, RASATrainer
    from rasa_trainer.memory import estimate_memory
    from rasa_trainer.memory.measure import cpu_allocated_peak
    from rasa_trainer.repairs.layer import merged_for_saving

    from transformers import TrainerCallback

    model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny, **SMALL).train()
    pairs, tokenizer = _pairs_and_tokenizer(2 * ctx.batch, 32)
    measured = {}

    def measure(trainer, folder: str) -> None:
        _random_repairs(trainer.model)
        if ctx.device.startswith("cuda"):
            free_memory(ctx.device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            trainer.save_model(folder)
            torch.cuda.synchronize()
            measured.update(peak=torch.cuda.max_memory_allocated() - before, what="save_model")
        else:
            def merge():
                with merged_for_saving(trainer.model):
                    pass

            measured.update(peak=cpu_allocated_peak(merge), what="the save's in-place merge")

    class SaveMidway(TrainerCallback):  # after the first step, the repairs attached (the trainer unloads them at the end)
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:
                measure(trainer, os.path.join(a.output_dir, "saved"))

    with tempfile.TemporaryDirectory() as tmp:
        args = RASAConfig(output_dir=tmp, rasa_rounds=1, rasa_schedule="expert_only", per_device_train_batch_size=ctx.batch,
                          use_cpu=ctx.device == "cpu", bf16=True, report_to="none", save_strategy="no",
                          disable_tqdm=True, seed=0, dataloader_num_workers=0, logging_steps=10_000, max_length=48)
        trainer = RASATrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                              safety_critical_experts=bt.selection(model, FRACTION))
        trainer.add_callback(SaveMidway())
        trainer.train()
    if not measured:
        raise RuntimeError("the expert phase ran no step to save after")
    peak, what = measured["peak"], measured["what"]
    estimate = estimate_memory(model.config, FRACTION, expert_tuning="delta", dtype="bfloat16", batch_size=ctx.batch,
                               seq_len=48, schedule="expert_only", mixed_precision=True)
    # on the device: one fused parameter's merge; on the CPU the originals kept aside share the allocator too
    plan = estimate.phases["expert"].save_merge + (0 if ctx.device.startswith("cuda") else estimate.save_host_bytes)
    del trainer, model
    free_memory(ctx.device)
    ratio = peak / max(plan, 1)
    return {"check": f"mid-training save peak vs plan (delta, {what})", "peak": gib(peak),
            "result": "within plan" if ratio <= 1.15 else f"FAIL: {ratio:.2f} x the plan's save term",
            "detail": f"plan's save term{'' if ctx.device.startswith('cuda') else ' + host originals'} {gib(plan)}; "
                      f"measured/plan {ratio:.3f}"}


def sync_row(ctx) -> dict:
    """Host waits for the device per expert-phase training step, for 2 and 4 MoE layers (delta and LoRA repairs,
    replayed routing): the count must not grow with the layers. CUDA: torch's sync debug mode, warnings counted;
    CPU: the ops that would wait, counted (:class:`SyncCounter`)."""
    import bench_trainer as bt
    from transformers import TrainerCallback

    from rasa_trainer import RASAConfig, RASATrainer

    counts, sites = {}, {}
    for tuning in ("delta", "lora"):
        for layers in (2, 4):
            model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny, num_hidden_layers=layers, vocab_size=1024).train()
            pairs, tokenizer = _pairs_and_tokenizer(2 * ctx.batch, 32)
            counters = []

            class Count(TrainerCallback):
                def on_step_begin(self, *a, **kw):
                    counters.append(SyncCounter(ctx.device).__enter__())

                def on_step_end(self, *a, **kw):
                    counters[-1].__exit__(None, None, None)

            with tempfile.TemporaryDirectory() as tmp:
                args = RASAConfig(output_dir=tmp, rasa_rounds=1, rasa_schedule="expert_only", expert_tuning=tuning,
                                  per_device_train_batch_size=ctx.batch, use_cpu=ctx.device == "cpu", bf16=True,
                                  report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                                  dataloader_num_workers=0, logging_steps=10_000, max_length=48)
                trainer = RASATrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                      safety_critical_experts=bt.selection(model, FRACTION))
                trainer.add_callback(Count())
                trainer.train()
            counts[tuning, layers] = counters[-1].total  # the last step: nothing left to set up
            sites[tuning, layers] = counters[-1].top()
            del trainer, model
            free_memory(ctx.device)
    grows = [t for t in ("delta", "lora") if counts[t, 4] != counts[t, 2]]
    detail = "; ".join(f"{t}: {counts[t, 2]} (2 layers) / {counts[t, 4]} (4 layers), at {sites[t, 4]}"
                       for t in ("delta", "lora"))
    return {"check": f"host waits per expert step, 2 vs 4 MoE layers ({'sync debug mode' if ctx.device.startswith('cuda') else 'CPU op count'})",
            "result": f"FAIL: grows with the layers ({', '.join(grows)})" if grows else "flat", "detail": detail}


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
    ("device_repairs", device_repairs_row, 10),
    ("device_adapter", device_adapter_row, 10),
    ("save_peak", save_peak_row, 15),
    ("syncs", sync_row, 45),
    ("expert_delta", lambda c: trainer_row(c, "delta"), 25),
    ("expert_lora", lambda c: trainer_row(c, "lora"), 25),
    ("router", lambda c: trainer_row(c, "router"), 25),
    ("full_sft", lambda c: trainer_row(c, "full"), 30),
    ("peft_lora", lambda c: trainer_row(c, "peft"), 25),
    ("detection", detection_rows, 45),
    ("qwen3_30b", qwen_row, 60),
    ("vllm", lambda c: vllm_row(c), 60),
]
TINY_NEEDS = 3  # seconds a tiny row needs at least


def vllm_row(ctx) -> dict:
    """The vLLM generation backend against the HF backend on the OLMoE-1B-7B shape (4 layers; bf16 on a GPU, fp32
    at the tiny CPU shape): routing captured, batch 32, tokens/s side by side, and how many replies and routed
    experts agree (exact in fp32; in bf16 both engines approximate the same model). Skipped without vLLM."""
    import importlib.util
    import random
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        return {"check": "vLLM backend", "result": "skipped (vLLM not installed: pip install vllm)"}
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import bench_trainer as bt

    from rasa_trainer.detection.backends import HFBackend, VLLMBackend

    # vLLM's CPU attention needs head sizes >= 32: two heads at the tiny width
    heads = dict(num_attention_heads=2, num_key_value_heads=2) if ctx.tiny else {}
    model = build_model("OLMoE-1B-7B", ctx.device, ctx.tiny, num_hidden_layers=2 if ctx.tiny else 4, **heads)
    if not ctx.device.startswith("cuda"):
        model = model.float()
    tokenizer = bt.chat_tokenizer()
    rng = random.Random(0)
    chats = [[{"role": "user", "content": " ".join(f"w{rng.randrange(1000)}" for _ in range(28))}] for _ in range(32)]
    new = ctx.new_tokens
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        engine = {"enforce_eager": True}  # start-up within the check's budget (no compile, no CUDA graphs)
        if ctx.device.startswith("cuda"):
            engine["gpu_memory_utilization"] = 0.5  # the HF model stays on the same GPU
        start = time.perf_counter()
        vllm = VLLMBackend.from_model(model, tokenizer, model_path=folder, engine_kwargs=engine)
        started = time.perf_counter() - start
        try:
            speeds, batches = {}, {}
            for name, backend in (("hf", HFBackend(model, tokenizer)), ("vllm", vllm)):
                backend.generate_batch(chats[:8], max_new_tokens=new, with_routing=True)  # warm-up
                sync(ctx.device)
                start = time.perf_counter()
                batches[name] = backend.generate_batch(chats, max_new_tokens=new, min_new_tokens=new,
                                                       with_routing=True)
                sync(ctx.device)
                speeds[name] = 32 * new / (time.perf_counter() - start)
        finally:
            vllm.close()
    hf, vl = batches["hf"], batches["vllm"]
    same = sum(a == b for a, b in zip(hf.reply_token_ids, vl.reply_token_ids))
    experts = lambda batch, i: batch.routing_of([i == j for j in range(32)]).stacked_indices().sort(-1).values  # noqa: E731
    routed = [torch.equal(experts(hf, i), experts(vl, i)) for i in range(32)]  # per token, as sets of k experts
    del model
    free_memory(ctx.device)
    return {"check": f"vLLM backend, batch 32, {new} new tokens, routing captured",
            "time": f"{speeds['hf']:.0f} tok/s HF, {speeds['vllm']:.0f} tok/s vLLM "
                    f"({speeds['vllm'] / speeds['hf']:.1f}x)",
            # fp32 is exact (tests/detection/test_vllm_backend.py): different replies there are a failure
            "result": ("FAIL: " if same < 32 and not ctx.device.startswith("cuda") else "")
                      + f"{same}/32 replies identical, {sum(routed)}/32 with identical routed experts",
            "detail": f"vLLM eager, started in {started:.0f} s; "
                      + ("bf16: both approximate the same model" if ctx.device.startswith("cuda") else "fp32")}


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
    # a row that errors or fails a check fails the command (CI and the lent GPU both read the status)
    return 1 if any(str(r.get("result", "")).startswith(("ERROR", "FAIL")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
