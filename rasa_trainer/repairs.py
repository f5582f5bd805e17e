"""Trainable repairs of selected experts inside fused expert tensors.

transformers 5 stores all routed experts of a layer in one fused parameter, so ``requires_grad`` cannot select
experts. Each selected expert instead gets its own trainable repair: a full-rank ``delta`` of its slices, or LoRA
factors. Gradients and optimiser state are therefore sized by the selected experts, never by whole fused tensors.

The repairs are applied by an experts function registered in transformers' ``ExpertsInterface`` (the library's own
extension point, chosen with ``model.set_experts_implementation``): it runs the model's original experts kernel for
every token with the selected experts' routing weights zeroed, then adds the selected experts' outputs computed with
``W[e] + delta[e]``. That is exact, costs one small matmul per selected expert, and never materialises a copy of the
fused tensor. The implementation name is not serialised, so saved checkpoints never depend on this package.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .moe import MoELayer, _full_shape, moe_layers

EXPERTS_IMPLEMENTATION = "rasa_repairs"
REPAIR_MODES = ("delta", "lora")


class ExpertRepairs(nn.Module):
    """Trainable repairs of some experts of one fused experts module (a PEFT-style layer).

    ``delta`` mode holds one tensor per fused parameter with the selected experts' slices, initialised at zero.
    ``lora`` mode holds ``lora_A [S, r, d_in]`` (random) and ``lora_B [S, d_out, r]`` (zero) per weight matrix in the
    stored layout, scaled by ``alpha / r``; biases are not tuned in LoRA mode.
    """

    def __init__(self, experts: nn.Module, selected: list[int], mode: str, rank: int = 8, alpha: float = 16.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in REPAIR_MODES:
            raise ValueError(f"mode={mode!r}; expected one of {REPAIR_MODES}")
        self.mode, self.rank, self.scaling = mode, rank, alpha / rank
        self.register_buffer("selected", torch.tensor(sorted(selected), dtype=torch.long))
        self.names = [n for n, p in experts.named_parameters(recurse=False) if _full_shape(p)[0] == _num_experts(experts)]
        device = next(experts.parameters()).device
        for name in self.names:
            base_shape = _full_shape(getattr(experts, name))
            shape = (len(selected), *base_shape[1:])
            if mode == "delta":
                self.register_parameter(f"delta_{name}", nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
            elif len(base_shape) == 3:
                a = torch.empty(len(selected), rank, shape[2], dtype=dtype, device=device)
                for i in range(len(selected)):
                    nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))  # PEFT's default LoRA A init
                self.register_parameter(f"lora_A_{name}", nn.Parameter(a))
                self.register_parameter(f"lora_B_{name}", nn.Parameter(torch.zeros(len(selected), shape[1], rank, dtype=dtype, device=device)))

    def delta(self, name: str) -> torch.Tensor | None:
        """The additive change of the selected experts' slices of parameter ``name`` (``[S, ...]``), or None."""
        if self.mode == "delta":
            return getattr(self, f"delta_{name}")
        if not hasattr(self, f"lora_B_{name}"):
            return None
        return torch.bmm(getattr(self, f"lora_B_{name}"), getattr(self, f"lora_A_{name}")) * self.scaling

    def effective(self, experts: nn.Module, name: str) -> torch.Tensor:
        """The selected experts' slices of ``name`` with the repair applied, in the base parameter's dtype."""
        base = getattr(experts, name)[self.selected]
        delta = self.delta(name)
        if delta is None:
            return base
        return (base.to(delta.dtype) + delta).to(base.dtype)

    @torch.no_grad()
    def merge_into(self, experts: nn.Module) -> None:
        """Write the repairs into the fused parameters (then zero the repair so it is not applied twice)."""
        for name in self.names:
            delta = self.delta(name)
            if delta is not None:
                param = getattr(experts, name)
                param[self.selected] = (param[self.selected].to(delta.dtype) + delta).to(param.dtype)
        for p in self.parameters():
            if p.dim() == 3 and (self.mode == "delta" or "lora_B" in _param_name(self, p)):
                p.zero_()


def _param_name(module: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in module.named_parameters() if p is param)


def _num_experts(experts: nn.Module) -> int:
    return int(_full_shape(experts.down_proj)[0])


def _original_forward(experts: nn.Module):
    # The decorator wraps the class's own (eager) forward with functools.wraps, which keeps it as __wrapped__.
    return type(experts).forward.__wrapped__


def _base_forward(experts: nn.Module):
    name = getattr(experts, "_rasa_base_implementation", "eager")
    if name == "eager":
        return _original_forward(experts)
    return ALL_EXPERTS_FUNCTIONS[name]


def _expert_mlp(experts: nn.Module, x: torch.Tensor, weights: dict[str, torch.Tensor], j: int) -> torch.Tensor:
    """One expert's MLP on tokens ``x`` with the given per-expert weights (stored layout)."""
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    linear = (lambda h, w: h @ w) if experts.is_transposed else (lambda h, w: h @ w.T)  # noqa: E731
    h = linear(x, weights[first][j])
    if f"{first}_bias" in weights:
        h = h + weights[f"{first}_bias"][j]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = linear(h, weights["down_proj"][j])
    if "down_proj_bias" in weights:
        out = out + weights["down_proj_bias"][j]
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def repaired_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts function: the original kernel for all tokens, with the selected experts' outputs recomputed with
    their repaired weights.

    The (token, slot) assignments that reach a selected expert are gathered once, grouped by expert, run through
    their expert's repaired MLP, and added back with a single ``index_add``: one gather and one scatter of
    ``[assignments, H]`` per layer instead of one full ``[N, H]`` copy per selected expert, and no per-expert
    full-size gradient buffers in backward.
    """
    base = _base_forward(self)
    repairs: ExpertRepairs | None = getattr(self, "rasa_repairs", None)
    if repairs is None or not getattr(self, "_rasa_repairs_enabled", True):
        return base(self, hidden_states, top_k_index, top_k_weights)
    selected = repairs.selected
    is_selected = torch.isin(top_k_index, selected)
    out = base(self, hidden_states, top_k_index, top_k_weights.masked_fill(is_selected, 0))
    token, slot = torch.nonzero(is_selected, as_tuple=True)
    if token.numel() == 0:
        return out
    position = torch.searchsorted(selected, top_k_index[token, slot])  # which selected expert (selected is sorted)
    order = torch.argsort(position, stable=True)
    token, slot = token[order], slot[order]
    counts = torch.bincount(position[order], minlength=len(selected)).tolist()
    # split / unbind rather than slicing per expert: their backward builds one gradient tensor (a cat / stack),
    # where per-expert slices would each allocate and zero-fill a gradient of the whole tensor
    inputs = hidden_states[token].split(counts)
    weights = {name: repairs.effective(self, name).unbind(0) for name in repairs.names}
    outputs = [_expert_mlp(self, inputs[j], weights, j) for j, count in enumerate(counts) if count]
    expert_out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.index_add(0, token, (expert_out * top_k_weights[token, slot, None]).to(out.dtype))


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, repaired_experts_forward)


def attach_repairs(model: nn.Module, selection: dict[int, list[int]], mode: str = "delta", rank: int = 8,
                   alpha: float = 16.0) -> list[nn.Parameter]:
    """Give the selected experts trainable repairs and route the model's experts through them.

    Args:
        model: the MoE model (plain or wrapped).
        selection: MoE layer index (0-based among MoE layers) -> expert indices.
        mode: ``"delta"`` (full-rank) or ``"lora"``.

    Returns the repair parameters (to be given to the optimiser).
    """
    layers = moe_layers(model)
    _check_selection(layers, selection)
    inner = _config_owner(model)
    current = inner.config._experts_implementation
    base_impl = current if current not in (None, EXPERTS_IMPLEMENTATION) else "eager"
    params: list[nn.Parameter] = []
    for layer in layers:
        experts = layer.experts
        if getattr(experts, "rasa_repairs", None) is not None:
            raise ValueError(f"MoE layer {layer.index} already has repairs attached; call detach_repairs first")
        experts._rasa_base_implementation = getattr(experts, "_rasa_base_implementation", base_impl)
        chosen = selection.get(layer.index, [])
        if chosen:
            experts.rasa_repairs = ExpertRepairs(experts, chosen, mode, rank, alpha)
            params.extend(experts.rasa_repairs.parameters())
    inner.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return params


def _config_owner(model: nn.Module) -> nn.Module:
    from .moe import unwrap_model

    return unwrap_model(model)


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


def set_repairs_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the repairs on or off without removing them (off = the base experts)."""
    for layer in moe_layers(model):
        layer.experts._rasa_repairs_enabled = enabled


def merge_repairs(model: nn.Module) -> None:
    """Merge every repair into the fused expert weights and remove the repairs; restores the experts kernel."""
    for layer, repairs in repair_modules(model):
        repairs.merge_into(layer.experts)
    detach_repairs(model)


def detach_repairs(model: nn.Module) -> None:
    """Remove the repairs (unmerged changes are dropped) and restore the original experts kernel."""
    base_impl = None
    for layer in moe_layers(model):
        experts = layer.experts
        if "rasa_repairs" in experts._modules:
            del experts._modules["rasa_repairs"]
        base_impl = getattr(experts, "_rasa_base_implementation", base_impl)
    inner = _config_owner(model)
    if inner.config._experts_implementation == EXPERTS_IMPLEMENTATION:
        inner.set_experts_implementation(base_impl or "eager")


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None,
                      dtype_of_routers: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with every repair merged into its fused expert tensors and no repair keys, without
    changing the model.

    Args:
        model: the model with repairs attached (plain or wrapped).
        state: its full, unsharded state dict when the live weights are sharded (FSDP, ZeRO-3: pass
            ``accelerator.get_state_dict(model)``); default ``model.state_dict()``.
        dtype_of_routers: cast routers to this dtype (they train as fp32 master weights).
    """
    from .moe import unwrap_model

    base = unwrap_model(model)
    state = dict(state if state is not None else base.state_dict())
    for layer, repairs in repair_modules(base):
        prefix = f"{layer.experts_name}.rasa_repairs."
        selected = state[f"{prefix}selected"].long()
        for name in repairs.names:
            delta = _delta_from_state(state, prefix, name, repairs)
            if delta is None:
                continue
            key = f"{layer.experts_name}.{name}"
            merged = state[key].clone()
            merged[selected] = (merged[selected].to(delta.dtype) + delta.to(merged.device)).to(merged.dtype)
            state[key] = merged
    state = {k: v for k, v in state.items() if ".rasa_repairs." not in k}
    if dtype_of_routers is not None:
        for layer in moe_layers(base):
            for name, _ in layer.router.named_parameters():
                key = f"{layer.router_name}.{name}"
                state[key] = state[key].to(dtype_of_routers)
    return state


def _delta_from_state(state: dict[str, torch.Tensor], prefix: str, name: str, repairs: ExpertRepairs):
    if repairs.mode == "delta":
        return state[f"{prefix}delta_{name}"]
    if f"{prefix}lora_B_{name}" not in state:
        return None
    return torch.bmm(state[f"{prefix}lora_B_{name}"], state[f"{prefix}lora_A_{name}"]) * repairs.scaling
