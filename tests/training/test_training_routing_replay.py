"""The routing records and their replay without a Trainer (rasa_trainer/training/routing_replay.py): cache positions of
contract rows when TRL dropped rows, retain rows after the pairs, the run-start and phase-start records (or the resumed
ones), a batch's routing and its replay, the routing-shift measures, and the split of a record across processes (the
two-process record itself: tests/training/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from conftest import tiny_model
from rasa_trainer.moe.routing import real_tokens, record_routing
from rasa_trainer.moe.replay_cache import RoutingCache, assignment_shift
from rasa_trainer.training.routing_replay import RoutingReplay, _even_share, row_positions

ROWS = [0, 2, 3, 5]  # contract rows 1 and 4 were dropped by TRL


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding, as TRL's collator pads."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def example(seed: int, length: int) -> dict:
    ids = torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": ids}


def replay_for(replay_weights: str = "cached") -> RoutingReplay:
    dataset = Dataset.from_list([{**example(r, 4 + r), "rasa_index": r} for r in ROWS])
    return RoutingReplay(dataset, collate, batch_size=3, device="cpu", replay_weights=replay_weights)


def batch_of(rows: list[int], retain: list[int] | None = None, routing: RoutingReplay | None = None) -> dict:
    examples = [example(r, 4 + r) for r in rows] + [RETAIN[i] for i in retain or []]
    batch = collate(examples)
    batch["rasa_index"] = torch.tensor(rows)
    if retain is not None:
        batch["rasa_retain_index"] = torch.tensor(retain)
    return batch


RETAIN = [example(100, 3), example(101, 6)]


def used_routing(model, batch) -> torch.Tensor:
    with torch.no_grad(), record_routing(model, probabilities=False) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return real_tokens(rec.routing(), batch["attention_mask"]).stacked_indices().long()


def test_positions_when_trl_dropped_rows():
    routing = replay_for()
    assert row_positions(ROWS) == {0: 0, 2: 1, 3: 2, 5: 3}
    assert routing.positions(torch.tensor([5, 0, 3])).tolist() == [3, 0, 2]
    with pytest.raises(KeyError):
        routing.positions(torch.tensor([1]))  # a dropped row has no position
    batch = batch_of([2, 5], retain=[1, 0])
    assert routing.batch_positions(batch).tolist() == [1, 3, 4 + 1, 4 + 0]  # retain rows after the 4 pairs


def test_records_hold_the_pairs_then_the_retain_rows():
    model = tiny_model("qwen3_moe")
    routing = replay_for()
    routing.add_retain_examples(RETAIN)
    routing.start_run(model)
    assert routing.initial.num_examples == 4 and routing.initial.weights is None  # pairs only, indices only
    first = routing.initial
    routing.start_run(model)
    assert routing.initial is first  # recorded once per run
    routing.start_expert_phase(model, 0)
    assert routing.cache.num_examples == 6 and routing.cache.weights is not None
    assert routing.phase_start_shift() == 0.0  # the same model: no shift yet
    batch = batch_of([5, 0], retain=[1])
    expected = real_tokens(routing.batch_routing(batch), batch["attention_mask"]).stacked_indices().long()
    assert torch.equal(used_routing(model, batch), expected)
    recompute = replay_for("recompute")
    recompute.start_expert_phase(model, 0)
    assert recompute.cache.weights is None and recompute.cache.num_examples == 4


def test_resumed_phase_record_is_used_only_for_its_epoch():
    model = tiny_model("qwen3_moe")
    routing = replay_for()
    resumed = replay_for().record(model, "resumed", keep_weights=True)
    routing.start_expert_phase(model, 2, resumed=(2, resumed))
    assert routing.cache is resumed
    routing.start_expert_phase(model, 4, resumed=(2, resumed))
    assert routing.cache is not resumed


def test_replay_keeps_the_recorded_routing_after_the_routers_move():
    model = tiny_model("qwen3_moe")
    routing = replay_for()
    routing.start_expert_phase(model, 0)
    batch = batch_of([0, 3, 5])
    before = used_routing(model, batch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.add_(torch.randn_like(p) * 5)
    assert not torch.equal(used_routing(model, batch), before)
    with routing.replay(model, batch):
        assert torch.equal(used_routing(model, batch), before)


def test_prompt_shift_against_the_run_start():
    model = tiny_model("qwen3_moe")
    routing = replay_for()
    batch = batch_of([0, 2])
    context = batch["attention_mask"].bool()
    with torch.no_grad(), record_routing(model, probabilities=False) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert routing.prompt_shift(batch["rasa_index"], batch["attention_mask"], context, rec.routing()) is None
    routing.start_run(model)
    assert routing.prompt_shift(None, batch["attention_mask"], context, rec.routing()) is None
    assert routing.prompt_shift(batch["rasa_index"], batch["attention_mask"], context, rec.routing()) == 0.0


def test_one_process_records_every_row_as_the_ordered_batches_do():
    model = tiny_model("qwen3_moe")
    routing = replay_for()
    routing.add_retain_examples(RETAIN)
    cache = routing.record(model, "all", keep_weights=True, retain=True)
    expected = RoutingCache.record(model, routing.ordered_batches(retain=True), keep_weights=True)
    assert routing.recorded_rows == cache.num_examples == 6
    assert torch.equal(cache.indices, expected.indices) and torch.equal(cache.weights, expected.weights)
    assert torch.equal(cache.offsets, expected.offsets)
    # batches of 3: the 4 pairs in two, then the 2 retain rows in their own
    assert [b["input_ids"].shape[0] for b in routing.ordered_batches(retain=True)] == [3, 1, 2]
    # the shift over this process's share of the tokens (all of them, with one process) is the whole measure
    routing.initial = routing.record(model, "start", keep_weights=False)
    routing.cache = RoutingCache((cache.indices + 1) % 8, cache.weights, cache.offsets)
    pair_tokens = routing.initial.indices.shape[0]
    assert routing.own_tokens(pair_tokens) == slice(0, pair_tokens)
    assert routing.phase_start_shift() == float(assignment_shift(routing.cache.indices[:pair_tokens],
                                                                 routing.initial.indices)) > 0


@pytest.mark.parametrize("count", [1, 2, 3, 8])
@pytest.mark.parametrize("items", [0, 1, 5, 16, 17])
def test_even_shares_cover_every_batch_once_in_order(count, items):
    shares = [_even_share(items, index, count) for index in range(count)]
    assert [i for share in shares for i in share] == list(range(items))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_process_place_is_checked():
    dataset = Dataset.from_list([{**example(0, 4), "rasa_index": 0}])
    with pytest.raises(ValueError, match="process_index=2 is not one of num_processes=2"):
        RoutingReplay(dataset, collate, batch_size=1, device="cpu", process_index=2, num_processes=2)
    with pytest.raises(RuntimeError, match="no torch.distributed process group: launch with torchrun"):
        RoutingReplay(dataset, collate, batch_size=1, device="cpu", process_index=0, num_processes=2)
