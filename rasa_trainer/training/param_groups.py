"""The parameter groups RASA trains: ``experts`` (the repairs of the selected experts), ``routers`` (fp32 master
weights) or ``full`` (plain SFT), each with its learning rate; the regrouping of Trainer's optimiser groups (its decay /
no-decay split) by RASA group; switching the groups a phase does not train off (and, under DDP, out of the gradient
all-reduce); per-group gradient norms and learning rates for the logs.

:class:`ParameterGroups` holds no trainer: the trainer hands it the model, the selection and the optimiser class.
The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping

import torch
import torch.distributed as dist
from torch import nn

from ..moe.discovery import moe_layers
from ..repairs.layer import attach_repairs, upcast_routers

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_OWN_GROUP_KWARGS = {"params", "model", "optimizer_dict"}


def _canonical_name(name: str) -> str:
    """A parameter name without the prefixes DDP, torch.compile and FSDP wrappers add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _with_param_groups(optimizer_cls, regroup: Callable[[list], list], inactive: Callable[[], set[str]]):
    """``optimizer_cls`` whose constructor regroups the parameter groups it is given (Trainer's decay / no-decay
    groups) with ``regroup`` and whose ``step`` leaves the groups named by ``inactive()`` alone; everything else, its
    name and module included, is the class Trainer chose."""

    def drop_inactive_gradients(optimizer, args, kwargs) -> None:
        # A group the phase does not train has no gradient, so AdamW skips it (no update, no moment drift). DeepSpeed
        # ZeRO-3 hands the optimiser flat fp32 copies of each group with a zero gradient instead, which AdamW's
        # moments from the previous phase would turn into an update: those gradients are dropped before the step.
        skip = inactive()
        for group in optimizer.param_groups:
            if group.get("name") in skip:
                for p in group["params"]:
                    p.grad = None

    def __init__(self, params, *args, **kwargs):
        optimizer_cls.__init__(self, regroup(list(params)), *args, **kwargs)
        self.register_step_pre_hook(drop_inactive_gradients)

    return type(optimizer_cls.__name__, (optimizer_cls,), {
        "__init__": __init__, "__module__": optimizer_cls.__module__, "__qualname__": optimizer_cls.__qualname__,
        "__doc__": optimizer_cls.__doc__,
    })


def _register_zero3_leaf_modules(model: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3 make every MoE block a leaf module: ranks route tokens to different experts, and
    per-expert parameter fetching would otherwise hang (deepspeedai/DeepSpeed#7461).

    And give every MoE block's input a gradient (:func:`_input_needs_grad`): DeepSpeed reduces a leaf module's
    gradients in a full backward hook, and when none of the block's inputs needs a gradient (the first MoE layer: RASA
    freezes everything below it) that hook fires as soon as the block's *output* gradient arrives, before the block's
    own backward. It then reduced zeros for the repairs and routers and released their parameters, and the block's
    backward failed accumulating into them (``The size of tensor a (0) must match ...``)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    from deepspeed.utils import set_z3_leaf_modules

    modules = dict(model.named_modules())
    blocks = [modules[layer.router_name.rpartition(".")[0]] for layer in moe_layers(model)]
    set_z3_leaf_modules(model, sorted({type(b) for b in blocks}, key=lambda c: c.__name__))
    for block in blocks:
        # registered before DeepSpeed wraps the model, so it runs before DeepSpeed's own forward pre-hooks
        if "_rasa_input_grad_hook" not in block.__dict__:
            block._rasa_input_grad_hook = block.register_forward_pre_hook(_input_needs_grad, with_kwargs=True)


def _input_needs_grad(module: nn.Module, args: tuple, kwargs: dict):
    """A forward pre-hook: the block's hidden states (its first argument) as a leaf that needs a gradient, when
    gradients are recorded and it needs none. The gradient it gets is discarded (it reaches nothing trainable)."""
    if not torch.is_grad_enabled():
        return None
    if args:
        hidden = args[0]
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
            return (hidden.detach().requires_grad_(), *args[1:]), kwargs
        return None
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
        return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_()}
    return None


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
        self.active: str | None = None  # the group the current phase trains (None: not in a phase yet)
        self._active_ids: frozenset[int] | None = None  # its parameters' ids (None: every parameter is active)

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
        if self.active is not None:
            self.activate(self.active)

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
        cls = optimizer_cls if builds_own_groups else _with_param_groups(optimizer_cls, self.regroup, self.inactive)
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
        """Only the group ``active`` is trainable (and, under :meth:`reduce_only_active`, all-reduced)."""
        for name, params in self.groups.items():
            for p in params:
                p.requires_grad_(name == active)
        self.active = active
        self._active_ids = frozenset(id(p) for p in self.groups.get(active, []))

    def reduce_only_active(self, model: nn.Module) -> bool:
        """Under DDP (``model`` a ``DistributedDataParallel``), all-reduce only the gradients of the group the phase
        trains: a comm hook leaves the other group's parameters out of every bucket's all-reduce (they hold zeros, and
        their gradients are dropped before the optimiser step anyway). The active group is reduced exactly as DDP's
        own all-reduce does (scaled by 1/world, then summed), so training is unchanged bit for bit. Returns whether
        the hook is in place; ``False`` without DDP or a second group, or when ``model`` already has a comm hook (the
        user's, kept: then every group is reduced, which a warning says)."""
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel) or len(self.groups) < 2:
            return False
        hooks = getattr(model, "_comm_hooks", [])
        if any(hook is _active_group_allreduce for hook, _ in hooks):
            return True  # a second train() on the same wrapped model
        if hooks:
            logger.warning("RASA: the DDP model already has a comm hook (%s); it is kept, so every step all-reduces "
                           "the gradients of every RASA group, the frozen one's included", hooks[0][0].__qualname__)
            return False
        model.register_comm_hook(_ActiveGroupReduce(self, model.process_group), _active_group_allreduce)
        return True

    def inactive(self) -> set[str]:
        """The groups the current phase does not train (none before a phase is activated): the optimiser's step
        leaves them alone."""
        return set() if self.active is None else {name for name in self.groups if name != self.active}

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


class _ActiveGroupReduce:
    """The state of :func:`_active_group_allreduce`: the groups (whose active one is read at every bucket) and the
    process group DDP reduces over."""

    def __init__(self, groups: ParameterGroups, process_group):
        self.groups, self.process_group = groups, process_group


# unannotated return: DDP compares it with torch.futures.Future[torch.Tensor] itself, which a postponed (string)
# annotation never equals
def _active_group_allreduce(state: _ActiveGroupReduce, bucket):
    """DDP comm hook: all-reduce (mean over processes) the gradients in ``bucket`` of the active group's parameters
    only; a bucket without any crosses no wire. Buckets mix groups (DDP fills them in reverse registration order,
    routers and repairs layer by layer), so the active gradients are packed, reduced and unpacked."""
    buffer = bucket.buffer()
    active = state.groups._active_ids
    pairs = list(zip(bucket.parameters(), bucket.gradients()))
    grads = [g for p, g in pairs if active is None or id(p) in active]
    if not grads:
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done
    whole = len(grads) == len(pairs)
    packed = buffer if whole else torch.cat([g.reshape(-1) for g in grads])
    # DDP's built-in reduction multiplies by 1/world before the sum (reducer.cpp); the same here, so the result is
    # bit-identical to it
    packed.mul_(1.0 / dist.get_world_size(state.process_group))
    future = dist.all_reduce(packed, group=state.process_group, async_op=True).get_future()

    def unpack(fut) -> torch.Tensor:
        if not whole:
            offset = 0
            for g in grads:
                g.copy_(packed[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return buffer

    return future.then(unpack)
