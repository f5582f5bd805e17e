"""The parameter groups RASA trains and the optimiser over them: the expert repairs and the fp32 routers are made
trainable before the optimiser is built (and before DDP wraps the model), each with its own learning rate inside
Trainer's own optimiser and decay / no-decay split; per-group learning rates and gradient norms are logged.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe.discovery import moe_layers
from .phases import ACTIVE_GROUP
from ..repairs.layer import attach_repairs, upcast_routers

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _canonical_name(name: str) -> str:
    """A parameter name without the prefixes DDP, torch.compile and FSDP wrappers add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _with_param_groups(optimizer_cls, regroup):
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


class ParameterGroupsMixin:
    """RASATrainer's parameter groups (``experts``, ``routers``; ``full`` for plain SFT) and optimiser."""

    def _setup_parameter_groups(self) -> None:
        schedule, model = self.args.rasa_schedule, self.model
        if schedule == "full":
            self._groups["full"] = [p for p in model.parameters() if p.requires_grad]
            self._index_groups()
            return
        for p in model.parameters():
            p.requires_grad_(False)
        self._model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if schedule in ("alternate", "expert_only"):
            self._groups["experts"] = attach_repairs(
                model, self.selection.by_moe_layer(), self.args.expert_tuning, self.args.expert_lora_rank,
                self.args.expert_lora_alpha,
            )
        if schedule in ("alternate", "router_only"):
            self._groups["routers"] = upcast_routers(model)
        _register_zero3_leaf_modules(model)
        for params in self._groups.values():
            for p in params:
                p.requires_grad_(True)
        self._index_groups()

    def _index_groups(self) -> None:
        """Parameter name -> RASA group, so groups can be found again in a model the engine has prepared."""
        ids = {id(p): name for name, params in self._groups.items() for p in params}
        self._group_of_name = {
            # names as the model the optimiser will get sees them (a PEFT model keeps its base_model prefix)
            _canonical_name(n): ids[id(p)] for n, p in self.model.named_parameters() if id(p) in ids
        }

    def _group_learning_rates(self) -> dict[str, float]:
        return {"experts": self.args.expert_learning_rate, "routers": self.args.router_learning_rate,
                "full": self.args.expert_learning_rate}

    def create_optimizer(self, model=None):
        """Trainer's optimiser (``optim``, ``optim_args``, ``optimizer_cls_and_kwargs``, 8-bit and paged optimisers)
        over Trainer's decay / no-decay split (``get_decay_parameter_names``), each of those groups split further by
        RASA group (expert repairs, routers; ``full``: all weights) with the group's learning rate."""
        if self.optimizer is not None:
            return super().create_optimizer(model)
        self._ensure_selection()
        opt_model = self.model if model is None else model
        group_of = {}
        for name, param in opt_model.named_parameters():
            group = self._group_of_name.get(_canonical_name(name))
            if group is not None:
                group_of[id(param)] = group
        # the engine may have replaced the parameters (FSDP2): the groups follow the model the optimiser gets
        self._groups = {g: [p for p in opt_model.parameters() if group_of.get(id(p)) == g] for g in self._groups}
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        lrs = self._group_learning_rates()
        optimizer_kwargs = {**optimizer_kwargs, "lr": lrs["full"] if "full" in self._groups else optimizer_kwargs.get("lr")}
        if optimizer_kwargs["lr"] is None:
            del optimizer_kwargs["lr"]
        from transformers.trainer_optimizer import is_optimizer_factory

        builds_own_groups = is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if builds_own_groups and "full" not in self._groups:
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups (or takes the whole model), so RASA cannot "
                f"give the expert repairs and the routers their own learning rates. Use an optimiser class: e.g. "
                f"optim='adamw_torch', 'adamw_bnb_8bit', 'paged_adamw_8bit', or optimizer_cls_and_kwargs=(cls, kwargs)."
            )
        order = list(self._groups)

        def regroup(param_groups):
            grouped = []
            for group in param_groups:  # Trainer's groups: weight decay, no weight decay (split per device mesh)
                by_rasa = {}
                for p in group["params"]:
                    if id(p) not in group_of:
                        raise RuntimeError("a trainable parameter belongs to no RASA group")
                    by_rasa.setdefault(group_of[id(p)], []).append(p)
                grouped.extend({**group, "params": ps, "lr": lrs[g], "name": g} for g, ps in by_rasa.items())
            return sorted(grouped, key=lambda g: order.index(g["name"]))  # stable: decay before no decay

        cls = optimizer_cls if builds_own_groups else _with_param_groups(optimizer_cls, regroup)
        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (cls, optimizer_kwargs)
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = saved

    def _get_learning_rate(self) -> float:
        """The learning rate of the group the current phase trains (Trainer logs it as ``learning_rate``); every
        group's rate is logged as ``learning_rate_<group>``."""
        value = super()._get_learning_rate()
        try:
            rates = [float(r) for r in self.lr_scheduler.get_last_lr()]
            names = [g.get("name") for g in self.optimizer.param_groups]
        except Exception:  # schedulers without per-group rates (DeepSpeed warm-up): keep Trainer's value
            return value
        if len(rates) != len(names):
            return value
        per_group = {}
        for name, rate in zip(names, rates):
            per_group.setdefault(name, rate)
        for name, rate in per_group.items():
            if name is not None:
                self._metrics["train"][f"learning_rate_{name}"] = [rate]
        active = ACTIVE_GROUP.get(self._phase)
        return per_group.get(active, value)

    def _clip_grad_norm(self, model):
        self._log_group_grad_norms()  # before Trainer clips
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # max_grad_norm <= 0: nothing was clipped, and _clip_grad_norm did not run
            self._log_group_grad_norms()
        return super()._get_grad_norm(model, grad_norm)

    def _log_group_grad_norms(self) -> None:
        """``grad_norm_<group>``: the gradient norm of the group the phase trains, before clipping (Trainer's
        ``grad_norm`` is the norm of all gradients, also before clipping). Not available under DeepSpeed, which keeps
        the gradients inside its engine."""
        if self._phase is None or self.is_deepspeed_enabled:
            return
        active = ACTIVE_GROUP[self._phase]
        grads = [p.grad for p in self._groups.get(active, []) if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2)
            norm = norm.full_tensor()
        self._metrics["train"][f"grad_norm_{active}"].append(float(norm))
