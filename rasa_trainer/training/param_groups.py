"""The parameter groups RASA trains: ``experts`` (the repairs of the selected experts), ``routers`` (fp32 master
weights) or ``full`` (plain SFT), each with its learning rate; the regrouping of Trainer's optimiser groups (its decay /
no-decay split) by RASA group; switching the groups a phase does not train off; per-group gradient norms and learning
rates for the logs.

:class:`ParameterGroups` holds no trainer: the trainer hands it the model, the selection and the optimiser class.
The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping

import torch
from torch import nn

from ..moe.discovery import moe_layers
from ..repairs.layer import attach_repairs, upcast_routers

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_OWN_GROUP_KWARGS = {"params", "model", "optimizer_dict"}


def _canonical_name(name: str) -> str:
    """A parameter name without the prefixes DDP, torch.compile and FSDP wrappers add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _with_param_groups(optimizer_cls, regroup: Callable[[list], list]):
    """``optimizer_cls`` whose constructor regroups the parameter groups it is given (Trainer's decay / no-decay
    groups) with ``regroup``; everything else, its name and module included, is the class Trainer chose."""

    def __init__(self, params, *args, **kwargs):
        optimizer_cls.__init__(self, regroup(list(params)), *args, **kwargs)

    return type(optimizer_cls.__name__, (optimizer_cls,), {
        "__init__": __init__, "__module__": optimizer_cls.__module__, "__qualname__": optimizer_cls.__qualname__,
        "__doc__": optimizer_cls.__doc__,
    })


def _register_zero3_leaf_modules(model: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3 make every MoE block a leaf module: ranks route tokens to different experts, and
    per-expert parameter fetching would otherwise hang (deepspeedai/DeepSpeed#7461)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    from deepspeed.utils import set_z3_leaf_modules

    modules = dict(model.named_modules())
    blocks = {type(modules[layer.router_name.rpartition(".")[0]]) for layer in moe_layers(model)}
    set_z3_leaf_modules(model, sorted(blocks, key=lambda c: c.__name__))


def learning_rates(expert_learning_rate: float, router_learning_rate: float) -> dict[str, float]:
    """The learning rate of each group (``full``, plain SFT, takes the expert rate)."""
    return {"experts": expert_learning_rate, "routers": router_learning_rate, "full": expert_learning_rate}


def rates_by_group(names: list[str | None], rates: list[float]) -> dict[str | None, float]:
    """The first rate of each group name, from an optimiser's groups' names and a scheduler's last rates."""
    per_group: dict[str | None, float] = {}
    for name, rate in zip(names, rates):
        per_group.setdefault(name, rate)
    return per_group


class ParameterGroups:
    """The trainable groups (name -> parameters, in the order the optimiser lists them) and their learning rates."""

    def __init__(self, rates: dict[str, float], groups: dict[str, list[nn.Parameter]] | None = None):
        self.rates = dict(rates)
        self.groups: dict[str, list[nn.Parameter]] = dict(groups or {})
        self._group_of_name: dict[str, str] = {}  # canonical parameter name -> group
        self._group_of_param: dict[int, str] = {}  # id of a parameter of the optimiser's model -> group

    # ------------------------------------------------------------------------------------------ setting up
    def setup(self, model: nn.Module, schedule: str, experts_by_layer: dict[int, list[int]] | None = None,
              tuning: str = "delta", lora_rank: int = 8, lora_alpha: float = 16.0) -> None:
        """Make the groups ``schedule`` trains, and only those, trainable: the repairs of ``experts_by_layer``
        (attached here), the routers (upcast to fp32 here), or every trainable weight (``full``)."""
        if schedule == "full":
            self.groups["full"] = [p for p in model.parameters() if p.requires_grad]
            self.index(model)
            return
        for p in model.parameters():
            p.requires_grad_(False)
        if schedule in ("alternate", "expert_only"):
            self.groups["experts"] = attach_repairs(model, experts_by_layer, tuning, lora_rank, lora_alpha)
        if schedule in ("alternate", "router_only"):
            self.groups["routers"] = upcast_routers(model)
        _register_zero3_leaf_modules(model)
        for params in self.groups.values():
            for p in params:
                p.requires_grad_(True)
        self.index(model)

    def index(self, model: nn.Module) -> None:
        """Parameter name -> group, so the groups can be found again in a model the engine has prepared."""
        ids = {id(p): name for name, params in self.groups.items() for p in params}
        self._group_of_name = {
            # names as the model the optimiser will get sees them (a PEFT model keeps its base_model prefix)
            _canonical_name(n): ids[id(p)] for n, p in model.named_parameters() if id(p) in ids
        }

    def follow(self, model: nn.Module) -> None:
        """Re-point the groups at the parameters of ``model``, the model the optimiser gets (an engine such as FSDP2
        may have replaced the parameters), by name."""
        group_of = {}
        for name, param in model.named_parameters():
            group = self._group_of_name.get(_canonical_name(name))
            if group is not None:
                group_of[id(param)] = group
        self._group_of_param = group_of
        self.groups = {g: [p for p in model.parameters() if group_of.get(id(p)) == g] for g in self.groups}

    # ------------------------------------------------------------------------------------------ the optimiser
    def optimizer_cls_and_kwargs(self, optimizer_cls, optimizer_kwargs: dict, optim: str = "") -> tuple:
        """The optimiser class and arguments Trainer builds its optimiser from: Trainer's class, whose constructor
        splits each of Trainer's decay / no-decay groups by RASA group with the group's learning rate. ``optim``
        (for the error message) names the optimiser Trainer chose."""
        from transformers.trainer_optimizer import is_optimizer_factory

        optimizer_kwargs = {**optimizer_kwargs,
                            "lr": self.rates["full"] if "full" in self.groups else optimizer_kwargs.get("lr")}
        if optimizer_kwargs["lr"] is None:
            del optimizer_kwargs["lr"]
        builds_own_groups = is_optimizer_factory(optimizer_cls) or _OWN_GROUP_KWARGS & set(optimizer_kwargs)
        if builds_own_groups and "full" not in self.groups:
            raise ValueError(
                f"optim={optim!r} builds its own parameter groups (or takes the whole model), so RASA cannot "
                f"give the expert repairs and the routers their own learning rates. Use an optimiser class: e.g. "
                f"optim='adamw_torch', 'adamw_bnb_8bit', 'paged_adamw_8bit', or optimizer_cls_and_kwargs=(cls, kwargs)."
            )
        cls = optimizer_cls if builds_own_groups else _with_param_groups(optimizer_cls, self.regroup)
        return cls, optimizer_kwargs

    def regroup(self, param_groups: Iterable[dict]) -> list[dict]:
        """Trainer's optimiser groups (weight decay, no weight decay; split per device mesh) split by RASA group, each
        with the group's learning rate and name, in group order (decay before no decay within a group)."""
        order = list(self.groups)
        grouped = []
        for group in param_groups:
            by_rasa: dict[str, list] = {}
            for p in group["params"]:
                if id(p) not in self._group_of_param:
                    raise RuntimeError("a trainable parameter belongs to no RASA group")
                by_rasa.setdefault(self._group_of_param[id(p)], []).append(p)
            grouped.extend({**group, "params": ps, "lr": self.rates[g], "name": g} for g, ps in by_rasa.items())
        return sorted(grouped, key=lambda g: order.index(g["name"]))

    # ------------------------------------------------------------------------------------------ phases
    def activate(self, active: str) -> None:
        """Only the group ``active`` is trainable."""
        for name, params in self.groups.items():
            for p in params:
                p.requires_grad_(name == active)

    def drop_gradients_except(self, active: str) -> None:
        """Drop the gradients of every group but ``active`` before the optimiser step: DDP may hand back zero
        gradients, and ``None`` keeps AdamW from touching the group (no update, no weight decay, no moment drift)."""
        for name, params in self.groups.items():
            if name != active:
                for p in params:
                    p.grad = None

    # ------------------------------------------------------------------------------------------ metrics
    def grad_norm(self, name: str) -> float:
        """The norm of the gradients of group ``name`` (0 without any)."""
        grads = [p.grad for p in self.groups.get(name, []) if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2)
            norm = norm.full_tensor()
        return float(norm)

    def log_grad_norm(self, name: str, metrics: MutableMapping[str, list]) -> None:
        """``grad_norm_<name>`` appended to ``metrics``."""
        metrics[f"grad_norm_{name}"].append(self.grad_norm(name))

    @staticmethod
    def log_learning_rates(names: list[str | None], rates: list[float], metrics: MutableMapping[str, list]
                           ) -> dict[str | None, float]:
        """``learning_rate_<group>`` of every named group set in ``metrics``; returns the rate of each group."""
        per_group = rates_by_group(names, rates)
        for name, rate in per_group.items():
            if name is not None:
                metrics[f"learning_rate_{name}"] = [rate]
        return per_group
