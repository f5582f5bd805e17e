"""The plan itself: per-phase bytes of weights, gradients, optimiser state and replay cache, and their peak.

:func:`estimate_memory` instantiates the model on the meta device (``with torch.device("meta"):
AutoModelForCausalLM.from_config(config)``), so parameter counts are those of the real model, and finds the MoE layers
with :func:`rasa_trainer.moe.discovery.moe_layers`. Everything else follows from how :class:`rasa_trainer.RASATrainer` trains:

- **weights**: every parameter and buffer in ``dtype``; routers become fp32 master weights when the schedule has a
  router phase; the repairs of the selected experts are fp32 (full-rank deltas, or LoRA factors).
- **trainable parameters**: expert phase = the selected experts' slices of every fused expert parameter (``delta``:
  ``S * P_e``, biases included) or their LoRA factors (``lora``: ``S * r * (d_out + d_in)`` per 3-D expert matrix,
  biases not tuned); router phase = every router parameter the router's outputs have a gradient through (a frozen
  selection-only bias is not trained).
- **gradients**: fp32, of the active group only (the Trainer sets inactive gradients to None).
- **optimiser state**: AdamW = two fp32 moments per parameter plus a 4-byte step per tensor; 8-bit AdamW
  (bitsandbytes, block-wise) = two 1-byte moments plus an fp32 scale per 256-value block. With ``schedule=
  "alternate"`` the state of both groups is held from the second phase on (AdamW creates state lazily and keeps it).
- **routing-replay cache**: ``L * k * (index bytes + weight bytes)`` per token (int16 indices up to 32767 experts;
  top-k weights as the router hands them on: in ``dtype`` when the routers are fp32 master weights, i.e. schedules
  with a router phase, where RASATrainer casts them back; otherwise as the family's router returns them, which is
  fp32 for Mixtral and DeepSeek-V3 even in a bf16 model, found by running a CPU copy of the router); RASATrainer keeps two dataset-wide caches in
  the schedules with an expert phase (the routing at the start of training, for the routing-shift metric, and the
  routing of the current expert phase), one in ``router_only``. The run-start routing keeps indices only, and the
  phase cache keeps weights only with ``replay_weights="cached"``. They live on ``replay_cache_device`` (the CPU by
  default), so they are reported apart and only counted in the device totals when that device is not the CPU.
- **full SFT (reference column)**: every parameter trainable in ``dtype`` (gradients and torch AdamW moments in the
  parameters' dtype), the model's own activations formula (:mod:`.activations`).
- **activations**: the tensors autograd saves for backward, from the approximate per-token formulas of
  :mod:`.activations`, plus a transient term for the peak inside backward.
- **optimiser step**: ``trainable * moment bytes`` of temporaries (torch's multi-tensor AdamW on accelerators;
  ``device="cpu"``: twice the largest trainable tensor, as AdamW runs per tensor there).

The peak per phase (what ``torch.cuda.max_memory_allocated`` reports) is ``weights + optimiser state +
max(activations + transient, gradients + step temporaries, gradients + no-grad forward)``: gradients are allocated
while backward frees the activations, so the extremes are the start of backward, the optimiser step and a forward
without gradients between steps. ``device_total`` adds the caching allocator's slack (``allocator_slack`` of the
peak above the weights, 20% by default) and the runtime's context (768 MiB on an accelerator): what the device must
hold.
Padding is counted (a padded batch is ``batch_size * seq_len`` tokens). ``num_processes`` counts data-parallel
replicas (DDP): per-process memory is unchanged, and the "all processes" total is multiplied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..training.config import SCHEDULES as CONFIG_SCHEDULES
from ..moe.discovery import moe_layers
from ..repairs.layer import REPAIR_MODES
from .activations import _activations
from .models import _resolve_model

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "adamw_8bit")
# the schedules a plan covers; "full" is planned as the full_sft reference of every estimate
SCHEDULES = tuple(s for s in CONFIG_SCHEDULES if s != "full")
# The caching allocator's overhead over the memory allocated on top of the weights (block rounding, fragmentation),
# and what the CUDA runtime holds outside torch (context, cuBLAS / cuDNN workspaces). Conservative defaults, to be
# replaced by the ratios benchmarks/gpu_check.py measures (max_memory_reserved / max_memory_allocated).
ALLOCATOR_SLACK = 0.2
DEVICE_CONTEXT_BYTES = 768 * 2**20


@dataclass
class PhaseMemory:
    """Bytes one training phase needs on one device (per process)."""

    phase: str
    weights: int
    trainable_parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    transient: int
    replay_cache: int
    optimizer_step: int = 0
    no_grad_forward: int = 0
    allocator_slack: int = 0
    device_context: int = 0
    save_merge: int = 0  # a checkpoint's in-place merge: one fused parameter's selected slices, gathered and merged
    saved_per_layer: list = field(default_factory=list)  # bytes each decoder layer saves for backward (no checkpointing)

    @property
    def total(self) -> int:
        """Peak of allocated tensors: weights, optimiser state and device cache always; then the largest of the start
        of backward (saved activations plus the backward transient), the optimiser step (gradients plus the step's
        temporaries) and a forward without gradients while repairs are attached (gradients of a micro-batch before it
        plus its largest layer's working set). Gradients grow while activations are freed during backward, so
        the two never peak together. A checkpoint save between steps merges the repairs in place, one fused
        parameter's selected slices at a time (:attr:`save_merge`; the original slices wait in host memory,
        :attr:`MemoryEstimate.save_host_bytes`). This is what ``torch.cuda.max_memory_allocated`` reports."""
        return (self.weights + self.optimizer_state + self.replay_cache
                + max(self.activations + self.transient, self.gradients + self.optimizer_step,
                      self.gradients + self.no_grad_forward, self.save_merge))

    @property
    def device_total(self) -> int:
        """What the device must hold: :attr:`total` plus the caching allocator's slack and the runtime's context."""
        return self.total + self.allocator_slack + self.device_context


@dataclass
class MemoryEstimate:
    """What :func:`estimate_memory` predicts. All sizes in bytes; ``phases`` maps ``expert`` / ``router`` (those the
    schedule runs) and ``full_sft`` (plain full fine-tuning of the same model, for reference) to a
    :class:`PhaseMemory`."""

    model_type: str
    num_parameters: int
    weight_bytes: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    num_routed_experts: int
    selected_experts: int
    parameters_per_expert: int
    trainable_parameters_expert: int
    trainable_parameters_router: int
    replay_cache_bytes_per_token: int
    replay_cache_copies: int
    replay_cache_bytes: int | None
    replay_initial_bytes_per_token: int
    phases: dict[str, PhaseMemory]
    settings: dict = field(default_factory=dict)
    save_host_bytes: int = 0  # the selected experts' original slices a save keeps on the host while merged

    def to_dict(self) -> dict:
        out = asdict(self)
        for name, phase in self.phases.items():
            out["phases"][name]["total"] = phase.total
            out["phases"][name]["device_total"] = phase.device_total
        return out

    def format(self) -> str:
        """A human-readable table."""
        s = self.settings
        lines = [
            f"RASA memory plan: {self.model_type}, {self.num_parameters / 1e9:.3f} B parameters "
            f"({_human(self.weight_bytes)} in {s['dtype']}), {self.num_moe_layers} MoE layers x {self.num_experts} "
            f"experts, top-{self.top_k}",
            f"selected experts: {self.selected_experts} of {self.num_routed_experts} "
            f"({100 * self.selected_experts / self.num_routed_experts:.1f}%), {self.parameters_per_expert:,} parameters "
            f"each; expert tuning {s['expert_tuning']}" + (f" (rank {s['lora_rank']})" if s["expert_tuning"] == "lora" else ""),
            f"settings: schedule {s['schedule']}, optimizer {s['optimizer']} on {s['device']}, batch {s['batch_size']} x {s['seq_len']} "
            f"tokens per device, gradient checkpointing {s['gradient_checkpointing']}, {s['num_processes']} process(es), "
            f"replay weights {s['replay_weights']}, cache on {s['replay_cache_device']}",
            "",
        ]
        names = list(self.phases)
        header = ["", *[{"expert": "expert phase", "router": "router phase", "full_sft": "full SFT (reference)"}[n] for n in names]]
        rows = [
            ("trainable parameters", [f"{self.phases[n].trainable_parameters:,}" for n in names]),
            ("weights (incl. repairs)", [_human(self.phases[n].weights) for n in names]),
            ("gradients", [_human(self.phases[n].gradients) for n in names]),
            ("optimizer state", [_human(self.phases[n].optimizer_state) for n in names]),
            ("activations (saved)", [_human(self.phases[n].activations) for n in names]),
            ("transient (backward, LM head)", [_human(self.phases[n].transient) for n in names]),
            ("optimizer step temporaries", [_human(self.phases[n].optimizer_step) for n in names]),
            ("no-grad forward", [_human(self.phases[n].no_grad_forward) for n in names]),
            ("replay cache on device", [_human(self.phases[n].replay_cache) for n in names]),
            ("total per device (peak)", [_human(self.phases[n].total) for n in names]),
        ]
        if s["device"] != "cpu":
            rows.append(("+ allocator slack, context", [_human(self.phases[n].device_total) for n in names]))
        if s["num_processes"] > 1:
            rows.append((f"total, {s['num_processes']} processes", [_human(self.phases[n].total * s["num_processes"]) for n in names]))
        widths = [max(len(r[0]) for r in rows + [("", [])])] + [
            max(len(header[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(len(names))
        ]
        lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
        for label, values in rows:
            lines.append("  ".join([label.ljust(widths[0]), *(v.rjust(w) for v, w in zip(values, widths[1:]))]))
        lines.append("")
        weight = f" + {s['weight_bytes']} B weight" if s["replay_weights"] == "cached" else ""
        cache = (
            f"routing-replay cache: {self.replay_cache_bytes_per_token} B per token "
            f"(= {self.num_moe_layers} layers x top-{self.top_k} x ({s['index_bytes']} B index{weight})), plus the "
            f"run-start routing, indices only ({self.replay_initial_bytes_per_token} B per token), on {s['replay_cache_device']}"
        )
        per_token = self.replay_cache_bytes_per_token * (self.replay_cache_copies - 1) + self.replay_initial_bytes_per_token
        if self.replay_cache_bytes is not None:
            cache += f": {_human(self.replay_cache_bytes)} for {s['tokens_in_dataset']:,} tokens"
        else:
            cache += f": {_human(per_token * 10**6)} per 1M tokens"
        lines.append(cache)
        lines.append("peak = weights + optimizer state + max(activations + transient, gradients + optimizer step, "
                     "gradients + no-grad forward); activations are an approximate formula (see rasa_trainer.memory), "
                     "expect roughly +-15%.")
        if s["device"] != "cpu":
            lines.append(f"device total = peak + allocator slack ({s['allocator_slack']:.0%} of the peak above the "
                         f"weights) + {_human(s['device_context_bytes'])} runtime context")
        return "\n".join(lines)

    __str__ = format


def _human(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    try:
        return DTYPE_BYTES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPE_BYTES)} or a torch.dtype") from None


def selection_value(value, name: str = "selection_size") -> int | float:
    """A selection size as a user writes it (``0.125``, ``8``, ``8.0``, ``"0.125"``) as a count (``int`` >= 1) or a
    fraction of all routed experts (``float`` in (0, 1)).

    Raises:
        ValueError: anything else, e.g. ``1.5`` (neither a whole count nor a fraction), 0, a negative number, NaN.
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: give a count of experts (e.g. 8) or a fraction of all routed experts "
                             "(e.g. 0.125)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: give a count of experts (e.g. 8) or a fraction of all routed experts "
                         "(e.g. 0.125)")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value}: give a count of experts (>= 1) or a fraction of all routed experts in (0, 1)")
    if value < 1:
        return float(value)
    if not float(value).is_integer():
        raise ValueError(f"{name}={value}: neither a whole count of experts nor a fraction in (0, 1); give e.g. "
                         f"{math.floor(value)} or {math.ceil(value)} experts, or a fraction such as 0.125")
    return int(value)


def _selection_count(selection_size, total: int) -> int:
    if isinstance(selection_size, bool) or not isinstance(selection_size, (int, float)):
        raise TypeError(f"selection_size must be a count (int) or a fraction (float in (0, 1)), got {selection_size!r}")
    if isinstance(selection_size, float) and not selection_size.is_integer():
        if not 0 < selection_size < 1:
            raise ValueError(f"selection_size={selection_size}: neither a whole count of experts nor a fraction in "
                             "(0, 1); give a count (e.g. 8) or a fraction of all routed experts (e.g. 0.125)")
        return max(1, round(selection_size * total))
    count = int(selection_size)
    if not 1 <= count <= total:
        raise ValueError(f"selection_size={selection_size}: the model has {total} routed experts; give 1..{total}")
    return count


def _optimizer_bytes(tensors: list[int], optimizer: str) -> int:
    """Optimiser state of parameters of the given element counts."""
    if optimizer == "adamw":
        return sum(8 * n + 4 for n in tensors)
    # bitsandbytes 8-bit AdamW: two uint8 moments plus one fp32 absmax per 256-value block (and a step counter)
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) + 4 for n in tensors)


def _step_temporaries(trainable: int, largest: int, moment_bytes: int, optimizer: str, device: str) -> int:
    """Temporaries of one optimiser step. torch's AdamW is multi-tensor on accelerators: it builds the denominator
    ``sqrt(v) / c + eps`` for all parameters at once; on the CPU it runs one tensor at a time (two temporaries of the
    largest tensor). bitsandbytes' 8-bit AdamW works in place."""
    if optimizer != "adamw":
        return 0
    return 2 * largest * moment_bytes if device == "cpu" else trainable * moment_bytes


@torch.no_grad()
def _router_weight_bytes(router: torch.nn.Module, hidden: int, dtype, default: int) -> int:
    """Bytes per top-k weight the router returns for a model in ``dtype`` (run on a CPU copy; meta routers are
    materialised with random weights)."""
    import copy
    import itertools

    try:
        probe = copy.deepcopy(router)
        if any(t.is_meta for t in itertools.chain(probe.parameters(), probe.buffers())):
            probe = probe.to_empty(device="cpu")
            for t in itertools.chain(probe.parameters(), probe.buffers()):
                t.normal_() if t.is_floating_point() else t.zero_()
        torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(str(dtype), str(dtype)))
        probe = probe.to("cpu").to(torch_dtype).eval()
        probe._forward_hooks.clear()
        probe._forward_pre_hooks.clear()
        out = probe(torch.randn(4, hidden, dtype=torch_dtype))
        return int(out[1].element_size())
    except Exception:  # noqa: BLE001 - an unusual router: assume the model's dtype
        return default


def estimate_memory(
    config_or_model_id_or_model,
    selection_size,
    *,
    expert_tuning: str = "delta",
    lora_rank: int = 8,
    dtype="bfloat16",
    optimizer: str = "adamw",
    batch_size: int = 8,
    seq_len: int = 512,
    tokens_in_dataset: int | None = None,
    gradient_checkpointing: bool = True,
    num_processes: int = 1,
    replay_weights: str = "cached",
    schedule: str = "alternate",
    replay_cache_device: str = "cpu",
    device: str = "cuda",
    mixed_precision: bool | None = None,
    allocator_slack: float = ALLOCATOR_SLACK,
    device_context_bytes: int | None = None,
) -> MemoryEstimate:
    """Predict the memory of a RASA run, per phase and per device.

    Args:
        config_or_model_id_or_model: a model (its real parameters are counted), a ``transformers`` config, a local
            directory or ``config.json``, or a model id already in the local Hugging Face cache (nothing is
            downloaded; an id that is not available offline raises ``ValueError``).
        selection_size: selected experts, as a count (int) or a fraction of all routed experts (float in (0, 1)).
        expert_tuning: ``"delta"`` or ``"lora"`` (rank ``lora_rank``), as ``RASAConfig.expert_tuning``.
        dtype: the model's dtype (``"bfloat16"``, ``"float16"``, ``"float32"`` or a ``torch.dtype``).
        optimizer: ``"adamw"`` (torch) or ``"adamw_8bit"`` (bitsandbytes).
        batch_size, seq_len: micro-batch per device (padded length).
        tokens_in_dataset: training tokens, for the size of the routing-replay cache.
        gradient_checkpointing: as ``SFTConfig.gradient_checkpointing`` (True by default there).
        num_processes: data-parallel processes (each holds a full replica and the full caches).
        replay_weights: as ``RASAConfig.replay_weights`` ("recompute" stores no weights in the cache).
        schedule: ``"alternate"`` (default), ``"expert_only"`` or ``"router_only"``.
        replay_cache_device: where the caches live (``RASAConfig.replay_cache_device``, CPU by default).
        device: the training device type (``"cuda"`` or any accelerator, or ``"cpu"``); it changes the optimiser
            step's temporaries (torch's AdamW is multi-tensor on accelerators and per tensor on the CPU) and whether a
            device context is added.
        mixed_precision: whether the forward runs under autocast (``bf16=True`` / ``fp16=True`` in the training
            arguments: accelerate wraps the forward in ``torch.autocast``). Default: on for a 16-bit ``dtype``. It
            changes the precision of the LoRA products (fp32 factors: fp32 products without autocast, 16-bit ones
            under it).
        allocator_slack: the caching allocator's overhead on the device, as a fraction of the memory allocated on top
            of the weights (fragmentation and rounding; ``torch.cuda.max_memory_reserved`` over
            ``max_memory_allocated``); reported in ``device_total``.
        device_context_bytes: memory the device runtime holds outside torch's allocator (CUDA context, cuBLAS
            workspaces); default 768 MiB on an accelerator, 0 on the CPU; reported in ``device_total``.

    Returns a :class:`MemoryEstimate`; ``print(estimate.format())`` shows the table.
    """
    if expert_tuning not in REPAIR_MODES:
        raise ValueError(f"expert_tuning={expert_tuning!r}; expected one of {REPAIR_MODES}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; expected one of {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; expected one of {SCHEDULES}")
    if replay_weights not in ("cached", "recompute"):
        raise ValueError(f"replay_weights={replay_weights!r}; expected 'cached' or 'recompute'")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_processes", num_processes), ("lora_rank", lora_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; it must be a positive integer")
    if tokens_in_dataset is not None and (not isinstance(tokens_in_dataset, int) or tokens_in_dataset < 0):
        raise ValueError(f"tokens_in_dataset={tokens_in_dataset!r}; it must be a non-negative integer or None")
    if not 0 <= allocator_slack < 1:
        raise ValueError(f"allocator_slack={allocator_slack!r}; give a fraction in [0, 1)")
    b = _dtype_bytes(dtype)
    if mixed_precision is None:
        mixed_precision = b == 2
    if device_context_bytes is None:
        device_context_bytes = 0 if device == "cpu" else DEVICE_CONTEXT_BYTES

    model = _resolve_model(config_or_model_id_or_model)
    layers = moe_layers(model)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(text_config.hidden_size)

    # shared (tied) parameters appear once; repairs already attached to a model passed in are not the model's own
    params = [p for n, p in model.named_parameters() if ".rasa_repairs." not in n]
    num_parameters = sum(p.numel() for p in params)
    buffer_bytes = sum(buf.numel() * buf.element_size() for n, buf in model.named_buffers() if ".rasa_repairs." not in n)
    weight_bytes = num_parameters * b + buffer_bytes

    # experts and routers
    num_routed = sum(layer.num_experts for layer in layers)
    selected = _selection_count(selection_size, num_routed)
    per_expert = [sum(getattr(layer.experts, n)[0].numel() for n in layer.expert_parameter_names()) for layer in layers]
    params_per_expert = round(sum(pe * l.num_experts for pe, l in zip(per_expert, layers)) / num_routed)
    if expert_tuning == "delta":
        per_selected = params_per_expert
        expert_tensors_per_layer = [len(l.expert_parameter_names()) for l in layers]
    else:
        lora = []
        for layer in layers:
            lora.append(sum(lora_rank * (p.shape[1] + p.shape[2]) for n in layer.expert_parameter_names()
                            if (p := getattr(layer.experts, n)).dim() == 3))
        per_selected = round(sum(x * l.num_experts for x, l in zip(lora, layers)) / num_routed)
        expert_tensors_per_layer = [2 * sum(getattr(l.experts, n).dim() == 3 for n in l.expert_parameter_names()) for l in layers]
    trainable_expert = selected * per_selected
    # the largest repair tensor: one fused parameter's slices of the selected experts of one layer (spread evenly)
    per_layer_selected = math.ceil(selected / len(layers))
    if expert_tuning == "delta":
        largest_repair = per_layer_selected * max(getattr(l.experts, n)[0].numel() for l in layers for n in l.expert_parameter_names())
    else:
        largest_repair = per_layer_selected * lora_rank * max(max(getattr(l.experts, n).shape[1:]) for l in layers
                                                              for n in l.expert_parameter_names() if getattr(l.experts, n).dim() == 3)
    # the router phase trains the parameters the routers' outputs differentiate; all of a router becomes fp32
    router_params = [p for layer in layers for n, p in layer.router.named_parameters() if n in layer.router_trainable]
    trainable_router = sum(p.numel() for p in router_params)
    router_numel = sum(p.numel() for layer in layers for p in layer.router.parameters())

    # optimiser state (lazy per group; both kept once both have stepped)
    moe_with_selection = min(len(layers), selected)  # tensors exist per MoE layer holding a selected expert
    n_expert_tensors = int(round(sum(expert_tensors_per_layer) / len(layers) * moe_with_selection))
    expert_sizes = [trainable_expert // max(1, n_expert_tensors)] * n_expert_tensors
    opt_expert = _optimizer_bytes(expert_sizes, optimizer)
    opt_router = _optimizer_bytes([p.numel() for p in router_params], optimizer)

    # replay cache
    top_k = layers[0].top_k
    index_bytes = 2 if max(l.num_experts for l in layers) <= torch.iinfo(torch.int16).max else 4
    # the cache keeps the top-k weights as the router hands them on: RASATrainer casts them back to the model's dtype
    # when routers are fp32 master weights (schedules with a router phase); otherwise some families (Mixtral,
    # DeepSeek-V3) return fp32 weights from a bf16 model
    weight_bytes_cached = b if schedule != "expert_only" else _router_weight_bytes(layers[0].router, hidden, dtype, b)
    slots = sum(l.top_k for l in layers)
    # the phase cache keeps weights only when they are replayed; the run-start routing (routing-shift metric) keeps
    # indices only
    per_token = slots * (index_bytes + (weight_bytes_cached if replay_weights == "cached" else 0))
    initial_per_token = slots * index_bytes
    copies = 1 if schedule == "router_only" else 2
    all_per_token = initial_per_token + (per_token if copies == 2 else 0)
    cache_total = None if tokens_in_dataset is None else all_per_token * tokens_in_dataset
    cache_on_device = 0
    if replay_cache_device != "cpu":
        if tokens_in_dataset is None:
            raise ValueError("replay_cache_device is not the CPU: give tokens_in_dataset to size the cache on the device")
        cache_on_device = cache_total

    # activations
    acts = _activations(model, layers, text_config, b, batch_size, seq_len, selected, num_routed,
                        gradient_checkpointing, expert_tuning, lora_rank, mixed_precision, schedule, device,
                        weight_bytes_cached)

    has_expert = schedule in ("alternate", "expert_only")
    has_router = schedule in ("alternate", "router_only")
    router_upcast = router_numel * (4 - b) if has_router else 0
    repairs = 4 * trainable_expert if has_expert else 0
    weights = weight_bytes + router_upcast + repairs
    phases: dict[str, PhaseMemory] = {}
    both = schedule == "alternate"
    if has_expert:
        phases["expert"] = PhaseMemory(
            "expert", weights, trainable_expert, 4 * trainable_expert, opt_expert + (opt_router if both else 0),
            acts["expert"], acts["expert_transient"], cache_on_device,
            _step_temporaries(trainable_expert, largest_repair, 4, optimizer, device), acts["no_grad"],
            saved_per_layer=acts["per_layer"]["expert"],
        )
    if has_router:
        phases["router"] = PhaseMemory(
            "router", weights, trainable_router, 4 * trainable_router, opt_router + (opt_expert if both else 0),
            acts["router"], acts["router_transient"],
            cache_on_device if schedule == "alternate" else (cache_on_device // 2 if cache_on_device else 0),
            _step_temporaries(trainable_router, max(p.numel() for p in router_params), 4, optimizer, device),
            acts["no_grad"], saved_per_layer=acts["per_layer"]["router"],
        )
    if optimizer == "adamw":
        full_opt = 2 * b * num_parameters + 4 * len(params)  # torch AdamW keeps its moments in the parameters' dtype
    else:
        full_opt = _optimizer_bytes([p.numel() for p in params], optimizer)
    phases["full_sft"] = PhaseMemory(
        "full_sft", weight_bytes, num_parameters, b * num_parameters, full_opt, acts["full"], acts["full_transient"], 0,
        _step_temporaries(num_parameters, max(p.numel() for p in params), b, optimizer, device),
        saved_per_layer=acts["per_layer"]["full"],
    )
    settings = dict(
        expert_tuning=expert_tuning, lora_rank=lora_rank, dtype=str(dtype).replace("torch.", ""), optimizer=optimizer,
        batch_size=batch_size, seq_len=seq_len, tokens_in_dataset=tokens_in_dataset,
        gradient_checkpointing=gradient_checkpointing, num_processes=num_processes, replay_weights=replay_weights,
        schedule=schedule, replay_cache_device=replay_cache_device, device=device, index_bytes=index_bytes,
        weight_bytes=weight_bytes_cached, mixed_precision=mixed_precision, allocator_slack=allocator_slack,
        device_context_bytes=device_context_bytes,
    )
    if has_expert:  # repairs exist in every phase of the run, so any save merges them
        slice_numel = per_layer_selected * max(getattr(l.experts, n)[0].numel() for l in layers
                                               for n in l.expert_parameter_names())
        # gathered slices (dtype), their fp32 copy and sum, the merged result (dtype); LoRA adds its B @ A (fp32)
        merge = slice_numel * (2 * b + 8 + (4 if expert_tuning == "lora" else 0))
        for name in ("expert", "router"):
            if name in phases:
                phases[name].save_merge = merge
    for phase in phases.values():
        phase.allocator_slack = int(allocator_slack * (phase.total - phase.weights))
        phase.device_context = device_context_bytes
    return MemoryEstimate(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        num_parameters=num_parameters, weight_bytes=weight_bytes, num_moe_layers=len(layers),
        num_experts=layers[0].num_experts, top_k=top_k, num_routed_experts=num_routed, selected_experts=selected,
        parameters_per_expert=params_per_expert, trainable_parameters_expert=trainable_expert,
        trainable_parameters_router=trainable_router, replay_cache_bytes_per_token=per_token,
        replay_cache_copies=copies, replay_cache_bytes=cache_total, replay_initial_bytes_per_token=initial_per_token,
        phases=phases, settings=settings,
        save_host_bytes=selected * params_per_expert * b if has_expert else 0,
    )
