"""The phase controller without a Trainer (rasa_trainer/training/phases.py, schedule.py): the phase of each epoch for
every schedule, the group switch at a phase start, the expert phase's routing record (or the resumed one), the run-start
record, dropping the inactive gradients, replay only in the expert phase, and the selected-experts check."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rasa_trainer.training.param_groups import ParameterGroups, learning_rates
from rasa_trainer.training.phases import PhaseController, check_selected_experts_reached
from rasa_trainer.training.schedule import ACTIVE_GROUP, PHASE_CODES, expert_epochs_before, phase_of_epoch


@pytest.mark.parametrize("schedule, phases", [
    ("alternate", ["expert", "router", "expert", "router", "expert", "router"]),
    ("expert_only", ["expert"] * 6),
    ("router_only", ["router"] * 6),
    ("full", ["full"] * 6),
])
def test_phase_of_each_epoch(schedule, phases):
    assert [phase_of_epoch(schedule, e) for e in range(6)] == phases
    assert [expert_epochs_before(schedule, e) for e in range(6)] == [
        sum(p == "expert" for p in phases[:e]) for e in range(6)]
    assert {ACTIVE_GROUP[p] for p in phases} <= {"experts", "routers", "full"}
    assert PHASE_CODES == {"full": 0, "expert": 1, "router": 2}


class FakeRouting:
    """What the controller asks of the routing records, recorded."""

    def __init__(self):
        self.initial = self.cache = None
        self.calls = []

    def start_run(self, model, resumed=None):
        self.calls.append(("start_run", resumed))
        self.initial = resumed or SimpleNamespace(indices=torch.zeros(4, 1, 2, dtype=torch.long))

    def start_expert_phase(self, model, epoch, resumed=None):
        self.calls.append(("start_expert_phase", epoch, resumed))
        # MoE layer 0 sends every token to experts 1 and 3
        self.cache = resumed[1] if resumed else SimpleNamespace(indices=torch.tensor([[[1, 3]]] * 4))

    def phase_start_shift(self):
        return 0.25

    def own_tokens(self, num_tokens):  # one process: all of them
        return slice(0, num_tokens)

    def sum_over_processes(self, counts):
        return counts

    @contextlib.contextmanager
    def replay(self, model, inputs):
        self.calls.append(("replay", inputs))
        yield


def controller(schedule="alternate", resumed=None):
    model = nn.ModuleDict({"experts": nn.Linear(2, 2), "routers": nn.Linear(2, 2, bias=False)})
    if schedule == "full":
        groups = ParameterGroups(learning_rates(1e-2, 1e-3), {"full": list(model.parameters())})
    else:
        groups = ParameterGroups(learning_rates(1e-2, 1e-3), {name: list(model[name].parameters())
                                                              for name in ("experts", "routers")})
    metrics = defaultdict(list)
    ended = []
    phases = PhaseController(schedule, groups, FakeRouting(), model=lambda: model, metrics=metrics,
                             resumed=resumed, on_train_end=lambda: ended.append(True))
    phases.expect_experts({0: [1, 3]})
    return phases, model, metrics, ended


def _trainable(model) -> dict[str, bool]:
    return {name: all(p.requires_grad for p in module.parameters()) for name, module in model.items()}


def test_alternate_switches_groups_and_records_the_expert_phase_routing():
    phases, model, metrics, _ = controller()
    phases.on_train_begin(None, None, None)
    assert phases.routing.calls == [("start_run", None)]
    phases.on_epoch_begin(None, SimpleNamespace(epoch=0.0), None)
    assert (phases.phase, phases.epoch, phases.active_group, phases.phase_code) == ("expert", 0, "experts", 1)
    assert _trainable(model) == {"experts": True, "routers": False}
    assert phases.routing.calls[-1] == ("start_expert_phase", 0, None)
    assert metrics["routing_shift_phase_start"] == [0.25]
    # a resumed run's epoch arrives as a float sum slightly below the integer
    phases.on_epoch_begin(None, SimpleNamespace(epoch=math.fsum([0.1] * 10) - 1e-9), None)
    assert (phases.phase, phases.epoch) == ("router", 1)
    assert _trainable(model) == {"experts": False, "routers": True}
    assert len(phases.routing.calls) == 2  # the router phase records nothing
    assert phases.expert_epochs_before() == 1


def test_resumed_records_are_consumed_once():
    initial = SimpleNamespace(indices=torch.zeros(4, 1, 2, dtype=torch.long))
    cache = SimpleNamespace(indices=torch.tensor([[[3, 1]]] * 4))
    resumed = {"initial_routing": initial, "routing_cache": (2, cache)}
    phases, _, _, _ = controller(resumed=resumed)
    phases.on_train_begin(None, None, None)
    assert phases.routing.initial is initial and "initial_routing" not in resumed
    phases.begin_phase(2)
    assert phases.routing.cache is cache and resumed == {}
    phases.begin_phase(4)
    assert phases.routing.calls[-1] == ("start_expert_phase", 4, None)


def test_full_schedule_records_no_routing():
    phases, model, metrics, ended = controller("full")
    phases.on_train_begin(None, None, None)
    phases.on_epoch_begin(None, SimpleNamespace(epoch=0.0), None)
    assert phases.phase == "full" and phases.routing.calls == [] and "routing_shift_phase_start" not in metrics
    assert all(p.requires_grad for p in model.parameters())
    phases.on_train_end(None, None, None)
    assert ended == [True]


def test_inactive_gradients_are_dropped_before_the_optimiser_step():
    phases, model, _, _ = controller("router_only")
    phases.begin_phase(0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    phases.on_pre_optimizer_step(None, None, None)
    assert all(p.grad is None for p in model["experts"].parameters())
    assert all(p.grad is not None for p in model["routers"].parameters())


def test_replay_only_in_the_expert_phase():
    phases, model, _, _ = controller()
    phases.set_phase("router", 1)
    with phases.replay(model, {"rasa_index": torch.tensor([0])}):
        pass
    assert phases.routing.calls == []
    phases.set_phase("expert", 0)
    with phases.replay(model, {"rasa_index": torch.tensor([0])}):
        pass
    assert phases.routing.calls[0][0] == "replay"
    phases.set_phase(None)
    assert phases.active_group is None


def test_selected_experts_check(caplog):
    indices = torch.tensor([[[1, 0], [2, 4]]] * 5)  # 5 tokens, 2 MoE layers, top-2
    check_selected_experts_reached({0: [1], 1: [4]}, indices)
    with caplog.at_level("WARNING", logger="rasa_trainer.training.phases"):
        check_selected_experts_reached({0: [1, 3], 1: [2]}, indices)
    assert "1 of 3 selected experts receive no training token" in caplog.text and "expert 3" in caplog.text
    with pytest.raises(ValueError, match="no training token is routed to any of the 2 selected experts"):
        check_selected_experts_reached({0: [5], 1: [6]}, indices)
    # under several processes each counts its share of the tokens: the decision is on the summed counts
    other_share = {(0, 5): 0, (1, 6): 3}  # another process's tokens reach expert 6 of MoE layer 1
    summed = []
    check_selected_experts_reached({0: [5], 1: [6]}, indices,
                                   sum_over_processes=lambda c: summed.append(c.tolist()) or c + torch.tensor(
                                       list(other_share.values())))
    assert summed == [[0, 0]]  # this share's counts, in selection order
    with pytest.raises(ValueError, match="any of the 2 selected experts"):
        check_selected_experts_reached({0: [5], 1: [6]}, indices, sum_over_processes=lambda c: c * 2)
