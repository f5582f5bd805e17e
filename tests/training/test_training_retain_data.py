"""The retain data without a Trainer (rasa_trainer/training/retain.py): the place of a micro-batch in the expert-phase
stream (the same for a resumed run), the rows each micro-batch gets, appending them, the step's token counts, the
weighted loss and the split losses from a forward's per-token log-probabilities, completing and tokenising the rows."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import rasa_trainer.training.retain as retain_module
from rasa_trainer.training.retain import RetainData, expert_micro_batch, retain_slots
from rasa_trainer.training.schedule import expert_epochs_before
from tiny_chat import tiny_chat_tokenizer

EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
            {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]}]


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def retain_data(rows=None, ratio=0.5, loss_weight=1.0, **kwargs) -> RetainData:
    data = RetainData(rows if rows is not None else [{"prompt": "p", "completion": "c"}] * 3, ratio=ratio,
                      loss_weight=loss_weight, seed=0, pairs_per_batch=4, collate=collate, pad_token_id=0, **kwargs)
    data.examples = EXAMPLES if rows is None else None
    return data


def test_stream_position_of_a_micro_batch():
    # alternate schedule, 3 optimiser steps per epoch, 2 micro-batches per step, 2 processes
    common = dict(steps_per_epoch=3, accumulation_steps=2, num_processes=2)
    first = expert_micro_batch(expert_epochs_before=0, epoch=0, global_step=0, micro_step=0, process_index=0, **common)
    assert first == 0
    assert expert_micro_batch(expert_epochs_before=0, epoch=0, global_step=1, micro_step=1, process_index=1,
                              **common) == (1 * 2 + 1) * 2 + 1
    # epoch 2 (the second expert epoch) continues where epoch 0 stopped: the router epoch between adds nothing
    after = expert_micro_batch(expert_epochs_before=expert_epochs_before("alternate", 2), epoch=2, global_step=6,
                               micro_step=0, process_index=0, **common)
    assert after == 3 * 2 * 2


def test_rows_of_a_micro_batch_follow_the_seeded_slots():
    data = retain_data()
    assert data.slots(0, 4) == retain_slots(0, 4, 0.5, 3, seed=0) and len(data.slots(0, 4)) == 2
    assert data.slots(1, 4) == retain_slots(4, 4, 0.5, 3, seed=0)
    assert retain_data(ratio=0.0).slots(0, 4) == []
    assert retain_data().active and not RetainData(None, ratio=0.5, loss_weight=1.0, seed=0, pairs_per_batch=4).active


def test_rows_are_appended_after_the_pairs():
    data = retain_data()
    pairs = collate([{"input_ids": [3, 4], "labels": [-100, 4]}] * 4)
    pairs["rasa_index"] = torch.arange(4)
    out = data.with_rows(pairs, 0)
    rows = data.slots(0, 4)
    assert out["rasa_retain_index"].tolist() == rows
    assert out["input_ids"].shape == (6, max([2] + [len(EXAMPLES[r]["input_ids"]) for r in rows]))
    assert torch.equal(out["rasa_index"], torch.arange(4))
    for b, r in enumerate(rows):
        n = len(EXAMPLES[r]["input_ids"])
        assert out["input_ids"][4 + b, :n].tolist() == EXAMPLES[r]["input_ids"]
        assert (out["labels"][4 + b, n:] == -100).all()


def test_step_items_count_each_part():
    data = retain_data()
    batch = collate([{"input_ids": [3, 4, 5], "labels": [-100, 4, 5]}] * 2 + [EXAMPLES[2]])
    batch["rasa_retain_index"] = torch.tensor([2])
    data.count_step_items([batch, batch], lambda parts: sum(int((p["labels"] != -100).sum()) for p in parts))
    assert data.step_items == (8, 4)


def captured(log_probs: torch.Tensor, mask: torch.Tensor) -> list:
    return [SimpleNamespace(log_probs=log_probs, label_mask=mask)]


def test_weighted_loss_from_the_per_token_log_probabilities():
    log_probs = -torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0]])  # 2 pairs, 1 retain row
    mask = (log_probs != 0).long()
    data = retain_data(loss_weight=0.5)
    with torch.no_grad():
        local = data.weighted_loss(torch.tensor(0.0), captured(log_probs, mask), 2, None)
        assert float(local) == pytest.approx(6 / 3 + 0.5 * 15 / 3)  # without num_items: this batch's tokens
        data.step_items = (6, 5)  # the optimiser step's tokens
        step = data.weighted_loss((torch.tensor(0.0), "outputs"), captured(log_probs, mask), 2, torch.tensor(11),
                                  process_factor=2)
    assert step[1] == "outputs" and float(step[0]) == pytest.approx(2 * (6 / 6 + 0.5 * 15 / 5))
    with pytest.raises(RuntimeError, match="per-token log-probabilities"):
        data.weighted_loss(torch.tensor(0.0), [SimpleNamespace()], 2, None)


def test_split_losses_are_logged_per_part():
    log_probs = -torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    metrics = defaultdict(list)
    RetainData.log_split_losses(captured(log_probs, torch.tensor([[1, 1], [1, 0]])), 1, metrics)
    assert metrics == {"completion_loss": [2.0], "retain_loss": [2.0]}
    RetainData.log_split_losses([SimpleNamespace(log_probs=None)], 1, metrics)  # no per-token path: nothing logged
    assert metrics == {"completion_loss": [2.0], "retain_loss": [2.0]}


def test_prepare_generates_missing_replies_once_and_tokenises(monkeypatch):
    calls = []
    monkeypatch.setattr(retain_module, "generate_completions",
                        lambda model, tokenizer, prompts, **kw: calls.append((model, len(prompts), kw)) or ["sure"])
    rows = [{"prompt": "what capital zorbia", "completion": "velm"}, {"prompt": "tell me", "completion": None}]
    data = retain_data(rows, generation_batch_size=8, max_new_tokens=4)
    seen = []

    def tokenise(dataset):
        seen.extend(dataset.to_list())
        return [{"input_ids": [i], "labels": [i], "other": 0} for i in range(len(dataset))]

    data.prepare(tiny_chat_tokenizer(), tokenise=tokenise, generation_model=lambda: "the model")
    assert calls == [("the model", 1, {"batch_size": 8, "max_new_tokens": 4, "chat_template_kwargs": None})]
    assert [r["completion"][0]["content"] for r in seen] == ["velm", "sure"]
    assert data.examples == [{"input_ids": [0], "labels": [0]}, {"input_ids": [1], "labels": [1]}]
    data.prepare(tiny_chat_tokenizer(), tokenise=tokenise, generation_model=lambda: "the model")
    assert len(calls) == 1  # once


def test_prepare_refuses_empty_replies_and_lost_rows(monkeypatch):
    monkeypatch.setattr(retain_module, "generate_completions", lambda *a, **kw: ["  "])
    data = retain_data([{"prompt": "tell me", "completion": None}])
    with pytest.raises(ValueError, match="reply to 1 retain prompt"):
        data.prepare(tiny_chat_tokenizer(), tokenise=lambda d: d, generation_model=lambda: None)
    data = retain_data([{"prompt": "tell me", "completion": "sure"}])
    with pytest.raises(ValueError, match="1 retain row"):
        data.prepare(tiny_chat_tokenizer(), tokenise=lambda d: [], generation_model=lambda: None)


def test_lengths_are_checked_against_max_length():
    long = [{"prompt": " ".join(["one"] * 50), "completion": "velm"}, {"prompt": "tell me", "completion": None}]
    with pytest.raises(ValueError, match=r"1 row\(s\) of retain_dataset exceed max_length=32 .*row 0"):
        retain_data(long, max_length=32).check_lengths(tiny_chat_tokenizer())
    retain_data(long, max_length=None).check_lengths(tiny_chat_tokenizer())
