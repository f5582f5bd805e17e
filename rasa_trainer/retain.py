"""Retain data of the expert phase: benign prompt/completion rows mixed into expert-phase batches so that repairing the
Safety-Critical Experts keeps the answers benign inputs routed through them already had.

- **Rows.** TRL's prompt-completion shape: ``prompt`` (a string or chat messages ending with a user turn) and an
  optional ``completion`` (a string or one assistant message). Rows without a completion get the base model's own
  greedy reply, generated once, batched, before training (self-distillation).
- **Schedule.** ``retain_ratio`` retain rows per pair row: the expert-phase micro-batch holding pairs ``[a, a + B)`` of
  the run's stream of expert-phase pairs gets the retain slots ``[floor(r a), floor(r (a + B)))``, and slot ``k`` is
  row ``perm_c[k mod M]`` of a permutation of the ``M`` retain rows drawn from the seed for cycle ``c = k // M``. The
  rows of a step follow from the seed and the step alone, so a resumed run sees exactly the rows of an uninterrupted
  one, and every retain row is used once per cycle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from typing import Any

import torch

from .data import (
    COMPLETION_COLUMN,
    PROMPT_COLUMN,
    DatasetContractError,
    _check_conversations,
    _check_mixed_formats,
    _Collector,
    _column_values,
    _columns,
    _completion_problem,
    _MISSING,
)
from .generation import generate_replies


def retain_rows(dataset: Any, max_errors: int = 10) -> list[dict[str, Any]]:
    """The retain rows as a list of ``{"prompt", "completion"}`` dicts (``completion`` None where it is to be
    generated), after checking every row; raises one ``ValueError`` naming row and column of each problem."""
    try:
        columns, num_rows = _columns(dataset)
    except DatasetContractError as err:
        raise ValueError(f"retain_dataset: {'; '.join(err.errors)}") from None
    collector = _Collector(max_errors)
    if num_rows == 0:
        collector.add("retain_dataset has no rows; pass None to train without retain data")
    elif PROMPT_COLUMN not in columns:
        collector.add(f"column 'prompt' is missing from all {num_rows} rows (columns present: {sorted(columns)}); "
                      f"retain rows need a 'prompt' and optionally a 'completion'")
    if collector.total:
        _raise(collector)
    prompts = _column_values(dataset, PROMPT_COLUMN)
    _check_conversations(prompts, PROMPT_COLUMN, collector)
    completions = _column_values(dataset, COMPLETION_COLUMN) if COMPLETION_COLUMN in columns else [_MISSING] * num_rows
    _check_mixed_formats(completions, COMPLETION_COLUMN, collector)
    for i, value in enumerate(completions):
        if value is _MISSING or value is None:
            continue
        problem = _completion_problem(value)
        if problem:
            collector.row(i, COMPLETION_COLUMN, problem.replace("refusal text", "reply to keep") +
                          " (or leave it out to have the base model's reply generated)")
    if collector.total:
        _raise(collector)
    return [{"prompt": p, "completion": None if c is _MISSING else c} for p, c in zip(prompts, completions)]


def _raise(collector: _Collector) -> None:
    shown = f"showing the first {len(collector.errors)}" if collector.total > len(collector.errors) else "all shown"
    lines = "\n".join(f"  - {e}" for e in collector.errors)
    raise ValueError(f"retain_dataset: {collector.total} error(s) ({shown}):\n{lines}")


def retain_sha256(rows: list[dict[str, Any]]) -> str:
    """A digest of the retain rows as given (prompts-only rows by their prompt: their replies follow from the model)."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def generate_completions(model, tokenizer, prompts: list, *, batch_size: int, max_new_tokens: int) -> list[str]:
    """The model's greedy replies to ``prompts`` (chat messages), in one batched pass."""
    replies: list[str] = []
    for batch in generate_replies(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  do_sample=False, progress=False, desc="retain completions"):
        replies.extend(batch.replies)
    return replies


@functools.lru_cache(maxsize=64)
def _permutation(seed: int, cycle: int, num_rows: int) -> tuple[int, ...]:
    order = list(range(num_rows))
    random.Random(f"rasa-retain/{seed}/{cycle}").shuffle(order)
    return tuple(order)


def retain_slots(first_pair: int, num_pairs: int, ratio: float, num_rows: int, seed: int) -> list[int]:
    """The retain rows next to the pairs ``[first_pair, first_pair + num_pairs)`` of the expert-phase pair stream."""
    if ratio <= 0 or num_rows == 0 or num_pairs <= 0:
        return []
    start = math.floor(ratio * first_pair + 1e-9)
    end = math.floor(ratio * (first_pair + num_pairs) + 1e-9)
    return [_permutation(seed, k // num_rows, num_rows)[k % num_rows] for k in range(start, end)]


_PAD_LABEL = -100


def append_rows(batch: dict[str, Any], extra: dict[str, torch.Tensor], retain_index: list[int],
                pad_token_id: int) -> dict[str, Any]:
    """``batch`` (a right-padded collated micro-batch of pairs) with the collated retain rows ``extra`` appended as
    further rows; the pairs' own extras (anchors, row indices) are left as they are."""
    num_pairs = batch["input_ids"].shape[0]
    width = max(batch["input_ids"].shape[1], extra["input_ids"].shape[1])
    out = dict(batch)
    device = batch["input_ids"].device
    for key, value in extra.items():
        if key not in batch:
            raise KeyError(f"the retain rows were collated with {key!r}, which the pair batch lacks")
        pad = pad_token_id if key == "input_ids" else _PAD_LABEL if key == "labels" else 0
        out[key] = torch.cat([_pad_to(batch[key], width, pad), _pad_to(value.to(device), width, pad)])
    if "rasa_context_mask" in batch:  # the router phase's context: none on retain rows
        mask = _pad_to(batch["rasa_context_mask"], width, False)
        out["rasa_context_mask"] = torch.cat([mask, mask.new_zeros((len(retain_index), width))])
    for key, value in batch.items():
        per_row = torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == num_pairs
        if per_row and key not in extra and key != "rasa_context_mask" and not key.startswith("anchor_"):
            raise KeyError(f"cannot append retain rows to a batch with the per-row key {key!r}")
    out["rasa_retain_index"] = torch.tensor(retain_index, dtype=torch.long, device=device)
    return out


def _pad_to(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)
