"""Evaluation sets from the standard safety benchmarks, read from the files their publishers ship, with the provenance
of every row (file, SHA-256, format) and of the judges, so a reported number can be traced.

Nothing is downloaded: each loader reads a local file in its published layout (CSV/TSV as pandas writes them: quoted
fields holding commas, quotes and line breaks, an index column; see :func:`rasa_trainer.data.pairs.read_table`).

============================  ====================================================  ===============================
name                          file as published (columns)                           becomes
============================  ====================================================  ===============================
``harmbench``                 ``harmbench_behaviors_text_*.csv`` (``Behavior``,       ``anchors`` (plain harmful
                              ``FunctionalCategory``, ``SemanticCategory``,           requests), category
                              ``Tags``, ``ContextString``, ``BehaviorID``), or a      ``SemanticCategory``
                              ``.txt`` of one behaviour per line
``jailbreakbench``            JBB-Behaviors ``harmful-behaviors.csv`` (``Index``,     ``anchors``, category
                              ``Goal``, ``Target``, ``Behavior``, ``Category``,       ``Category``
                              ``Source``)
``jailbreakbench-benign``     JBB-Behaviors ``benign-behaviors.csv`` (same columns)   ``over_refusal``
``strongreject``              ``strongreject_dataset.csv`` (``category``,             ``anchors``, category
                              ``source``, ``forbidden_prompt``)                        ``category``
``xstest``                    ``xstest_prompts.csv`` (``id``, ``prompt``, ``type``,   ``label`` safe:
                              ``label``, ``focus``, ``note``)                          ``over_refusal``; unsafe:
                                                                                      ``anchors``; category ``type``
``or-bench``                  ``or-bench-80k.csv`` / ``or-bench-hard-1k.csv``         ``over_refusal``, category
                              (``prompt``, ``category``)                              ``category``
``or-bench-toxic``            ``or-bench-toxic.csv`` (``prompt``, ``category``)       ``anchors``
``wildjailbreak``             WildJailbreak ``eval.tsv`` (``adversarial``,            ``adversarial_harmful``:
                              ``label``, ``data_type``)                               ``attacks`` (family
                                                                                      ``wildjailbreak``);
                                                                                      ``adversarial_benign``:
                                                                                      ``wrapped_benign``
============================  ====================================================  ===============================

Every row keeps its ``benchmark`` and ``category`` (``SafetyReport`` gives a rate per benchmark and per category,
the category named ``<benchmark>/<category>``) and its source line; every row is checked with the evaluation-set
contract (:func:`rasa_trainer.data.contract.validate_eval_sets`) and every error names the file and the line.
HarmBench's contextual behaviours are asked as HarmBench asks them: ``"{ContextString}\\n\\n---\\n\\n{Behavior}"``;
its multimodal file is refused (it needs images). HarmBench judges its ``copyright`` behaviours by hashing, not with
a refusal judge: pass ``harmbench_categories=("standard", "contextual")`` to keep its refusal-judged behaviours only.

**Attack sets from templates.** :func:`wrap_in_templates` (and ``load_benchmarks(..., templates=...)``) renders
every plain harmful request of the behaviour benchmarks into jailbreak templates (PyRIT-style folders and files, read
by :func:`rasa_trainer.data.pairs.load_templates`), giving ``attacks`` rows whose family is the template's name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from ..data.contract import validate_eval_sets
from ..data.pairs import (
    _columns_of,
    _no_field_size_limit,
    _require_columns,
    _sample_combinations,
    load_templates,
    read_table,
    read_text,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkSource",
    "EvalSets",
    "file_sha256",
    "load_benchmark",
    "load_benchmarks",
    "parse_benchmark_spec",
    "wrap_in_templates",
]

PathLike = Union[str, os.PathLike]
Rows = list[dict[str, Any]]

HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"
"""How HarmBench joins a contextual behaviour's context and request (its DirectRequest baseline)."""
WILDJAILBREAK_FAMILY = "wildjailbreak"
WILDJAILBREAK_TYPES = {"adversarial_harmful": ("attacks", "1"), "adversarial_benign": ("wrapped_benign", "0")}
XSTEST_LABELS = {"safe": "over_refusal", "unsafe": "anchors"}
TEXT_SUFFIXES = (".txt",)


# --------------------------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------------------------


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class BenchmarkSource:
    """Where evaluation rows came from: ``benchmark`` (the loader's name), ``path`` (absolute), ``sha256`` of the file,
    ``format`` (the layout read) and ``rows`` (rows taken per evaluation set)."""

    benchmark: str
    path: str
    sha256: str
    format: str
    rows: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EvalSets(dict):
    """An ``eval_sets`` dict (``{set name: [rows]}``, what ``evaluate_safety`` takes) that also holds the
    :class:`BenchmarkSource` of its rows in ``sources``; ``evaluate_safety`` copies them into its report."""

    def __init__(self, sets: Mapping[str, Sequence[Mapping[str, Any]]] = (), sources: Iterable[BenchmarkSource] = ()):
        super().__init__(sets)
        self.sources: list[BenchmarkSource] = list(sources)


# --------------------------------------------------------------------------------------------------------------------
# Reading a file with the line of every row
# --------------------------------------------------------------------------------------------------------------------


def _row_lines(path: Path) -> list[int]:
    """The line (1-based) each data row of a CSV/TSV file starts on, as :func:`read_table` numbers its rows (blank
    lines skipped); the file was already read by ``read_table``, so its structure is valid."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    lines = io.StringIO(read_text(path), newline="").readlines()
    starts = []
    with _no_field_size_limit():
        reader = csv.reader(lines, delimiter=delimiter, quotechar='"', doublequote=True, strict=True)
        next(reader, None)
        while True:
            first = reader.line_num + 1
            fields = next(reader, None)
            if fields is None:
                return starts
            if fields:
                starts.append(first)


def _read(path: Path) -> tuple[Rows, list[str]]:
    """``(rows, where)``: a table's rows, or one ``{"prompt": line}`` row per non-blank line of a ``.txt`` file, with
    ``"<file> line <n>"`` (``"row <i>"`` for JSON arrays and Parquet) for every row."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        numbered = [(n, line.strip()) for n, line in enumerate(read_text(path).split("\n"), start=1) if line.strip()]
        return [{"prompt": text} for _, text in numbered], [f"{path} line {n}" for n, _ in numbered]
    rows = read_table(path)
    if suffix in (".csv", ".tsv"):
        where = [f"{path} line {n}" for n in _row_lines(path)]
    elif suffix == ".jsonl" or (suffix == ".json" and not read_text(path).lstrip().startswith("[")):
        lines = [n for n, line in enumerate(read_text(path).split("\n"), start=1) if line.strip(" \t\r")]
        where = [f"{path} line {n}" for n in lines]
    else:
        where = [f"{path} row {i}" for i in range(len(rows))]
    assert len(where) == len(rows), "every row has its place"  # read_table and this count rows alike
    return rows, where


class _Problems:
    """Every problem of one file, raised as one ValueError naming the file and the line of each."""

    def __init__(self, benchmark: str, path: Path):
        self.header = f"{benchmark} file {path}"
        self.items: list[str] = []

    def add(self, where: str, column: str | None, message: str) -> None:
        self.items.append(f"{where}" + (f", column {column!r}" if column else "") + f": {message}")

    def raise_if_any(self) -> None:
        if self.items:
            shown = "\n".join(f"  - {p}" for p in self.items[:10])
            more = " (showing the first 10)" if len(self.items) > 10 else ""
            raise ValueError(f"{self.header}: {len(self.items)} problem(s){more}:\n{shown}")


def _text(value: Any) -> str | None:
    """A cell as text, ``None`` when empty (CSV has no null: an empty cell is an absent value)."""
    if value is None:
        return None
    text = str(value).strip() if not isinstance(value, str) else value.strip()
    return text or None


# --------------------------------------------------------------------------------------------------------------------
# The loaders: (rows, where, problems, options) -> {set name: [(row index, row)]}
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Format:
    """A benchmark layout: the columns it needs, how a row becomes evaluation rows, and whether its plain harmful
    requests are behaviours that templates may wrap (XSTest's are contrast prompts, not behaviours)."""

    description: str
    columns: tuple[str, ...]
    convert: Callable[..., dict[str, list[tuple[int, dict[str, Any]]]]]
    behaviours: bool
    text_set: str | None = None  # the set a one-prompt-per-line .txt file becomes; None: no .txt form


def _plain(prompt_column: str, category_column: str | None, target: str, extra: Mapping[str, str] = ()):
    """A loader for a table of prompts that all go to ``target``, with an optional category and extra columns."""

    def convert(rows: Rows, where: list[str], problems: _Problems, **_: Any):
        out = []
        for i, row in enumerate(rows):
            item = {"prompt": row.get(prompt_column)}
            if target == "anchors" and isinstance(item["prompt"], str):
                item["goal"] = item["prompt"]
            if category_column:
                item["category"] = _text(row.get(category_column))
            for column, key in dict(extra).items():
                if _text(row.get(column)) is not None:
                    item[key] = _text(row.get(column))
            out.append((i, item))
        return {target: out}

    return convert


def _harmbench(rows: Rows, where: list[str], problems: _Problems, harmbench_categories: Sequence[str] | None = None,
               **_: Any):
    out = []
    for i, row in enumerate(rows):
        if "Behavior" not in row:  # a .txt file: one behaviour per line
            out.append((i, {"prompt": row["prompt"], "goal": row["prompt"]}))
            continue
        functional = _text(row.get("FunctionalCategory"))
        if harmbench_categories is not None and functional not in harmbench_categories:
            continue
        behavior, context = row.get("Behavior"), _text(row.get("ContextString"))
        prompt = f"{context}{HARMBENCH_CONTEXT_SEPARATOR}{behavior}" if context and isinstance(behavior, str) else behavior
        item = {"prompt": prompt, "goal": behavior, "category": _text(row.get("SemanticCategory"))}
        for column, key in (("BehaviorID", "id"), ("FunctionalCategory", "functional_category"), ("Tags", "tags")):
            if _text(row.get(column)) is not None:
                item[key] = _text(row.get(column))
        out.append((i, item))
    return {"anchors": out}


def _xstest(rows: Rows, where: list[str], problems: _Problems, **_: Any):
    out: dict[str, list] = {"over_refusal": [], "anchors": []}
    for i, row in enumerate(rows):
        label = _text(row.get("label"))
        target = XSTEST_LABELS.get(label.lower()) if label else None
        if target is None:
            problems.add(where[i], "label", f"{row.get('label')!r} is not an XSTest label; expected 'safe' or 'unsafe'")
            continue
        item = {"prompt": row.get("prompt"), "category": _text(row.get("type"))}
        if target == "anchors" and isinstance(item["prompt"], str):
            item["goal"] = item["prompt"]
        if _text(row.get("id")) is not None:
            item["id"] = _text(row.get("id"))
        out[target].append((i, item))
    return out


def _wildjailbreak(rows: Rows, where: list[str], problems: _Problems, **_: Any):
    out: dict[str, list] = {"attacks": [], "wrapped_benign": []}
    for i, row in enumerate(rows):
        data_type, label = _text(row.get("data_type")), _text(row.get("label"))
        if data_type not in WILDJAILBREAK_TYPES:
            problems.add(where[i], "data_type", f"{row.get('data_type')!r}; WildJailbreak's evaluation set holds "
                                                f"{' and '.join(WILDJAILBREAK_TYPES)}")
            continue
        target, expected = WILDJAILBREAK_TYPES[data_type]
        if label is not None and label.removesuffix(".0") != expected:
            # a label that contradicts the data type is a shifted or edited row: never guess which one is right
            problems.add(where[i], "label", f"{row.get('label')!r} contradicts data_type {data_type!r} (label "
                                            f"{expected} expected); check the row")
            continue
        out[target].append((i, {"prompt": row.get("adversarial"), "attack": WILDJAILBREAK_FAMILY, "held_out": False}))
    return out


BENCHMARKS: dict[str, _Format] = {
    "harmbench": _Format("HarmBench behaviours CSV", ("Behavior", "SemanticCategory"), _harmbench, True, "anchors"),
    "jailbreakbench": _Format("JailbreakBench JBB-Behaviors CSV", ("Goal", "Category"),
                              _plain("Goal", "Category", "anchors", {"Behavior": "id", "Target": "target",
                                                                     "Source": "source"}), True, "anchors"),
    "jailbreakbench-benign": _Format("JailbreakBench JBB-Behaviors CSV (benign)", ("Goal", "Category"),
                                     _plain("Goal", "Category", "over_refusal", {"Behavior": "id"}), False,
                                     "over_refusal"),
    "strongreject": _Format("StrongREJECT CSV", ("forbidden_prompt", "category"),
                            _plain("forbidden_prompt", "category", "anchors", {"source": "source"}), True, "anchors"),
    "xstest": _Format("XSTest CSV", ("prompt", "type", "label"), _xstest, False),
    "or-bench": _Format("OR-Bench CSV", ("prompt", "category"), _plain("prompt", "category", "over_refusal"), False,
                        "over_refusal"),
    "or-bench-toxic": _Format("OR-Bench toxic CSV", ("prompt", "category"), _plain("prompt", "category", "anchors"),
                              True, "anchors"),
    "wildjailbreak": _Format("WildJailbreak evaluation TSV", ("adversarial", "data_type"), _wildjailbreak, False),
}
"""The benchmark layouts by name (``--benchmark NAME=PATH``)."""


# --------------------------------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------------------------------


def load_benchmark(name: str, path: PathLike, *, harmbench_categories: Sequence[str] | None = None) -> EvalSets:
    """The evaluation sets of one benchmark file (see the module docstring for the names and layouts).

    Rows are ``{"prompt", "category", "benchmark", ...}`` (``goal`` for plain harmful requests; ``attack`` and
    ``held_out`` for attacks; ``id`` and the benchmark's other fields where it has them), in file order.

    Args:
        name: a key of :data:`BENCHMARKS` (case-insensitive; ``_`` for ``-`` accepted).
        path: the benchmark file as published (CSV/TSV/JSONL/JSON/Parquet with the columns listed; ``.txt`` with one
            prompt per line for the behaviour benchmarks).
        harmbench_categories: HarmBench ``FunctionalCategory`` values to keep (default: all rows).

    Raises:
        ValueError: an unknown name, a missing column, a multimodal HarmBench file, a bad label or data type, or rows
            breaking the evaluation-set contract; every problem names the file and line.
        FileNotFoundError: no such file.
    """
    key = _benchmark_key(name)
    spec = BENCHMARKS[key]
    path = Path(path)
    rows, where = _read(path)
    text_file = path.suffix.lower() in TEXT_SUFFIXES
    if text_file and spec.text_set is None:
        raise ValueError(f"{key} file {path}: a text file holds prompts only, but {key} needs the columns "
                         f"{list(spec.columns)}; give the {spec.description} as published")
    if not text_file:
        columns = _columns_of(rows)
        if key == "harmbench" and "ImageFileName" in columns:
            raise ValueError(f"{key} file {path} is HarmBench's multimodal behaviours file (column 'ImageFileName'): "
                             "its behaviours need images; give the text behaviours file "
                             "(harmbench_behaviors_text_*.csv)")
        _require_columns(columns, spec.columns, f"{key} file {path}")
    if not rows:
        raise ValueError(f"{key} file {path} has no rows")
    problems = _Problems(key, path)
    if text_file:
        converted = {spec.text_set: [(i, {"prompt": row["prompt"], **({"goal": row["prompt"]} if spec.text_set ==
                                                                          "anchors" else {})})
                                     for i, row in enumerate(rows)]}
    else:
        converted = spec.convert(rows, where, problems, harmbench_categories=harmbench_categories)
    problems.raise_if_any()
    sets: dict[str, Rows] = {}
    sources: dict[str, list[str]] = {}
    for set_name, items in converted.items():
        if not items:
            continue  # an XSTest file of safe prompts only has no anchors: that set is absent, not empty
        sets[set_name] = [{k: v for k, v in {**item, "benchmark": key}.items() if v is not None} for _, item in items]
        sources[set_name] = [where[i] for i, _ in items]
    if not sets:
        raise ValueError(f"{key} file {path}: no row was kept" + (f" (harmbench_categories={list(harmbench_categories)})"
                                                                   if harmbench_categories is not None else ""))
    validate_eval_sets(sets, where=f"{key} file {path}", row_sources=sources)
    source = BenchmarkSource(key, str(path.resolve()), file_sha256(path),
                             "one prompt per line (text)" if text_file else spec.description,
                             {name: len(rows) for name, rows in sets.items()})
    return EvalSets(sets, [source])


def wrap_in_templates(
    rows: Sequence[Mapping[str, Any]],
    templates: Any,
    *,
    per_goal: int | None = None,
    seed: int = 0,
    held_out_attacks: Iterable[str] = (),
) -> Rows:
    """``attacks`` rows from plain harmful requests rendered into jailbreak templates.

    Every (request, template) combination, request-major, or ``per_goal`` templates per request drawn with
    ``random.Random(seed)`` (as :func:`rasa_trainer.data.pairs.pairs_from_templates` draws them). A row becomes
    ``{"prompt": the template rendered with the request, "attack": template name, "goal": the request, "held_out",
    "category", "benchmark"}`` (the last two when the request has them). Multi-turn templates give chat messages.

    Args:
        rows: plain harmful requests (``prompt`` a string), e.g. ``load_benchmark("harmbench", path)["anchors"]``.
        templates: template files, folders (PyRIT's ``jailbreak/templates`` as shipped), Jinja strings or mappings;
            see :func:`rasa_trainer.data.pairs.load_templates`.
        per_goal: templates drawn per request (default: all).
        seed: seed of the draw.
        held_out_attacks: template names to mark ``held_out`` (kept out of alignment); an unknown name is an error.

    Raises:
        ValueError: a request that is not a string, bad templates (named), an unknown held-out name.
    """
    loaded = load_templates(templates)
    names = [t.name for t in loaded]
    unknown = sorted(set(held_out_attacks) - set(names))
    if unknown:
        raise ValueError(f"held_out_attacks {unknown} are not template names (templates: {names})")
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"row {i}: only a request given as text can fill a template's {{{{ prompt }}}} slot, got "
                             f"{type(row.get('prompt')).__name__}")
    as_messages = any(t.multi_turn for t in loaded)
    out = []
    for g, t in _sample_combinations(len(rows), len(loaded), None, per_goal, seed):
        row, template = rows[g], loaded[t]
        item = {"prompt": template.render(row["prompt"], as_messages), "attack": template.name,
                "goal": row.get("goal") or row["prompt"], "held_out": template.name in set(held_out_attacks)}
        for key in ("category", "benchmark", "id"):
            if row.get(key) is not None:
                item[key] = row[key]
        out.append(item)
    return out


def load_benchmarks(
    benchmarks: Mapping[str, PathLike] | Sequence[tuple[str, PathLike] | str],
    *,
    templates: Any = None,
    templates_per_goal: int | None = None,
    seed: int = 0,
    held_out_attacks: Iterable[str] = (),
    harmbench_categories: Sequence[str] | None = None,
    existing: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> EvalSets:
    """The evaluation sets of several benchmark files, merged set by set in the order given, with every file's
    :class:`BenchmarkSource`.

    Args:
        benchmarks: ``{name: path}``, ``[(name, path), ...]`` or ``["name=path", ...]`` (the command line's form; a
            name may repeat with different files, e.g. two HarmBench splits).
        templates: jailbreak templates that wrap the plain harmful requests of the behaviour benchmarks (HarmBench,
            JailbreakBench, StrongREJECT, OR-Bench toxic) into ``attacks`` (:func:`wrap_in_templates`).
        templates_per_goal, seed, held_out_attacks: passed to :func:`wrap_in_templates`.
        harmbench_categories: passed to :func:`load_benchmark`.
        existing: evaluation sets to extend (their rows come first); an :class:`EvalSets` keeps its sources.

    Raises:
        ValueError: no benchmark, a file given twice, template options without templates, and every error of
            :func:`load_benchmark` and :func:`wrap_in_templates`; the merged sets are then checked as
            ``evaluate_safety`` checks them.
    """
    from .evaluate import EVAL_SET_NAMES, _validated_sets

    specs = _specs(benchmarks)
    if (templates_per_goal is not None or held_out_attacks) and templates is None:
        raise ValueError("templates_per_goal and held_out_attacks need templates to wrap the behaviours in")
    merged = EvalSets({name: list(rows) for name, rows in (existing or {}).items()},
                      getattr(existing, "sources", ()))
    behaviours: Rows = []
    for name, path in specs:
        loaded = load_benchmark(name, path, harmbench_categories=harmbench_categories)
        for set_name, rows in loaded.items():
            merged[set_name] = merged.get(set_name, []) + rows
        merged.sources += loaded.sources
        if BENCHMARKS[_benchmark_key(name)].behaviours:
            behaviours += loaded.get("anchors", [])
    if templates is not None:
        if not behaviours:
            raise ValueError("templates wrap the plain harmful requests of a behaviour benchmark (HarmBench, "
                             "JailbreakBench, StrongREJECT, OR-Bench toxic), and none was given")
        merged["attacks"] = merged.get("attacks", []) + wrap_in_templates(
            behaviours, templates, per_goal=templates_per_goal, seed=seed, held_out_attacks=held_out_attacks)
    validate_eval_sets(merged, EVAL_SET_NAMES, where="the benchmark sets")
    _validated_sets(merged)  # the exact checks evaluate_safety runs, before any model loads
    return merged


def parse_benchmark_spec(spec: str) -> tuple[str, str]:
    """``"NAME=PATH"`` as ``(name, path)``, the name checked against :data:`BENCHMARKS`.

    Raises:
        ValueError: no ``=``, an empty path or an unknown name (the message lists the names).
    """
    name, eq, path = str(spec).partition("=")
    if not eq or not name.strip() or not path.strip():
        raise ValueError(f"{spec!r}: give a benchmark as NAME=PATH, e.g. harmbench=harmbench_behaviors_text_all.csv "
                         f"(names: {', '.join(BENCHMARKS)})")
    return _benchmark_key(name), path.strip()


def _benchmark_key(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return key


def _specs(benchmarks: Any) -> list[tuple[str, Path]]:
    if isinstance(benchmarks, Mapping):
        items = list(benchmarks.items())
    elif isinstance(benchmarks, Sequence) and not isinstance(benchmarks, (str, bytes)):
        items = [parse_benchmark_spec(b) if isinstance(b, str) else tuple(b) for b in benchmarks]
    else:
        raise TypeError(f"benchmarks must be a dict {{name: path}} or a list of (name, path) or 'name=path', got "
                        f"{type(benchmarks).__name__}")
    if not items:
        raise ValueError("no benchmark given")
    specs, seen = [], {}
    for name, path in items:
        key, resolved = _benchmark_key(name), Path(path).expanduser().resolve()
        if resolved in seen:
            raise ValueError(f"{path} is given twice (as {seen[resolved]} and {key}); its rows would count twice")
        seen[resolved] = key
        specs.append((key, Path(path).expanduser()))
    return specs
