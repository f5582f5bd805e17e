"""The parameter groups without a Trainer (rasa_trainer/training/param_groups.py): Trainer's optimiser groups regrouped
by RASA group with each group's learning rate, groups found again by name in a wrapped model, the group switch of a
phase, per-group gradient norms and learning rates."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from conftest import tiny_model
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.training.param_groups import ParameterGroups, learning_rates, rates_by_group


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.expert = nn.Linear(3, 3)  # weight and bias: the "experts" group
        self.router = nn.Linear(3, 2, bias=False)  # the "routers" group
        self.frozen = nn.Linear(3, 3)


class Wrapped(nn.Module):
    """Prefixes every name as DDP does (``module.``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.module = inner


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def toy_groups(model: Toy) -> ParameterGroups:
    groups = ParameterGroups(learning_rates(1e-2, 1e-3),
                             {"experts": list(model.expert.parameters()), "routers": [model.router.weight]})
    groups.index(model)
    return groups


def test_learning_rates_per_group():
    assert learning_rates(1e-2, 1e-4) == {"experts": 1e-2, "routers": 1e-4, "full": 1e-2}


def test_regroup_splits_trainers_decay_groups_by_rasa_group():
    model = Toy()
    groups = toy_groups(model)
    groups.follow(model)
    trainer_groups = [  # Trainer's split: weights decay, biases do not
        {"params": [model.router.weight, model.expert.weight], "weight_decay": 0.1},
        {"params": [model.expert.bias], "weight_decay": 0.0},
    ]
    regrouped = groups.regroup(trainer_groups)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in regrouped] == [
        ("experts", 1e-2, 0.1, 1), ("experts", 1e-2, 0.0, 1), ("routers", 1e-3, 0.1, 1)]
    assert regrouped[0]["params"][0] is model.expert.weight and regrouped[1]["params"][0] is model.expert.bias
    with pytest.raises(RuntimeError, match="belongs to no RASA group"):
        groups.regroup([{"params": [model.frozen.weight]}])


def test_groups_follow_the_optimisers_model_by_name():
    """An engine may hand the optimiser a wrapped model with other parameter objects: the groups follow it by name."""
    model = Toy()
    groups = toy_groups(model)
    copy = Toy()
    copy.load_state_dict(model.state_dict())
    groups.follow(Wrapped(copy))
    assert _ids(groups.groups["experts"]) == _ids([copy.expert.weight, copy.expert.bias])
    assert _ids(groups.groups["routers"]) == _ids([copy.router.weight])


def test_optimizer_class_builds_rasa_groups():
    model = Toy()
    groups = toy_groups(model)
    groups.follow(model)
    cls, kwargs = groups.optimizer_cls_and_kwargs(torch.optim.SGD, {"lr": 0.5, "momentum": 0.9})
    assert cls.__name__ == "SGD" and issubclass(cls, torch.optim.SGD) and kwargs == {"lr": 0.5, "momentum": 0.9}
    optimizer = cls([{"params": list(model.expert.parameters()) + [model.router.weight]}], **kwargs)
    assert [(g["name"], g["lr"], g["momentum"]) for g in optimizer.param_groups] == [
        ("experts", 1e-2, 0.9), ("routers", 1e-3, 0.9)]


def test_full_group_takes_the_expert_rate_and_factories_are_refused_otherwise():
    model = Toy()
    full = ParameterGroups(learning_rates(3e-4, 1e-6))
    full.setup(model, "full")
    assert _ids(full.groups["full"]) == _ids(model.parameters())
    full.follow(model)
    cls, kwargs = full.optimizer_cls_and_kwargs(torch.optim.AdamW, {"lr": 1.0, "params": None})
    assert cls is torch.optim.AdamW and kwargs["lr"] == 3e-4  # it builds its own groups: left alone
    split = toy_groups(model)
    split.follow(model)
    with pytest.raises(ValueError, match="optim='galore' builds its own parameter groups"):
        split.optimizer_cls_and_kwargs(torch.optim.AdamW, {"params": None}, optim="galore")


def test_setup_attaches_the_selected_repairs_and_upcasts_routers():
    model = tiny_model("qwen3_moe")
    groups = ParameterGroups(learning_rates(1e-2, 1e-3))
    groups.setup(model, "alternate", {0: [1, 3], 1: [2]}, "delta")
    assert list(groups.groups) == ["experts", "routers"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for ps in groups.groups.values() for p in ps}
    assert all(w.dtype == torch.float32 for w in groups.groups["routers"])
    assert {id(layer.router.weight) for layer in moe_layers(model)} <= set(_ids(groups.groups["routers"]))


def test_phase_switch_drops_the_inactive_groups_gradients():
    model = Toy()
    groups = toy_groups(model)
    groups.activate("routers")
    assert [p.requires_grad for p in model.expert.parameters()] == [False, False] and model.router.weight.requires_grad
    for p in list(model.expert.parameters()) + [model.router.weight]:
        p.grad = torch.ones_like(p)
    groups.drop_gradients_except("routers")
    assert model.expert.weight.grad is None and model.expert.bias.grad is None
    assert model.router.weight.grad is not None


def test_grad_norms_and_learning_rates_are_logged():
    model = Toy()
    groups = toy_groups(model)
    model.router.weight.grad = torch.full_like(model.router.weight, 2.0)  # 6 entries of 2: norm sqrt(24)
    metrics = defaultdict(list)
    groups.log_grad_norm("routers", metrics)
    groups.log_grad_norm("experts", metrics)  # no gradients: 0
    assert metrics["grad_norm_routers"] == [pytest.approx(24 ** 0.5)] and metrics["grad_norm_experts"] == [0.0]
    per_group = groups.log_learning_rates(["experts", "experts", "routers", None], [0.1, 0.1, 0.01, 0.5], metrics)
    assert per_group == {"experts": 0.1, "routers": 0.01, None: 0.5}
    assert metrics["learning_rate_experts"] == [0.1] and metrics["learning_rate_routers"] == [0.01]
    assert "learning_rate_None" not in metrics
    assert rates_by_group(["a", "a"], [1.0, 2.0]) == {"a": 1.0}  # the first of each group
