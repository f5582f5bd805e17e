"""Trainable repairs of selected experts inside fused expert tensors, and their lifecycle (a PEFT-style tuner).

transformers 5 stores all routed experts of a layer in one fused parameter, so ``requires_grad`` cannot select
experts. Each selected expert instead gets its own trainable repair: a full-rank ``delta`` of its slices, or LoRA
factors. Gradients and optimiser state are therefore sized by the selected experts, never by whole fused tensors.

The repairs are applied by an experts function registered in transformers' ``ExpertsInterface`` (the library's own
extension point, chosen with ``model.set_experts_implementation``). It splits the (token, slot) assignments of a
layer in two: those that reach an unselected expert run through the model's own experts kernel unchanged, and those
that reach a selected expert run through the same kernel on a view of the experts that holds only the selected
experts' repaired weights. The per-slot outputs are then summed over slots exactly as the kernel sums them (fp32
reduction for ``grouped_mm`` / ``batched_mm``, expert-ordered adds in the model dtype for ``eager``). So a model with
repairs computes bit for bit what the merged checkpoint computes, and zero repairs are bit-identical to no repairs,
in fp32 and bf16 (tested for every experts implementation a family has).

One exception, by design: LoRA repairs in a forward that records gradients never materialise ``B @ A``; they add two
skinny products per selected expert projection (as PEFT does for linear layers), which is exact in real arithmetic
but not bit-identical to the merged weights. All selected experts of a layer run at once: the base products as one
grouped GEMM over the fused weights (rows sorted by expert), the skinny products against every selected expert's
factors side by side, each row keeping its own expert's block (no loop over experts). Without gradients (evaluation, generation, routing capture) LoRA repairs
go through the kernel with the merged slices like delta repairs, and a layer is either copied with its repaired
slices written in (one kernel call; small layers) or run per slot (large layers, when that needs less memory than the
copy): :func:`no_grad_working_set` decides and states the bytes.

Lifecycle, as PEFT's tuners have it: :func:`attach_repairs`, :func:`merge_repairs` / :func:`unmerge_repairs`,
:func:`disable_repairs` (a context manager), :func:`unload_repairs` (back to a plain transformers model), and
:func:`merged_state_dict` for saving without touching the model. One merge function (:func:`_merge_slices`) serves
all of them and the PEFT adapter export. Routers train as fp32 master weights (:func:`upcast_routers`); unloading
casts them back to the dtype they had.

The host never waits for the device inside a layer when the routing is replayed (the expert phase): the split of a
layer's assignments is computed from the host copy of the replayed indices (:func:`rasa_trainer.moe.routing.host_indices`)
and sent to the device in one non-blocking copy. With live routing (the router phase, evaluation) the split costs one
read of the layer's count of assignments to selected experts; the rest stays on the device.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from ..moe.discovery import MoELayer, _full_shape, moe_layers, unwrap_model
from ..moe.routing import host_indices

__all__ = [
    "ExpertRepairs", "attach_repairs", "disable_repairs", "merge_repairs", "merged_for_saving", "merged_state_dict",
    "repair_modules",
    "restore_routers", "unload_repairs", "unmerge_repairs", "upcast_routers",
]

EXPERTS_IMPLEMENTATION = "rasa_repairs"
REPAIR_MODES = ("delta", "lora")
# base kernels whose per-token reduction is a sum over slots (fp32 accumulation); "eager" adds experts in order
_SLOT_SUM_KERNELS = ("grouped_mm", "batched_mm")


# --------------------------------------------------------------------------------------------------------------------
# The one merge: a repair's additive change, and base slices with it applied
# --------------------------------------------------------------------------------------------------------------------


def _lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` per selected expert: ``B [S, out, r] @ A [S, r, in] -> [S, out, in]`` (stored layout)."""
    return torch.bmm(lora_b, lora_a) * scaling


def _merge_slices(base: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """Base slices with the repair added in the repair's precision, rounded once to the base dtype."""
    if delta is None:
        return base
    if delta.device != base.device:
        delta = delta.to(base.device)
    return (base.to(delta.dtype) + delta).to(base.dtype)


class ExpertRepairs(nn.Module):
    """Trainable repairs of some experts of one fused experts module (the PEFT-style layer).

    ``delta`` mode holds one tensor per fused parameter with the selected experts' slices, initialised at zero.
    ``lora`` mode holds ``lora_A [S, r, d_in]`` (random) and ``lora_B [S, d_out, r]`` (zero) per weight matrix in the
    stored layout (``d_out, d_in`` = the parameter's last two dimensions), scaled by ``alpha / r``; biases are not
    tuned in LoRA mode.
    """

    def __init__(self, experts: nn.Module, selected: list[int], mode: str, rank: int = 8, alpha: float = 16.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in REPAIR_MODES:
            raise ValueError(f"mode={mode!r}; expected one of {REPAIR_MODES}")
        self.mode, self.rank, self.alpha, self.scaling = mode, rank, alpha, alpha / rank
        self.enabled, self.merged = True, False
        self._unmerged: dict[str, torch.Tensor] = {}
        device = next(experts.parameters()).device
        # on the experts' device: the forward compares it with routing indices there (searchsorted, isin)
        self.register_buffer("selected", torch.tensor(sorted(selected), dtype=torch.long, device=device))
        self._selected_host = (self._selected_key(), np.array(sorted(selected), dtype=np.int64))
        self.names = [n for n, p in experts.named_parameters(recurse=False) if _full_shape(p)[0] == _num_experts(experts)]
        for name in self.names:
            shape = (len(selected), *_full_shape(getattr(experts, name))[1:])
            if mode == "delta":
                self.register_parameter(f"delta_{name}", nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
            elif len(shape) == 3:
                a = torch.empty(len(selected), rank, shape[2], dtype=dtype, device=device)
                for i in range(len(selected)):
                    nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))  # PEFT's default LoRA A init
                self.register_parameter(f"lora_A_{name}", nn.Parameter(a))
                self.register_parameter(f"lora_B_{name}", nn.Parameter(torch.zeros(len(selected), shape[1], rank, dtype=dtype, device=device)))

    @property
    def active(self) -> bool:
        """Whether the forward applies the repairs (enabled and not already merged into the base weights)."""
        return self.enabled and not self.merged

    def _selected_key(self) -> tuple:
        return self.selected.device, self.selected.data_ptr(), self.selected._version

    def selected_on_host(self) -> np.ndarray:
        """``selected`` as a host array, read from the device only when the buffer moved or was loaded since."""
        key = self._selected_key()
        if self._selected_host[0] != key:
            self._selected_host = (key, self.selected.cpu().numpy())
        return self._selected_host[1]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(lora_A, lora_B)`` of parameter ``name`` in LoRA mode, else None."""
        if self.mode != "lora" or not hasattr(self, f"lora_B_{name}"):
            return None
        return getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")

    def delta(self, name: str) -> torch.Tensor | None:
        """The additive change of the selected experts' slices of parameter ``name`` (``[S, ...]``), or None."""
        if self.mode == "delta":
            return getattr(self, f"delta_{name}")
        factors = self.factors(name)
        return None if factors is None else _lora_delta(*factors, self.scaling)

    def effective(self, experts: nn.Module, name: str) -> torch.Tensor:
        """The selected experts' slices of ``name`` with the repair applied, in the base parameter's dtype."""
        return _merge_slices(getattr(experts, name)[self.selected], self.delta(name))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, experts={self.selected.tolist()}, rank={self.rank if self.mode == 'lora' else None}"


def _num_experts(experts: nn.Module) -> int:
    return int(_full_shape(experts.down_proj)[0])


# --------------------------------------------------------------------------------------------------------------------
# The experts function
# --------------------------------------------------------------------------------------------------------------------


def _original_forward(experts: nn.Module):
    # The decorator wraps the class's own (eager) forward with functools.wraps, which keeps it as __wrapped__.
    return type(experts).forward.__wrapped__


def _base_name(experts: nn.Module) -> str:
    return getattr(experts, "_rasa_base_implementation", "eager")


def _base_forward(experts: nn.Module):
    name = _base_name(experts)
    return _original_forward(experts) if name == "eager" else ALL_EXPERTS_FUNCTIONS[name]


class _ExpertsView:
    """An experts module seen with other expert weights: the kernels read ``self.<param>`` and ``self.num_experts``,
    so handing them this view runs the module's own kernel on the selected experts' repaired slices alone."""

    def __init__(self, experts: nn.Module, weights: dict[str, torch.Tensor], num_experts: int):
        self.__dict__.update(weights)
        self.__dict__["_experts"] = experts
        self.__dict__["num_experts"] = num_experts

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_experts"], name)


def _kernel_outputs(experts, kernel, x: torch.Tensor, experts_of_rows: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Unweighted outputs ``[n, H]`` of one assignment per row, computed by ``kernel``: a top-k of 1 with weight 1,
    so the kernel's own weighting and reduction return each row's expert output unchanged. The routing weights are
    applied afterwards, in the same dtype promotion as inside the kernel."""
    return kernel(experts, x, experts_of_rows[:, None], unit[:, None])


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [n, in]`` (sorted by group) times ``weight [G, in, out]``, group ``g`` taking rows up to ``offsets[g]``."""
    mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return mm(x.to(weight.dtype), weight, offs=offsets)


def _lora_project(experts: nn.Module, repairs: ExpertRepairs, name: str, x: torch.Tensor, offsets: torch.Tensor,
                  position: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """``x @ (W_e + scaling B_j A_j)`` for every row (rows sorted by expert ``e``, the ``position``-th selected), as
    the base product plus two skinny products (never ``B @ A``): the base products as one grouped GEMM over the fused
    parameter (unselected experts are empty groups, so nothing is gathered or copied), the skinny products by
    :class:`_LoraUpdate`."""
    weight = getattr(experts, name)
    a, b = repairs.factors(name)
    base = _grouped_mm(x, weight if experts.is_transposed else weight.transpose(-2, -1), offsets)
    # the products' precision: the factors' (fp32), or the autocast dtype under mixed precision, as a matmul has it
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
    update = _LoraUpdate.apply(x, a, b, position, experts.is_transposed, dtype)
    out = base + (update * repairs.scaling).to(base.dtype)
    bias = getattr(experts, f"{name}_bias", None)
    return out if bias is None else out + bias[expert_of_row]


def _side_by_side(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All selected experts' factors side by side: ``first [d_in, S r]`` (block ``j`` maps the input to expert ``j``'s
    rank space) and ``second [S r, d_out]``. Stored layout ``[out, in]``: A ``[S, r, in]``, B ``[S, out, r]``;
    transposed ``[in, out]``: B ``[S, in, r]`` comes first, A ``[S, r, out]`` second."""
    num, rank = a.shape[0], a.shape[1]
    if transposed:
        return b.permute(1, 0, 2).reshape(b.shape[1], num * rank), a.reshape(num * rank, a.shape[2])
    return a.reshape(num * rank, a.shape[2]).T, b.transpose(1, 2).reshape(num * rank, b.shape[1])


def _own_blocks(values: torch.Tensor, position: torch.Tensor, num: int, rank: int) -> torch.Tensor:
    """``[n, S r]`` zeros with each row's ``[n, r]`` ``values`` in its own expert's block."""
    wide = values.new_zeros(values.shape[0], num, rank)
    wide[torch.arange(values.shape[0], device=values.device), position] = values
    return wide.view(values.shape[0], num * rank)


class _LoraUpdate(torch.autograd.Function):
    """``(x F1_j) F2_j`` for each row ``x`` and its selected expert ``j = position``, every expert of the layer in two
    GEMMs: ``x @ first`` gives all experts' rank-space products (each row keeps its own block), and the row's block
    spread into zeros ``[n, S r]`` times ``second`` is its own expert's update plus exact zeros. Nothing is read on the
    host. Autograd keeps what the per-expert products kept: with trainable factors the input and the ``[n, r]``
    products in the products' precision (and, under autocast, the factors' 16-bit copies); with frozen factors
    nothing but the factors themselves. The wide ``[n, S r]`` buffers are rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, a, b, position, transposed: bool, dtype: torch.dtype):
        num, rank = a.shape[0], a.shape[1]
        trains = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        with torch.autocast(x.device.type, enabled=False):
            fa, fb = a.to(dtype), b.to(dtype)
            first, second = _side_by_side(fa, fb, transposed)
            xc = x.to(dtype)
            rows = torch.arange(x.shape[0], device=x.device)
            own = (xc @ first).view(-1, num, rank)[rows, position]
            update = _own_blocks(own, position, num, rank) @ second
        if trains:
            ctx.save_for_backward(xc, fa, fb, position, own)
        else:  # only the input's gradient: the factors suffice (cast again in backward)
            ctx.save_for_backward(None, a, b, position, None)
        ctx.transposed, ctx.dtype, ctx.x_dtype, ctx.factor_dtype = transposed, dtype, x.dtype, a.dtype
        return update

    @staticmethod
    def backward(ctx, grad):
        xc, fa, fb, position, own = ctx.saved_tensors
        num, rank = fa.shape[0], fa.shape[1]
        grad_x = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            first, second = _side_by_side(fa.to(ctx.dtype), fb.to(ctx.dtype), ctx.transposed)
            grad = grad.to(ctx.dtype)
            rows = torch.arange(grad.shape[0], device=grad.device)
            grad_own = _own_blocks((grad @ second.T).view(-1, num, rank)[rows, position], position, num, rank)
            if ctx.needs_input_grad[0]:
                grad_x = (grad_own @ first.T).to(ctx.x_dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                grad_first = xc.T @ grad_own  # [in, S r]
                grad_second = _own_blocks(own, position, num, rank).T @ grad  # [S r, out]
                if ctx.transposed:
                    grad_b = grad_first.reshape(-1, num, rank).permute(1, 0, 2)
                    grad_a = grad_second.reshape(num, rank, -1)
                else:
                    grad_a = grad_first.T.reshape(num, rank, -1)
                    grad_b = grad_second.reshape(num, rank, -1).transpose(1, 2)
                grad_a, grad_b = grad_a.to(ctx.factor_dtype), grad_b.to(ctx.factor_dtype)
        return grad_x, grad_a, grad_b, None, None, None


def _merged_view(experts: nn.Module, repairs: ExpertRepairs) -> _ExpertsView:
    weights = {}
    for name in repairs.names:
        weights[name] = getattr(experts, name).index_put((repairs.selected,), repairs.effective(experts, name))
    return _ExpertsView(experts, weights, _num_experts(experts))


def _selected_outputs(experts: nn.Module, repairs: ExpertRepairs, x: torch.Tensor, position: torch.Tensor,
                      unit: torch.Tensor) -> torch.Tensor:
    """Unweighted outputs ``[n, H]`` of rows assigned to selected experts (``position``: which selected expert), with
    the repairs applied: the kernel on the merged slices, or (LoRA, recording gradients) two skinny products per
    projection."""
    if repairs.mode == "lora" and torch.is_grad_enabled():
        return _lora_rows(experts, repairs, x, position)
    view = _ExpertsView(experts, {name: repairs.effective(experts, name) for name in repairs.names}, len(repairs.selected))
    return _kernel_outputs(view, _base_forward(experts), x, position, unit)


def _lora_rows(experts: nn.Module, repairs: ExpertRepairs, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The selected experts' MLPs with their LoRA updates on rows ``x``, all experts at once (:func:`_lora_project`)."""
    order = torch.argsort(position, stable=True)
    x, position = x[order], position[order]
    expert_of_row = repairs.selected[position]
    # group ends over all experts of the fused tensors (unselected experts: empty groups), from the sorted rows
    every = torch.arange(_num_experts(experts), device=position.device, dtype=expert_of_row.dtype)
    offsets = torch.searchsorted(expert_of_row, every, right=True).to(torch.int32)
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    h = _lora_project(experts, repairs, first, x, offsets, position, expert_of_row)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _lora_project(experts, repairs, "down_proj", h, offsets, position, expert_of_row)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out.to(x.dtype)
    return torch.empty_like(out).index_copy(0, order, out)


class _Split:
    """A layer's (token, slot) assignments in two groups, each in the order the kernel meets them: ``base_slots`` /
    ``base_experts`` (to unselected experts, through the model's kernel) and ``repaired_slots`` / ``positions`` (to
    selected experts, ``positions`` indexing ``repairs.selected``). Slots index ``top_k_index.reshape(-1)``."""

    def __init__(self, base_slots, base_experts, repaired_slots, positions):
        self.base_slots, self.base_experts = base_slots, base_experts
        self.repaired_slots, self.positions = repaired_slots, positions


def _split_assignments(repairs: ExpertRepairs, top_k_index: torch.Tensor, kernel_name: str) -> _Split:
    """The split from the host copy of replayed indices (no wait for the device), else on the device with one host
    read (the number of assignments to selected experts, which sizes the two groups)."""
    num_tokens, top_k = top_k_index.shape
    host = host_indices(top_k_index)
    if host is not None and host.shape == tuple(top_k_index.shape):
        return _split_on_host(repairs, host, kernel_name, top_k_index.device)
    slots = _slot_order(kernel_name, num_tokens, top_k, top_k_index.device)
    slot_experts = top_k_index.reshape(-1)[slots]
    chosen = torch.isin(slot_experts, repairs.selected)
    # a stable sort on the flag keeps each group in ascending slot order, as nonzero() would give it
    order = torch.argsort(chosen.to(torch.int8), stable=True)
    num_base = num_tokens * top_k - int(chosen.sum())
    base, repaired = order[:num_base], order[num_base:]
    positions = torch.searchsorted(repairs.selected, slot_experts[repaired])
    return _Split(slots[base], slot_experts[base], slots[repaired], positions)


def _split_on_host(repairs: ExpertRepairs, host: np.ndarray, kernel_name: str, device: torch.device) -> _Split:
    num_tokens, top_k = host.shape
    slots = np.arange(num_tokens * top_k)
    if kernel_name not in _SLOT_SUM_KERNELS:
        slots = slots.reshape(num_tokens, top_k).T.reshape(-1)
    slot_experts = host.reshape(-1)[slots]
    selected = repairs.selected_on_host()
    chosen = np.isin(slot_experts, selected)
    base, repaired = np.flatnonzero(~chosen), np.flatnonzero(chosen)
    parts = [slots[base], slot_experts[base], slots[repaired], np.searchsorted(selected, slot_experts[repaired])]
    return _Split(*_to_device(parts, device))


def _to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host int64 arrays on ``device`` in one copy (pinned and non-blocking to CUDA: the host does not wait)."""
    joined = torch.from_numpy(np.concatenate(arrays).astype(np.int64, copy=False))
    if device.type == "cuda":
        joined = joined.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        joined = joined.to(device)
    return list(joined.split([len(a) for a in arrays]))


def _slot_order(kernel_name: str, num_tokens: int, top_k: int, device) -> torch.Tensor:
    """For each flattened row, its position in ``top_k_index.reshape(-1)``. Rows are laid out in the order in which
    the kernel meets one expert's assignments, so each expert's GEMM sees the same rows in the same order as in the
    kernel's own call: slot-major for eager (``torch.where`` over a ``[k, N]`` mask), token-major otherwise."""
    flat = torch.arange(num_tokens * top_k, device=device)
    if kernel_name in _SLOT_SUM_KERNELS:
        return flat
    return flat.view(num_tokens, top_k).T.reshape(-1)


def _reduce_slots(weighted: torch.Tensor, top_k_index: torch.Tensor, kernel_name: str, dtype: torch.dtype) -> torch.Tensor:
    """Sum the weighted per-slot outputs ``[N, k, H]`` over slots the way the base kernel sums its assignments."""
    if kernel_name in _SLOT_SUM_KERNELS:
        return weighted.sum(dim=1).to(dtype)  # grouped_mm / batched_mm: reshape + sum (fp32 accumulation)
    # eager: index_add_ into zeros, expert by expert in ascending order, each addend cast to the output dtype first
    order = top_k_index.argsort(dim=1)
    ordered = weighted.to(dtype).gather(1, order[..., None].expand_as(weighted))
    total = torch.zeros_like(ordered[:, 0])
    for slot in range(ordered.shape[1]):
        total = total + ordered[:, slot]
    return total


# A layer whose fused experts take less than this is copied for a forward without gradients whatever the token count:
# one kernel call on the merged weights is the merged model's arithmetic exactly, and such a copy costs little. Every
# published MoE layer is far larger (OLMoE-1B-7B: 0.8 GB in bf16, Qwen3-30B-A3B: 1.2 GB, DeepSeek-V3: 22 GB).
_COPY_FLOOR = 64 * 2**20


def no_grad_working_set(experts: nn.Module, names: list[str], mode: str, num_selected: int, num_tokens: int,
                        top_k: int, elt: int, weight_bytes: int | None = None) -> tuple[str, int]:
    """The path a forward without gradients takes through a repaired experts layer, and the bytes it allocates
    beyond its input and output: ``("merged_copy" | "per_slot", bytes)``.

    Merged copy: the fused weights with the repaired slices written in (``E * P_e``), the selected slices built in
    the repair's precision (base slices, their cast, the repair, the sum; LoRA adds ``B @ A`` and its scaled copy) and
    the kernel's working set for the ``T * k`` assignments (``grouped_mm``: ``T k b (2H + 3I)``). Per slot: the same
    slices and kernel working set, plus two ``[T * k, H]`` buffers in the model dtype (the gathered inputs and the
    per-slot outputs) and the weighted per-slot outputs (in the dtype of their product with the top-k weights, of
    ``weight_bytes`` each). Both compute the merged model: bit for bit in bf16 and on every kernel but the CPU
    ``grouped_mm`` in fp32, ~1e-6 apart there. The copy is taken below ``_COPY_FLOOR`` or when it needs less memory.
    ``elt`` is the element size of the expert weights. Measured on the CPU allocator in ``tests/repairs/test_repairs.py``; the
    memory plan uses the same figures."""
    product = max(elt, weight_bytes or elt)
    down = _full_shape(experts.down_proj)
    hidden, inter = (int(down[2]), int(down[1])) if experts.is_transposed else (int(down[1]), int(down[2]))
    rows = num_tokens * top_k
    kernel = rows * elt * (2 * hidden + 3 * inter)
    largest = max(math.prod(_full_shape(getattr(experts, n))[1:]) for n in names)
    per_slice = elt + 12 + (4 if mode == "lora" else 0)  # base, fp32 cast, fp32 repair (LoRA: B @ A twice), sum
    slices = num_selected * largest * per_slice
    full_copy = sum(math.prod(_full_shape(getattr(experts, n))) for n in names) * elt
    copy, per_slot = full_copy + slices + kernel, rows * hidden * (2 * elt + product) + slices + kernel
    if full_copy >= _COPY_FLOOR and per_slot < copy:
        return "per_slot", per_slot
    return "merged_copy", copy


def _copies_the_layer(experts: nn.Module, repairs: ExpertRepairs, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> bool:
    path, _ = no_grad_working_set(
        experts, repairs.names, repairs.mode, len(repairs.selected), top_k_index.shape[0], top_k_index.shape[1],
        getattr(experts, repairs.names[0]).element_size(), top_k_weights.element_size())
    return path == "merged_copy"


def repaired_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts function: the model's own kernel for assignments to unselected experts, the same kernel on the
    repaired slices for assignments to selected experts, weighted and summed over slots as the kernel does it."""
    kernel = _base_forward(self)
    repairs: ExpertRepairs | None = getattr(self, "rasa_repairs", None)
    if repairs is None or not repairs.active:
        return kernel(self, hidden_states, top_k_index, top_k_weights)
    if not torch.is_grad_enabled() and _copies_the_layer(self, repairs, top_k_index, top_k_weights):
        # inference: the kernel's own call on a copy of the fused weights with the repaired slices written in, which
        # is the merged model's computation by construction (transient: one layer's experts at a time)
        return kernel(_merged_view(self, repairs), hidden_states, top_k_index, top_k_weights)
    # per slot: with gradients, and without when copying a large layer would take more memory than its assignments
    num_tokens, top_k = top_k_index.shape
    split = _split_assignments(repairs, top_k_index, _base_name(self))
    unit = torch.ones(1, dtype=top_k_weights.dtype, device=top_k_weights.device)
    outputs = hidden_states.new_zeros(num_tokens * top_k, hidden_states.shape[-1])
    for slots, ids, selected in ((split.base_slots, split.base_experts, False), (split.repaired_slots, split.positions, True)):
        if not slots.numel():
            continue
        x, ones = hidden_states[slots // top_k], unit.expand(slots.numel())
        values = _selected_outputs(self, repairs, x, ids, ones) if selected else _kernel_outputs(self, kernel, x, ids, ones)
        outputs = outputs.index_put((slots,), values)  # back to token-major positions
    weighted = outputs.view(num_tokens, top_k, -1) * top_k_weights[..., None]  # the kernel's own product
    return _reduce_slots(weighted, top_k_index, _base_name(self), hidden_states.dtype)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, repaired_experts_forward)


# --------------------------------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------------------------------


def attach_repairs(model: nn.Module, selection: dict[int, list[int]], mode: str = "delta", rank: int = 8,
                   alpha: float = 16.0) -> list[nn.Parameter]:
    """Give the selected experts trainable repairs and route the model's experts through them.

    Args:
        model: the MoE model (plain or wrapped).
        selection: MoE layer index (0-based among MoE layers) -> expert indices.
        mode: ``"delta"`` (full-rank) or ``"lora"``.
        rank, alpha: LoRA rank and alpha (scaling ``alpha / rank``).

    Returns the repair parameters (to be given to the optimiser).
    """
    layers = moe_layers(model)
    _check_selection(layers, selection)
    if not any(selection.get(layer.index) for layer in layers):
        raise ValueError("the selection names no experts: there is nothing to repair")
    inner = unwrap_model(model)
    current = inner.config._experts_implementation
    base_impl = current if current not in (None, EXPERTS_IMPLEMENTATION) else "eager"
    params: list[nn.Parameter] = []
    for layer in layers:
        experts = layer.experts
        if getattr(experts, "rasa_repairs", None) is not None:
            raise ValueError(f"MoE layer {layer.index} already has repairs attached; call unload_repairs first")
        chosen = selection.get(layer.index, [])
        if chosen:
            experts.rasa_repairs = ExpertRepairs(experts, chosen, mode, rank, alpha)
            params.extend(experts.rasa_repairs.parameters())
    inner._rasa_base_implementation = base_impl
    inner.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    for layer in layers:  # layers without repairs run their kernel directly through the registered function
        layer.experts._rasa_base_implementation = base_impl
    return params


def _check_selection(layers: list[MoELayer], selection: dict[int, list[int]]) -> None:
    for moe_layer, experts in selection.items():
        if not 0 <= moe_layer < len(layers):
            raise ValueError(f"selection names MoE layer {moe_layer}; the model has MoE layers 0..{len(layers) - 1}")
        bad = [e for e in experts if not 0 <= e < layers[moe_layer].num_experts]
        if bad:
            raise ValueError(
                f"selection names experts {bad} in MoE layer {moe_layer}, which has {layers[moe_layer].num_experts}"
            )
        if len(set(experts)) != len(experts):
            raise ValueError(f"selection repeats experts in MoE layer {moe_layer}: {experts}")


def repair_modules(model: nn.Module) -> list[tuple[MoELayer, ExpertRepairs]]:
    """The attached repairs, with their MoE layers."""
    return [(layer, layer.experts.rasa_repairs) for layer in moe_layers(model) if getattr(layer.experts, "rasa_repairs", None) is not None]


@torch.no_grad()
def merge_repairs(model: nn.Module, keep_original: bool = True) -> None:
    """Write every repair into the fused expert weights in place (PEFT's ``merge``). The forward then skips the
    repairs; :func:`unmerge_repairs` restores the original slices exactly (kept aside unless ``keep_original`` is
    False, which saves their memory when the repairs are about to be unloaded)."""
    for layer, repairs in repair_modules(model):
        if repairs.merged:
            continue
        for name in repairs.names:
            param = getattr(layer.experts, name)
            merged = repairs.effective(layer.experts, name)
            if keep_original:
                repairs._unmerged[name] = param[repairs.selected].clone()
            param[repairs.selected] = merged
        repairs.merged = True


@torch.no_grad()
def unmerge_repairs(model: nn.Module) -> None:
    """Undo :func:`merge_repairs`: the original slices are written back bit for bit and the repairs apply again."""
    for layer, repairs in repair_modules(model):
        if not repairs.merged:
            continue
        if not repairs._unmerged:
            raise ValueError(f"MoE layer {layer.index}: the repairs were merged without keeping the original slices")
        for name, original in repairs._unmerged.items():
            getattr(layer.experts, name)[repairs.selected] = original
        repairs._unmerged.clear()
        repairs.merged = False


@contextlib.contextmanager
def disable_repairs(model: nn.Module) -> Iterator[None]:
    """Run the base experts inside the block (PEFT's ``disable_adapter``); merged repairs are unmerged meanwhile."""
    pairs = repair_modules(model)
    merged = any(repairs.merged for _, repairs in pairs)
    if merged:
        unmerge_repairs(model)
    previous = [repairs.enabled for _, repairs in pairs]
    for _, repairs in pairs:
        repairs.enabled = False
    try:
        yield
    finally:
        for (_, repairs), enabled in zip(pairs, previous):
            repairs.enabled = enabled
        if merged:
            merge_repairs(model)


def unload_repairs(model: nn.Module, merge: bool = True, restore_router_dtype: bool = True) -> nn.Module:
    """Back to a plain transformers model (PEFT's ``merge_and_unload`` / ``unload``).

    Merges the repairs first (``merge=False`` drops unmerged changes), removes them, restores the experts
    implementation the model had, and (``restore_router_dtype``) casts the routers upcast by :func:`upcast_routers`
    back to the dtype they had, with their hooks removed. Returns the model.
    """
    if merge:
        merge_repairs(model, keep_original=False)
    for layer in moe_layers(model):
        experts = layer.experts
        if "rasa_repairs" in experts._modules:
            del experts._modules["rasa_repairs"]
        experts.__dict__.pop("_rasa_base_implementation", None)
    inner = unwrap_model(model)
    base_impl = inner.__dict__.pop("_rasa_base_implementation", None)
    if inner.config._experts_implementation == EXPERTS_IMPLEMENTATION:
        inner.set_experts_implementation(base_impl or "eager")
    if restore_router_dtype:
        restore_routers(model)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every active repair merged into its fused expert tensors and no repair keys,
    without changing the model. Routers keep the dtype they have (fp32 master weights stay fp32).

    Args:
        model: the model with repairs attached (plain or wrapped).
        state: its full, unsharded state dict when the live weights are sharded (FSDP, ZeRO-3: pass
            ``accelerator.get_state_dict(model)``); default ``model.state_dict()``.
    """
    base = unwrap_model(model)
    state = dict(state if state is not None else base.state_dict())
    for key, selected, delta in _repaired_tensors(base, state):
        merged = state[key].clone()
        merged[selected] = _merge_slices(merged[selected], delta)
        state[key] = merged
    return {k: v for k, v in state.items() if ".rasa_repairs." not in k}


def _repaired_tensors(base: nn.Module, state: dict[str, torch.Tensor]):
    """``(state key of a fused expert tensor, selected experts, their repair delta)`` for every active repair that
    changes a tensor (merged repairs are in the weights already; LoRA leaves biases alone)."""
    for layer, repairs in repair_modules(base):
        if repairs.merged:
            continue
        prefix = f"{layer.experts_name}.rasa_repairs."
        selected = state[f"{prefix}selected"].long()
        for name in repairs.names:
            delta = _delta_from_state(state, prefix, name, repairs)
            if delta is not None:
                yield f"{layer.experts_name}.{name}", selected, delta


@contextlib.contextmanager
@torch.no_grad()
def merged_for_saving(model: nn.Module, state: dict[str, torch.Tensor] | None = None):
    """:func:`merged_state_dict` without the copies, for writing a checkpoint: the repairs are written into the fused
    expert tensors of the state dict in place, one expert parameter at a time, and the original slices of the
    selected experts are restored bit-exactly on exit (also when the save raises).

    ``merged_state_dict`` clones every repaired layer's fused tensors at once, on the device of the live weights: a
    global selection touches nearly every layer, so a mid-training save briefly doubled the expert weights (an
    80 GB card running the one-GPU Qwen3-30B-A3B plan would run out of memory at its first ``save_steps``). Here the
    only copies are the selected experts' original slices, kept in host memory; the device holds one parameter's
    selected slices at a time beyond the model. ``state`` as in :func:`merged_state_dict` (its tensors may alias the
    live weights, as ``model.state_dict()``'s do: both are restored).
    """
    base = unwrap_model(model)
    state = dict(state if state is not None else base.state_dict())
    originals: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (tensor, selected, original slices)
    try:
        for key, selected, delta in _repaired_tensors(base, state):
            fused = state[key]
            selected_here = selected.to(fused.device)
            slices = fused[selected_here]  # a copy (advanced indexing): the original slices
            originals.append((fused, selected_here, slices.to("cpu")))
            fused[selected_here] = _merge_slices(slices, delta)
            del slices
        yield {k: v for k, v in state.items() if ".rasa_repairs." not in k}
    finally:
        for fused, selected_here, slices in reversed(originals):
            fused[selected_here] = slices.to(fused.device)


def _delta_from_state(state: dict[str, torch.Tensor], prefix: str, name: str, repairs: ExpertRepairs):
    if repairs.mode == "delta":
        return state[f"{prefix}delta_{name}"]
    if f"{prefix}lora_B_{name}" not in state:
        return None
    return _lora_delta(state[f"{prefix}lora_A_{name}"], state[f"{prefix}lora_B_{name}"], repairs.scaling)


# --------------------------------------------------------------------------------------------------------------------
# Routers as fp32 master weights
# --------------------------------------------------------------------------------------------------------------------


def upcast_routers(model: nn.Module) -> list[nn.Parameter]:
    """Make every router's parameters fp32 master weights (an update of 1e-6 vanishes in bf16) and return those the
    router phase trains (the ones its outputs have a gradient through, :attr:`MoELayer.router_trainable`).

    The routers then compute in fp32 (their input is cast up) and hand the experts their top-k weights in the dtype
    of their input, so the rest of the model runs unchanged. :func:`restore_routers` undoes it.
    """
    params = []
    for layer in moe_layers(model):
        router = layer.router
        if any(not p.is_floating_point() or type(p).__name__ in ("Params4bit", "Int8Params") for p in router.parameters()):
            raise ValueError(
                f"the router {layer.router_name} is quantized ({type(router).__name__}); RASA trains routers, so keep "
                f"them in full precision, e.g. BitsAndBytesConfig(llm_int8_skip_modules=[\"{layer.router_name.rsplit('.', 1)[-1]}\", "
                f"\"lm_head\"])"
            )
        if not hasattr(router, "_rasa_router_hooks"):
            # fp32 routers get the hooks too: under bf16 autocast (a model loaded in fp32, trained with bf16=True)
            # their matmul would otherwise run in bf16
            router._rasa_original_dtype = next(p.dtype for p in router.parameters())
            router.float()
            router._rasa_router_hooks = (
                router.register_forward_pre_hook(_cast_input_fp32),
                router.register_forward_hook(_cast_weights_back, always_call=True),
            )
        # only what the router's outputs differentiate: a frozen selection-only bias gets no gradient, stays frozen
        params.extend(p for name, p in router.named_parameters() if name in layer.router_trainable)
    return params


def restore_routers(model: nn.Module) -> None:
    """Undo :func:`upcast_routers`: remove the casting hooks and cast the routers back to the dtype they had."""
    for layer in moe_layers(model):
        router = layer.router
        hooks = router.__dict__.pop("_rasa_router_hooks", None)
        if hooks is None:
            continue
        for hook in hooks:
            hook.remove()
        router.to(router.__dict__.pop("_rasa_original_dtype"))
        router.__dict__.pop("_rasa_input_dtype", None)
        router.__dict__.pop("_rasa_autocast", None)


def _cast_input_fp32(module, args):
    # autocast (bf16 mixed precision) would run the router's matmul in bf16 despite its fp32 weights: off inside it
    module._rasa_input_dtype = args[0].dtype
    module._rasa_autocast = torch.autocast(args[0].device.type, enabled=False)
    module._rasa_autocast.__enter__()
    return (args[0].float(), *args[1:])


def _cast_weights_back(module, args, output):
    # always called, also when the forward raised, so the autocast state is restored
    module.__dict__.pop("_rasa_autocast").__exit__(None, None, None)
    if output is None:
        return None
    first, weights, indices = output
    return first, weights.to(module._rasa_input_dtype), indices
