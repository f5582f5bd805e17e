"""LoRA repairs as a standard PEFT adapter: written beside the merged checkpoint, loadable with
``peft.PeftModel.from_pretrained(base_model, path)``, and loadable back into RASA repairs.

PEFT (0.21) adapts a fused 3-D expert parameter ``[E, d1, d2]`` with ``target_parameters``: one ``lora_A [r*E, in]``
and one ``lora_B [out, r*E]`` for all experts, where expert ``e`` owns the A rows ``e*r .. e*r+r-1`` and the
*interleaved* B columns ``k*E + e`` (B reshaped ``(out, r, E)``). PEFT cannot restrict an adapter to some experts,
so the nearest exact equivalent is written: the selected experts' factors in their places and zeros for every other
expert, whose update ``B_e @ A_e`` is then exactly zero. Only the MoE layers that hold selected experts are targeted
(by full parameter path). Trained routers travel as ``modules_to_save``.

The key names and shapes are not hard-coded: they are read off a PEFT model built on a meta-device copy of the
model, so they follow the installed PEFT's layout (nesting of wrappers when two parameters of one module are
targeted, prefixes), and the written file is checked against them.

An adapter carries its identity: ``rasa_adapter.json`` records the model type, the hidden size and every MoE layer's
experts and expert-parameter shapes beside the selection, rank and alpha. :func:`load_rasa_adapter` loads nothing
until the adapter agrees with the model it is loaded onto (type, MoE layers, experts, shapes) and with itself (the
rank read from the tensors' shapes, ``rasa_adapter.json`` and PEFT's ``adapter_config.json`` on rank, alpha, targets
and routers; the experts whose factors are non-zero are exactly the selection); any difference is an error naming it.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn

from ..moe.discovery import MoELayer, _full_shape, moe_layers, unwrap_model
from .layer import ExpertRepairs, attach_repairs, repair_modules, upcast_routers
from ..utils import atomic_save_safetensors, atomic_write_json

__all__ = ["load_rasa_adapter", "save_peft_adapter"]

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RASA_ADAPTER_INFO = "rasa_adapter.json"  # model identity, selection and LoRA settings, for loading back into RASA
INFO_FORMAT = 2  # 1 (no field): selection, rank, alpha, routers only; 2: with the model's identity
_PEFT_PREFIX = "base_model.model."


@dataclass
class _Target:
    """One PEFT-targeted expert parameter: its MoE layer, parameter name and adapter key prefix."""

    layer: MoELayer
    name: str
    key: str  # e.g. "base_model.model.model.layers.0.mlp.experts.base_layer" (+ ".lora_A.weight")


def _lora_config(model: nn.Module, selection: dict[int, list[int]], rank: int, alpha: float, routers: bool):
    from peft import LoraConfig

    layers = moe_layers(model)
    targets = sorted(
        f"{layers[i].experts_name}.{name}" for i in selection for name in _lora_parameter_names(layers[i].experts)
    )
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=[], target_parameters=targets, lora_dropout=0.0, bias="none",
        modules_to_save=[layer.router_name for layer in layers] if routers else None,
        base_model_name_or_path=getattr(unwrap_model(model).config, "_name_or_path", None) or None,
        task_type="CAUSAL_LM",
    )


def _lora_parameter_names(experts: nn.Module) -> list[str]:
    num = int(_full_shape(experts.down_proj)[0])
    return [n for n, p in experts.named_parameters(recurse=False) if len(_full_shape(p)) == 3 and _full_shape(p)[0] == num]


def _peft_layout(model: nn.Module, config) -> tuple[list[_Target], dict[str, tuple[int, ...]]]:
    """The adapter's targets and every key PEFT saves with its shape, read off a PEFT model on a meta-device copy."""
    import copy

    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = unwrap_model(model)
    model_config = copy.deepcopy(base.config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    with warnings.catch_warnings():  # PEFT calls transformers' deprecated is_gradient_checkpointing on the skeleton
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(skeleton, copy.deepcopy(config))
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    by_experts = {layer.experts_name: layer for layer in moe_layers(base)}
    targets = []
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "parameter_name") or not hasattr(module, "lora_A"):
            continue
        experts_name = module_name.removeprefix(_PEFT_PREFIX)
        while experts_name.endswith(".base_layer"):
            experts_name = experts_name.removesuffix(".base_layer")
        targets.append(_Target(by_experts[experts_name], module.parameter_name, module_name))
    return targets, shapes


def _peft_orientation(repairs: ExpertRepairs, name: str, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Our factors of ``name`` as PEFT's per-expert ``(A_e [S, r, in], B_e [S, out, r])``.

    Ours: delta = B @ A in the stored layout. PEFT: for ``[E, out, in]`` storage (swapped in/out) delta_e = B_e A_e
    as ours; for transposed ``[E, in, out]`` storage delta_e = (B_e A_e)^T, so A_e = B^T and B_e = A^T.
    """
    a, b = repairs.factors(name)
    if transposed:
        return b.transpose(1, 2), a.transpose(1, 2)
    return a, b


def save_peft_adapter(model: nn.Module, folder: str | os.PathLike, state: dict[str, torch.Tensor] | None = None,
                      routers: bool = True, repairs: list[tuple[MoELayer, ExpertRepairs]] | None = None) -> None:
    """Write the LoRA repairs (and the routers, when ``routers``) of ``model`` as a PEFT adapter in ``folder``.

    ``state`` is the model's full state dict when the live weights are sharded (FSDP, ZeRO-3); by default the live
    parameters are read. ``repairs`` are the (layer, repairs) pairs to export when they are no longer attached (the
    trainer merges and unloads them after training); default: the attached ones. Raises ``ValueError`` unless every
    repair is in LoRA mode.
    """
    pairs = repairs if repairs is not None else repair_modules(model)
    if not pairs or any(r.mode != "lora" for _, r in pairs):
        raise ValueError("a PEFT adapter can only be written for LoRA repairs (expert_tuning='lora')")
    first = pairs[0][1]
    selection = {layer.index: _selected_experts(r) for layer, r in pairs}
    config = _lora_config(model, selection, first.rank, first.alpha, routers)
    targets, shapes = _peft_layout(model, config)
    by_layer = {layer.index: layer_repairs for layer, layer_repairs in pairs}
    tensors = {}
    for target in targets:
        a_full, b_full = _full_factors(target, by_layer[target.layer.index], state, shapes)
        tensors[f"{target.key}.lora_A.weight"], tensors[f"{target.key}.lora_B.weight"] = a_full, b_full
    if routers:
        tensors.update(_router_tensors(model, state))
    if set(tensors) != set(shapes):
        raise RuntimeError(
            f"the adapter keys do not match what the installed PEFT expects: missing {sorted(set(shapes) - set(tensors))[:3]}, "
            f"unexpected {sorted(set(tensors) - set(shapes))[:3]}"
        )
    os.makedirs(folder, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(_jsonable(config.to_dict()), os.path.join(folder, ADAPTER_CONFIG))
    atomic_write_json(
        {"format": INFO_FORMAT, **_model_identity(model), "selection": {str(k): v for k, v in selection.items()},
         "rank": first.rank, "alpha": first.alpha, "routers": routers},
        os.path.join(folder, RASA_ADAPTER_INFO),
    )


def _model_identity(model: nn.Module) -> dict:
    """What an adapter must agree with in the model it is loaded onto: the model type, the hidden size and, per MoE
    layer, the number of routed experts and the shapes of the fused expert parameters."""
    config = unwrap_model(model).config
    return {
        "model_type": config.model_type,
        "hidden_size": getattr(config.get_text_config(), "hidden_size", None),
        "moe_layers": [
            {"num_experts": layer.num_experts,
             "shapes": {name: list(_full_shape(getattr(layer.experts, name)))
                        for name in _lora_parameter_names(layer.experts)}}
            for layer in moe_layers(model)
        ],
    }


def _selected_experts(repairs: ExpertRepairs) -> list[int]:
    return [int(e) for e in repairs.selected.tolist()]


def _full_factors(target: _Target, repairs: ExpertRepairs, state, shapes) -> tuple[torch.Tensor, torch.Tensor]:
    experts, rank = target.layer.experts, repairs.rank
    num = int(_full_shape(experts.down_proj)[0])
    a_sel, b_sel = _peft_orientation(_with_state(repairs, target, state), target.name, bool(experts.is_transposed))
    a_full = torch.zeros(shapes[f"{target.key}.lora_A.weight"], dtype=a_sel.dtype)
    b_full = torch.zeros(shapes[f"{target.key}.lora_B.weight"], dtype=b_sel.dtype)
    for j, e in enumerate(_selected_experts(repairs)):
        a_full[e * rank : (e + 1) * rank] = a_sel[j].detach().cpu()
        b_full[:, torch.arange(rank) * num + e] = b_sel[j].detach().cpu()  # PEFT interleaves B's expert columns
    return a_full, b_full


class _StateRepairs:
    """Factors read from a (gathered) state dict instead of the live module."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str):
        self.state, self.prefix = state, prefix

    def factors(self, name: str):
        return self.state[f"{self.prefix}lora_A_{name}"], self.state[f"{self.prefix}lora_B_{name}"]


def _with_state(repairs: ExpertRepairs, target: _Target, state):
    return repairs if state is None else _StateRepairs(state, f"{target.layer.experts_name}.rasa_repairs.")


def _router_tensors(model: nn.Module, state) -> dict[str, torch.Tensor]:
    out = {}
    for layer in moe_layers(model):
        for name, value in layer.router.state_dict().items():  # parameters and persistent buffers (selection bias)
            value = value if state is None else state[f"{layer.router_name}.{name}"]
            out[f"{_PEFT_PREFIX}{layer.router_name}.{name}"] = value.detach().cpu()
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, tuple, list)):
        items = [_jsonable(v) for v in value]
        return sorted(items) if isinstance(value, set) else items
    return getattr(value, "value", value)  # enums (peft_type, task_type) as their value


def load_rasa_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Attach the LoRA repairs (and routers) of a RASA PEFT adapter to ``model`` as RASA repairs, for evaluation or
    inspection; :func:`rasa_trainer.repairs.layer.unload_repairs` then gives the merged plain model. Returns the model.

    Nothing is attached unless the adapter matches ``model`` (model type, MoE layers, experts, expert shapes) and
    itself (rank from the tensors' shapes, ``rasa_adapter.json`` and ``adapter_config.json`` on rank, alpha, targets
    and routers; non-zero factors exactly for the selected experts); otherwise ``ValueError`` names every difference."""
    folder = os.fspath(folder)
    info = _read_json(os.path.join(folder, RASA_ADAPTER_INFO))
    peft_config = _read_json(os.path.join(folder, ADAPTER_CONFIG))
    weights_path = os.path.join(folder, ADAPTER_WEIGHTS)
    try:
        tensors = load_file(weights_path)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"cannot read {weights_path} ({err}); the adapter folder is incomplete or corrupt") from err
    try:
        selection = {int(k): sorted(int(e) for e in v) for k, v in info["selection"].items()}
        rank, alpha, routers = int(info["rank"]), float(info["alpha"]), bool(info["routers"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{os.path.join(folder, RASA_ADAPTER_INFO)} lacks or garbles {err}; the adapter folder is "
                         "corrupt") from None
    _refuse(folder, "was written for another model", _model_differences(info, model, selection))
    config = _lora_config(model, selection, rank, alpha, routers)
    targets, shapes = _peft_layout(model, config)
    _refuse(folder, "does not agree with itself", _self_differences(info, peft_config, config, tensors, shapes, targets,
                                                                     selection, rank))
    attach_repairs(model, selection, "lora", rank, alpha)
    with torch.no_grad():
        for target in targets:
            _load_factors(target, tensors, rank)
        if routers:
            upcast_routers(model)
            for layer in moe_layers(model):
                for name, value in layer.router.state_dict().items():
                    value.copy_(tensors[f"{_PEFT_PREFIX}{layer.router_name}.{name}"])
    return model


def _refuse(folder: str, what: str, differences: list[str]) -> None:
    if not differences:
        return
    fix = ("load it onto the base model it was trained from" if "another model" in what else
           "its files were edited or come from different adapters: use the adapter folder as RASATrainer wrote it")
    raise ValueError(f"the RASA adapter {folder} {what}: {'; '.join(differences)}. Nothing was loaded; {fix}")


def _model_differences(info: dict, model: nn.Module, selection: dict[int, list[int]]) -> list[str]:
    """How ``model`` differs from the model the adapter was written for (``rasa_adapter.json``)."""
    current = _model_identity(model)
    layers = current["moe_layers"]
    diffs = []
    if "model_type" not in info:  # an adapter of format 1: only what the tensors show can be checked
        warnings.warn("this RASA adapter predates the model identity in rasa_adapter.json; only its shapes are checked "
                      "against the model", stacklevel=3)
    else:
        if info["model_type"] != current["model_type"]:
            diffs.append(f"model type: adapter {info['model_type']}, model {current['model_type']}")
        if info.get("hidden_size") != current["hidden_size"]:
            diffs.append(f"hidden size: adapter {info.get('hidden_size')}, model {current['hidden_size']}")
        saved = info.get("moe_layers") or []
        if len(saved) != len(layers):
            diffs.append(f"MoE layers: adapter {len(saved)}, model {len(layers)}")
        for index, (old, new) in enumerate(zip(saved, layers)):
            if old.get("num_experts") != new["num_experts"]:
                diffs.append(f"MoE layer {index} experts: adapter {old.get('num_experts')}, model {new['num_experts']}")
            elif old.get("shapes") != new["shapes"]:
                diffs.append(f"MoE layer {index} expert shapes: adapter {old.get('shapes')}, model {new['shapes']}")
    for index, experts in sorted(selection.items()):
        if not 0 <= index < len(layers):
            diffs.append(f"selection names MoE layer {index}; the model has MoE layers 0..{len(layers) - 1}")
        elif any(not 0 <= e < layers[index]["num_experts"] for e in experts):
            diffs.append(f"selection names experts {experts} of MoE layer {index}, which has "
                         f"{layers[index]['num_experts']}")
    return diffs


def _self_differences(info: dict, peft_config: dict, config, tensors: dict[str, torch.Tensor],
                      shapes: dict[str, tuple[int, ...]], targets: list[_Target], selection: dict[int, list[int]],
                      rank: int) -> list[str]:
    """Where the adapter's files disagree: the two JSON files, the tensors' shapes and the selection its factors
    hold."""
    diffs = []
    if peft_config.get("r") != rank:
        diffs.append(f"rank: {RASA_ADAPTER_INFO} {rank}, {ADAPTER_CONFIG} r {peft_config.get('r')}")
    if peft_config.get("lora_alpha") != info["alpha"]:
        diffs.append(f"alpha: {RASA_ADAPTER_INFO} {info['alpha']}, {ADAPTER_CONFIG} lora_alpha "
                     f"{peft_config.get('lora_alpha')}")
    if sorted(peft_config.get("target_parameters") or []) != sorted(config.target_parameters):
        diffs.append(f"targets: {ADAPTER_CONFIG} targets {sorted(peft_config.get('target_parameters') or [])}, the "
                     f"selection in {RASA_ADAPTER_INFO} targets {sorted(config.target_parameters)}")
    if bool(peft_config.get("modules_to_save")) != bool(info["routers"]):
        diffs.append(f"routers: {RASA_ADAPTER_INFO} routers={info['routers']}, {ADAPTER_CONFIG} modules_to_save="
                     f"{peft_config.get('modules_to_save')}")
    for target in targets:  # the rank the tensors have, read off their shapes
        num = int(_full_shape(target.layer.experts.down_proj)[0])
        key_a, key_b = f"{target.key}.lora_A.weight", f"{target.key}.lora_B.weight"
        if key_a not in tensors or key_b not in tensors:
            continue  # named with the other missing keys below
        rows, columns = tensors[key_a].shape[0], tensors[key_b].shape[-1]
        if rows % num or columns % num or rows // num != rank or columns // num != rank:
            diffs.append(f"rank: {RASA_ADAPTER_INFO} {rank}, the tensors of {target.layer.experts_name}.{target.name} "
                         f"{rows / num:g} ({key_a} has {rows} rows for {num} experts)")
            break
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        diffs.append(f"tensors: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                     f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shapes[k]})" for k in sorted(set(shapes) & set(tensors))
             if tuple(tensors[k].shape) != tuple(shapes[k])]
    if wrong:
        diffs.append(f"tensor shapes: {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    if diffs:
        return diffs
    for target in targets:  # the experts whose factors are non-zero are the selection
        num = int(_full_shape(target.layer.experts.down_proj)[0])
        a = tensors[f"{target.key}.lora_A.weight"].reshape(num, rank, -1)
        b = tensors[f"{target.key}.lora_B.weight"].reshape(-1, rank, num)
        held = sorted({int(e) for e in (a != 0).flatten(1).any(1).nonzero().flatten()} |
                      {int(e) for e in (b != 0).permute(2, 0, 1).flatten(1).any(1).nonzero().flatten()})
        named = selection.get(target.layer.index, [])
        if held != named:
            diffs.append(f"selection: {RASA_ADAPTER_INFO} names experts {named} of MoE layer {target.layer.index}, "
                         f"the factors of {target.layer.experts_name}.{target.name} are those of experts {held}")
            break
    return diffs


def _load_factors(target: _Target, tensors: dict[str, torch.Tensor], rank: int) -> None:
    repairs = target.layer.experts.rasa_repairs
    num = int(_full_shape(target.layer.experts.down_proj)[0])
    a_full, b_full = tensors[f"{target.key}.lora_A.weight"], tensors[f"{target.key}.lora_B.weight"]
    a, b = repairs.factors(target.name)
    for j, e in enumerate(_selected_experts(repairs)):
        a_e, b_e = a_full[e * rank : (e + 1) * rank], b_full[:, torch.arange(rank) * num + e]
        if target.layer.experts.is_transposed:
            a_e, b_e = b_e.T, a_e.T  # back from PEFT's orientation (see _peft_orientation)
        a[j].copy_(a_e)
        b[j].copy_(b_e)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a RASA adapter folder (written by RASATrainer in lora mode)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter folder is corrupt") from None
