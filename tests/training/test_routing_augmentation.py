"""Routing-robust repair (rasa_trainer/training/routing_augmentation.py): the perturbation families against the routing
attack's own routing, the weights' scoring rule, rate 0 as exact replay, determinism per seed/epoch/rows, the positions
and rows that change, the hook in the expert phase's replay, and invalid options refused."""

from __future__ import annotations

import functools
from collections import defaultdict

import pytest
import torch
from datasets import Dataset
from torch import nn

from conftest import tiny_model
from rasa_trainer.evaluation.steering import boosted_routing
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.routing import Routing, record_routing
from rasa_trainer.training.config import RASAConfig
from rasa_trainer.training.param_groups import ParameterGroups, learning_rates
from rasa_trainer.training.phases import PhaseController
from rasa_trainer.training.routing_augmentation import (
    RoutingAugmentation, augment_routing, check_augmentation_supported, reply_positions, step_generator)
from rasa_trainer.training.routing_replay import RoutingReplay


@functools.lru_cache(maxsize=None)
def router_outputs(num_tokens: int = 40, seed: int = 0):
    """A renormalising softmax router (qwen3_moe, top-2 of 8) on random hidden states: (layer, scores, weights,
    indices)."""
    model = tiny_model("qwen3_moe", norm_topk_prob=True)
    layer = moe_layers(model)[0]
    with torch.no_grad():
        scores, weights, indices = layer.router(torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(seed)))
    return layer, scores, weights, indices


def forced(weights, indices, experts, rate=1.0, family="force", seed=0, margin=0.01):
    positions = torch.ones(1, indices.shape[0], dtype=torch.bool)
    out = augment_routing(Routing([indices], [weights]), {0: experts}, family=family, rate=rate, positions=positions,
                          generator=torch.Generator().manual_seed(seed), margin=margin)
    return out.weights[0], out.indices[0]


def by_expert(weights: torch.Tensor, indices: torch.Tensor, num_experts: int = 8) -> torch.Tensor:
    """Dense ``[N, E]`` weights (order-free comparison of two top-k choices)."""
    return torch.zeros(indices.shape[0], num_experts).scatter(1, indices.long(), weights.float())


@pytest.mark.parametrize("experts", [[5], [1, 6]])
def test_force_is_the_routing_attacks_routing(experts):
    layer, scores, weights, indices = router_outputs()
    mask = torch.zeros(8, dtype=torch.bool)
    mask[experts] = True
    for margin in (0.01, 0.5):
        attack_w, attack_i = boosted_routing(layer, scores, mask, margin)
        new_w, new_i = forced(weights, indices, experts, margin=margin)
        assert torch.allclose(by_expert(new_w, new_i), by_expert(attack_w, attack_i), atol=1e-6)
        # every forced expert holds a slot in every row
        assert all((new_i == e).any(dim=-1).all() for e in experts)
    # the case the attack does not always cover: a forced expert already in the row's top-k
    assert ((indices == experts[0]).any(dim=-1)).any()


def test_force_with_more_selected_experts_than_slots_draws_top_k_of_them_with_equal_weights():
    _, _, weights, indices = router_outputs()
    new_w, new_i = forced(weights, indices, [0, 3, 7])
    assert torch.isin(new_i, torch.tensor([0, 3, 7])).all()
    assert (new_i[:, 0] != new_i[:, 1]).all()
    assert torch.allclose(new_w, torch.full_like(new_w, 0.5))
    assert len({tuple(sorted(r)) for r in new_i.tolist()}) > 1  # the tie is broken per row, not always the same way


@pytest.mark.parametrize("family", ["force", "force_equal", "equal"])
def test_weights_keep_each_rows_sum(family):
    _, _, weights, indices = router_outputs()
    scaled = weights * 2.5  # a router with a scaling factor: the top-k sum is the scale, and stays so
    new_w, new_i = forced(scaled, indices, [2], family=family)
    assert torch.allclose(new_w.sum(dim=-1), scaled.sum(dim=-1), atol=1e-6)
    if family != "force":
        assert torch.allclose(new_w, torch.full_like(new_w, 1.25))
    if family == "equal":
        assert torch.equal(new_i, indices)


def test_rate_zero_and_none_are_exact_replay():
    _, _, weights, indices = router_outputs()
    routing = Routing([indices], [weights])
    positions = torch.ones(1, indices.shape[0], dtype=torch.bool)
    for family, rate in (("force", 0.0), ("none", 1.0)):
        out = augment_routing(routing, {0: [3]}, family=family, rate=rate, positions=positions,
                              generator=torch.Generator().manual_seed(0))
        assert out is routing
    assert not RoutingAugmentation("force", 0.0, experts_by_layer={0: [3]}, seed=0).active


def test_rows_and_positions_that_change():
    _, _, weights, indices = router_outputs(num_tokens=6 * 5)  # a batch of 6 rows x 5 positions
    routing = Routing([indices], [weights])
    positions = torch.zeros(6, 5, dtype=torch.bool)
    positions[:, 2:4] = True
    out = augment_routing(routing, {0: [5]}, family="force", rate=1.0, positions=positions,
                          generator=torch.Generator().manual_seed(0), rows_per_batch=4)
    changed = torch.zeros(6, 5, dtype=torch.bool)
    changed[:4, 2:4] = True  # the pair rows (the first 4) at the given positions; retain rows never
    flat = changed.reshape(-1)
    assert torch.equal(out.indices[0][~flat], indices[~flat]) and torch.equal(out.weights[0][~flat], weights[~flat])
    assert (out.indices[0][flat] == 5).any(dim=-1).all()


def test_reply_positions_are_those_predicting_completion_tokens():
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 9, 4, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    assert reply_positions(labels, mask).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]


def test_decision_and_mixed_positions():
    _, _, weights, indices = router_outputs(num_tokens=8 * 6)  # 8 rows x 6 positions, completion at positions 3-5
    labels = torch.full((8, 6), -100)
    labels[:, 3:] = 5
    inputs = {"attention_mask": torch.ones(8, 6, dtype=torch.long), "labels": labels, "rasa_index": torch.arange(8)}

    def changed(positions):
        out = RoutingAugmentation("force", 1.0, experts_by_layer={0: [4]}, seed=0, positions=positions)(
            Routing([indices], [weights]), inputs, torch.arange(8), epoch=0)
        return (out.indices[0] != indices).any(dim=-1).reshape(8, 6) | (out.weights[0] != weights).any(dim=-1).reshape(8, 6)

    decision, reply, mixed = changed("decision"), changed("reply"), changed("mixed")
    assert not decision[:, [0, 1, 3, 4, 5]].any() and not reply[:, [0, 1, 5]].any()
    assert (decision[:, 2] | (indices.reshape(8, 6, 2)[:, 2] == 4).any(dim=-1)).all()  # unchanged only if 4 was there
    # mixed: every row changes only the decision position, or the reply positions; both kinds occur
    only_decision = ~mixed[:, 3:5].any(dim=-1)
    assert 0 < int(only_decision.sum()) < 8
    assert not mixed[:, [0, 1, 5]].any()


def test_deterministic_per_seed_epoch_and_rows():
    _, _, weights, indices = router_outputs(num_tokens=64)
    routing = Routing([indices], [weights])
    positions = torch.ones(64, 1, dtype=torch.bool)  # 64 rows of one position: the row draw shows
    rows = torch.tensor([4, 9, 2])

    def run(seed, epoch, batch_rows):
        return augment_routing(routing, {0: [1]}, family="force", rate=0.5, positions=positions,
                               generator=step_generator(seed, epoch, batch_rows)).indices[0]

    first = run(0, 2, rows)
    assert torch.equal(first, run(0, 2, rows.clone()))  # a re-run (or a resumed step) gets the same routing
    changed = (first != indices).any(dim=-1)
    assert 0 < int(changed.sum()) < 64  # a share of the rows, not all or none
    for other in (run(1, 2, rows), run(0, 3, rows), run(0, 2, torch.tensor([4, 9, 3]))):
        assert not torch.equal(other, first)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), 1
        labels[i, n - 2:n] = ids[i, n - 2:n]  # the last two tokens are the completion
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_expert_phase_trains_under_the_augmented_routing_and_exact_replay_otherwise():
    model = tiny_model("qwen3_moe", norm_topk_prob=True)
    ids = [torch.randint(3, 128, (5 + r,), generator=torch.Generator().manual_seed(r)).tolist() for r in range(3)]
    rows = [{"input_ids": i, "labels": i, "rasa_index": r} for r, i in enumerate(ids)]
    routing = RoutingReplay(Dataset.from_list(rows), collate, batch_size=3, device="cpu")
    groups = ParameterGroups(learning_rates(1e-2, 1e-3), {"experts": [nn.Parameter(torch.zeros(1))],
                                                           "routers": [nn.Parameter(torch.zeros(1))]})
    phases = PhaseController("alternate", groups, routing, model=lambda: model, metrics=defaultdict(list))
    routing.start_expert_phase(model, 0)
    phases.set_phase("expert", 0)
    batch = {**collate(rows), "rasa_index": torch.tensor([0, 1, 2])}

    def used(context) -> Routing:
        with context, torch.no_grad(), record_routing(model, probabilities=False) as rec:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return rec.routing()

    replayed = routing.batch_routing(batch)
    plain = used(phases.replay(model, batch))
    phases.augmentation = RoutingAugmentation("force", 0.0, experts_by_layer={0: [6], 1: [2]}, seed=0)
    for layer in range(2):  # rate 0: bit-identical to replay without augmentation
        assert torch.equal(used(phases.replay(model, batch)).indices[layer], plain.indices[layer])
        assert torch.equal(plain.indices[layer].long(), replayed.indices[layer].long())
    phases.augmentation = RoutingAugmentation("force", 1.0, experts_by_layer={0: [6], 1: [2]}, seed=0)
    augmented = used(phases.replay(model, batch))
    reply = reply_positions(batch["labels"], batch["attention_mask"]).reshape(-1)
    for layer, expert in ((0, 6), (1, 2)):
        assert (augmented.indices[layer][reply] == expert).any(dim=-1).all()
        assert torch.equal(augmented.indices[layer][~reply], plain.indices[layer][~reply])
    phases.set_phase("router", 1)  # the router phase never replays, augmented or not
    with phases.replay(model, batch):
        pass


def config(**kwargs) -> RASAConfig:
    return RASAConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(routing_augmentation="swap"), "routing_augmentation='swap' is not one of"),
    (dict(routing_augmentation="force", routing_augmentation_rate=1.5), "routing_augmentation_rate=1.5"),
    (dict(routing_augmentation="force", routing_augmentation_margin=-0.1), "routing_augmentation_margin=-0.1"),
    (dict(routing_augmentation="force", routing_augmentation_positions="prompt"),
     "routing_augmentation_positions='prompt'"),
    (dict(routing_augmentation="force", rasa_schedule="router_only"), "has no expert phase"),
    (dict(routing_augmentation="force", replay_weights="recompute"), "set replay_weights='cached'"),
])
def test_invalid_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(**kwargs)


def test_defaults_are_off_and_valid_settings_pass():
    assert config().routing_augmentation == "none"
    assert config(routing_augmentation="force", routing_augmentation_rate=0.25).routing_augmentation_rate == 0.25


def test_routers_that_do_not_renormalise_are_refused():
    with pytest.raises(ValueError, match="renormalise a softmax top-k; MoE layer 0"):
        check_augmentation_supported(tiny_model("olmoe"))
    check_augmentation_supported(tiny_model("qwen3_moe", norm_topk_prob=True))
    with pytest.raises(ValueError, match="the selection is empty"):
        RoutingAugmentation("force", 0.5, experts_by_layer={}, seed=0)
