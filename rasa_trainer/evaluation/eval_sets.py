"""Standard evaluation sets for :func:`~rasa_trainer.evaluation.evaluate.evaluate_safety`, from the shapes they are published
in, and utility through lm-evaluation-harness.

- :func:`load_xstest`: an XSTest-style table (``prompt``, ``label`` in ``safe`` / ``unsafe``, ``type``). Safe prompts
  (risky-sounding but benign) go to ``over_refusal``: refusing them is over-refusal. Unsafe prompts go to ``anchors``
  (harmful requests asked plainly): refusing them is the expected refusal.
- :func:`load_attacks`: a table of jailbreaks (``prompt``, ``attack``, optional ``goal``, ``held_out``) for the
  ``attacks`` set, with the attack families kept out of alignment marked ``held_out``.
- :func:`load_eval_sets`: both merged into one ``eval_sets`` dict (optionally on top of an existing one), checked
  exactly as ``evaluate_safety`` checks it; :func:`write_eval_sets` writes it as the JSON file
  ``examples/train.py --eval_sets`` reads.
- :func:`run_lm_eval`: utility benchmarks of lm-evaluation-harness on an in-memory model (optional dependency
  ``lm_eval``), as one flat ``{"<task>/<metric>": value}`` dict.

Every error names the file (or "the dataset"), the row (0-based, in file order) and the column.

The standard benchmarks in their published files (HarmBench, JailbreakBench, StrongREJECT, XSTest's published CSV,
OR-Bench, WildJailbreak's evaluation TSV), with categories, file hashes and errors naming the line, are read by
:mod:`rasa_trainer.evaluation.benchmarks`. Rows of every set may be multi-turn: ``prompt`` as a conversation with
fixed assistant turns, or ``turns`` (the user's turns; the model's replies generated), see
:func:`~rasa_trainer.evaluation.evaluate.evaluate_safety`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from ..data.contract import _conversation_problem, validate_eval_sets
from .evaluate import EVAL_SET_NAMES, _validated_sets
from ..data.pairs import _as_table, _column, _columns_of, _require_columns, read_text
from ..utils import atomic_write_json

__all__ = [
    "flatten_lm_eval_results",
    "load_attacks",
    "load_eval_sets",
    "load_xstest",
    "run_lm_eval",
    "write_eval_sets",
]

PathLike = Union[str, os.PathLike]
Rows = list[dict[str, Any]]
Table = Union[PathLike, Sequence[Mapping[str, Any]], Any]  # a table file, a list of dicts or a datasets.Dataset

XSTEST_LABELS = {"safe": "over_refusal", "unsafe": "anchors"}
"""Where each XSTest label goes: safe prompts measure over-refusal, unsafe ones the refusal of harmful requests."""
TRUE_STRINGS, FALSE_STRINGS = ("true", "1", "yes"), ("false", "0", "no", "")
MAX_LISTED = 10


class _Problems:
    """Collects every problem of a table and raises one ValueError listing the first few."""

    def __init__(self, where: str):
        self.where = where
        self.items: list[str] = []

    def add(self, row: int, column: str, message: str) -> None:
        self.items.append(f"row {row}, column {column!r}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = "\n".join(f"  - {p}" for p in self.items[:MAX_LISTED])
            more = f" (showing the first {MAX_LISTED})" if len(self.items) > MAX_LISTED else ""
            raise ValueError(f"{self.where}: {len(self.items)} problem(s){more}:\n{shown}")


def _check_prompts(prompts: list[Any], column: str, problems: _Problems) -> None:
    """The pair contract's rules for a context: non-empty text, or chat messages in a valid role order."""
    for i, prompt in enumerate(prompts):
        problem = _conversation_problem(prompt)
        if problem:
            problems.add(i, column, problem)


# --------------------------------------------------------------------------------------------------------------------
# XSTest
# --------------------------------------------------------------------------------------------------------------------


def load_xstest(
    source: Table,
    prompt_column: str = "prompt",
    label_column: str = "label",
    type_column: str | None = "type",
) -> dict[str, Rows]:
    """Split an XSTest-style table into ``{"over_refusal": safe rows, "anchors": unsafe rows}``.

    Rows become ``{"prompt": ..., "type": ...}`` (over-refusal) and ``{"prompt": ..., "goal": prompt, "type": ...}``
    (anchors), in file order; ``type`` (XSTest's prompt category) is copied when the column exists. Labels are read
    case-insensitively.

    Args:
        source: a table file (see :func:`rasa_trainer.data.pairs.read_table`; XSTest ships CSV), a list of dicts or a
            ``datasets.Dataset``.
        prompt_column / label_column / type_column: the column names (``type_column=None`` skips the category).

    Raises:
        ValueError: a missing column, an empty prompt, or a label other than safe / unsafe; every problem is listed
            with its row and column.
    """
    table, where = _as_table(source)
    _require_columns(_columns_of(table), [prompt_column, label_column], where)
    prompts, labels = _column(table, prompt_column), _column(table, label_column)
    types = _column(table, type_column) if type_column and type_column in _columns_of(table) else None
    problems = _Problems(where)
    _check_prompts(prompts, prompt_column, problems)
    sets: dict[str, Rows] = {"over_refusal": [], "anchors": []}
    for i, (prompt, label) in enumerate(zip(prompts, labels)):
        target = XSTEST_LABELS.get(str(label).strip().lower()) if isinstance(label, str) else None
        if target is None:
            problems.add(i, label_column, f"{label!r} is not a label; expected 'safe' or 'unsafe'")
            continue
        row = {"prompt": prompt, **({"goal": prompt} if target == "anchors" else {})}
        if types is not None and types[i] is not None:
            row["type"] = types[i]
        sets[target].append(row)
    problems.raise_if_any()
    return sets


# --------------------------------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------------------------------


def load_attacks(
    source: Table,
    prompt_column: str = "prompt",
    attack_column: str = "attack",
    goal_column: str = "goal",
    held_out_column: str = "held_out",
    held_out_attacks: Iterable[str] = (),
) -> Rows:
    """The ``attacks`` evaluation set from a table of jailbreaks.

    Rows become ``{"prompt", "attack", "held_out"}`` plus ``goal`` when the row has one, in file order. ``prompt`` is a
    string or chat messages (checked with the pair contract's rules); ``attack`` (the family) is required.

    Args:
        source: a table file (see :func:`rasa_trainer.data.pairs.read_table`), a list of dicts or a ``datasets.Dataset``.
        prompt_column / attack_column: required columns.
        goal_column / held_out_column: optional columns. ``held_out`` is a bool, or in text files one of
            true/false/1/0/yes/no (empty = false).
        held_out_attacks: families to mark held out (kept out of alignment), on top of the ``held_out`` column; a
            name that is no family of the table is an error (a typo would silently mark nothing).

    Raises:
        ValueError: a missing column, an empty prompt or attack name, a bad ``held_out`` value, an unknown held-out
            family; every problem is listed with its row and column.
    """
    table, where = _as_table(source)
    columns = _columns_of(table)
    _require_columns(columns, [prompt_column, attack_column], where)
    prompts, attacks = _column(table, prompt_column), _column(table, attack_column)
    goals = _column(table, goal_column) if goal_column in columns else [None] * len(prompts)
    flags = _column(table, held_out_column) if held_out_column in columns else [False] * len(prompts)
    problems = _Problems(where)
    _check_prompts(prompts, prompt_column, problems)
    held_out = _held_out_flags(flags, held_out_column, problems)
    for i, (attack, goal) in enumerate(zip(attacks, goals)):
        if not isinstance(attack, str) or not attack.strip():
            problems.add(i, attack_column, f"{attack!r}; every attack row needs its family name")
        if goal is not None and not isinstance(goal, str):
            problems.add(i, goal_column, f"has type {type(goal).__name__}; expected a string (or empty)")
    problems.raise_if_any()
    extra = set(held_out_attacks)
    unknown = sorted(extra - set(attacks))
    if unknown:
        raise ValueError(f"{where}: held_out_attacks {unknown} are not attack families of the table (families: "
                         f"{sorted(set(attacks))})")
    rows = []
    for prompt, attack, goal, flag in zip(prompts, attacks, goals, held_out):
        row = {"prompt": prompt, "attack": attack, "held_out": flag or attack in extra}
        if goal:  # an empty cell of a CSV means "no goal"
            row["goal"] = goal
        rows.append(row)
    return rows


def _held_out_flags(values: list[Any], column: str, problems: _Problems) -> list[bool]:
    flags = []
    for i, value in enumerate(values):
        if value is None or isinstance(value, bool):
            flags.append(bool(value))
        elif isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + FALSE_STRINGS:
            flags.append(value.strip().lower() in TRUE_STRINGS)
        else:
            problems.add(i, column, f"{value!r} is not a bool; use true/false")
            flags.append(False)
    return flags


# --------------------------------------------------------------------------------------------------------------------
# Merging and writing
# --------------------------------------------------------------------------------------------------------------------


def load_eval_sets(
    xstest: Table | None = None,
    attacks: Table | None = None,
    existing: Mapping[str, Sequence[Mapping[str, Any]]] | PathLike | None = None,
    held_out_attacks: Iterable[str] = (),
) -> dict[str, Rows]:
    """Build an ``eval_sets`` dict for :func:`~rasa_trainer.evaluation.evaluate.evaluate_safety`.

    Args:
        xstest: an XSTest-style table (see :func:`load_xstest`): safe prompts to ``over_refusal``, unsafe ones to
            ``anchors``.
        attacks: a table of jailbreaks (see :func:`load_attacks`) for ``attacks``.
        existing: evaluation sets to extend (a dict, or the path of a JSON file holding one, e.g. from
            ``SafetyWorld.eval_sets()`` or :func:`write_eval_sets`); the new rows come after its rows, set by set.
        held_out_attacks: passed to :func:`load_attacks`.

    Returns:
        A new dict (``existing`` is not modified), checked with the same rules ``evaluate_safety`` applies.

    Raises:
        ValueError: nothing given, an unknown set name in ``existing``, or malformed rows (named).
    """
    if xstest is None and attacks is None and existing is None:
        raise ValueError("nothing to load: give xstest, attacks and/or existing")
    merged = {name: list(rows) for name, rows in _existing_sets(existing).items()}
    new: dict[str, Rows] = {}
    if xstest is not None:
        new.update(load_xstest(xstest))
    if attacks is not None:
        new["attacks"] = load_attacks(attacks, held_out_attacks=held_out_attacks)
    elif held_out_attacks:
        raise ValueError("held_out_attacks needs an attacks table")
    for name, rows in new.items():
        if rows or name == "attacks":  # an XSTest table may hold one label only: its other set is not an empty set
            merged[name] = merged.get(name, []) + rows
    validate_eval_sets(merged, EVAL_SET_NAMES, where=_sources(xstest, attacks, existing))
    _validated_sets(merged)  # the exact checks evaluate_safety runs, before any generation
    return merged


def _sources(*tables: Any) -> str:
    """How evaluation sets built from ``tables`` are named in errors: the files they came from."""
    files = [str(t) for t in tables if isinstance(t, (str, os.PathLike))]
    return f"the evaluation sets from {', '.join(files)}" if files else "the evaluation sets"


def _existing_sets(existing: Mapping[str, Sequence[Mapping[str, Any]]] | PathLike | None) -> Mapping[str, Any]:
    if existing is None:
        return {}
    if isinstance(existing, (str, os.PathLike)):
        try:
            existing = json.loads(read_text(existing))
        except json.JSONDecodeError as err:
            raise ValueError(f"{existing}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(existing, Mapping):
        raise ValueError(f"existing evaluation sets must be a dict of lists of rows, got {type(existing).__name__}")
    unknown = sorted(set(existing) - set(EVAL_SET_NAMES))
    if unknown:
        raise ValueError(f"existing evaluation sets hold unknown sets {unknown}; expected some of "
                         f"{list(EVAL_SET_NAMES)}")
    return existing


def write_eval_sets(eval_sets: Mapping[str, Sequence[Mapping[str, Any]]], path: PathLike) -> Path:
    """Check ``eval_sets`` (every row with the pair contract's rules, no empty set; then as ``evaluate_safety`` does)
    and write it as indented JSON to ``path`` atomically."""
    validate_eval_sets(eval_sets, EVAL_SET_NAMES)
    _validated_sets(eval_sets)
    atomic_write_json({name: list(rows) for name, rows in eval_sets.items()}, path)
    return Path(path)


# --------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# --------------------------------------------------------------------------------------------------------------------


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    include_path: PathLike | Sequence[PathLike] | None = None,
    batch_size: int | str = 1,
    hflm_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Run lm-evaluation-harness tasks on an in-memory model; return ``{"<task>/<metric>": value}``.

    Calls ``lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, ...), tasks=tasks, ...)``.
    Metric keys drop lm_eval's default filter (``"acc,none"`` becomes ``"<task>/acc"``); other filters stay as a
    suffix (``"<task>/exact_match/strict-match"``). Non-numeric entries (aliases, ``"N/A"`` stderrs) are left out.
    The model's train/eval mode is restored afterwards. lm_eval may give a tokenizer without a pad token one.

    Args:
        model: a ``transformers`` causal LM (it stays where it is; lm_eval runs on its device).
        tokenizer: its tokenizer.
        tasks: task names (registered, or defined by YAML files under ``include_path``).
        include_path: directory (or directories) of custom task YAML files, for a ``lm_eval.tasks.TaskManager``.
        batch_size: passed to ``HFLM``.
        hflm_kwargs: further ``HFLM`` arguments (e.g. ``max_length``).
        **kwargs: passed to ``lm_eval.simple_evaluate`` (e.g. ``limit``, ``num_fewshot``,
            ``apply_chat_template=True``, ``task_manager``); ``log_samples`` defaults to ``False``.

    Returns:
        The flat metrics; an empty dict on processes other than rank 0 under distributed evaluation (lm_eval returns
        results on rank 0 only).

    Raises:
        ImportError: lm_eval is not installed (``pip install lm_eval``).
        ValueError: no tasks, or both ``include_path`` and ``task_manager``.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if include_path is not None:
        if "task_manager" in kwargs:
            raise ValueError("give include_path or task_manager, not both")
        paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        kwargs["task_manager"] = TaskManager(include_path=[str(p) for p in paths])
    kwargs.setdefault("log_samples", False)  # per-sample logs can be large and are not returned
    training = getattr(model, "training", False)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **dict(hflm_kwargs or {}))
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, **kwargs)
    finally:
        model.train(training)  # HFLM switches the model to eval mode
    return flatten_lm_eval_results(results) if results is not None else {}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            "run_lm_eval needs lm-evaluation-harness: pip install 'rasa-trainer[lm_eval]' (or pip install lm_eval)"
        ) from err
    return lm_eval, HFLM, TaskManager


def flatten_lm_eval_results(results: Mapping[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>[/<filter>]": value}`` from the ``results`` section of ``lm_eval.simple_evaluate``'s output
    (the ``none`` filter is dropped from the key; non-numeric values are left out)."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # 'alias', 'name', 'sample_len' and 'N/A' stderrs are not metrics
            metric, filter_name = key.split(",", 1)
            flat[f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}/{filter_name}"] = float(value)
    return flat
