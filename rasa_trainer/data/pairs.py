"""Build RASA pairs from the shapes public jailbreak data comes in.

Two builders turn common public shapes into the pair contract of :mod:`rasa_trainer.data.contract` (``prompt``,
``anchor_prompt``, optional ``completion``, ``goal``, ``attack``), validate every row with
:func:`~rasa_trainer.data.contract.validate_pairs` and return a :class:`datasets.Dataset`:

- :func:`pairs_from_columns`: a table that already holds both sides of each pair, by default the WildJailbreak shape
  (``adversarial``, ``vanilla``, ``data_type``; rows of type ``adversarial_harmful`` are kept).
- :func:`pairs_from_templates`: jailbreak templates crossed with a list of harmful goals. A template is Jinja text with
  a ``{{ prompt }}`` slot, given as a PyRIT-style YAML file (``name``, ``value``), a plain text file or a string; the
  goal fills the slot, and the goal asked plainly is the anchor.

**Multi-turn templates.** A template's value may be a list of turns instead of one text:

- a list of strings: the turns alternate ``user`` / ``assistant``, starting with ``user``; so an odd number of turns,
  the last one the user turn the model answers;
- a list of ``{"role", "content"}`` mappings: explicit roles, in the contract's order (an optional leading
  ``system``, then ``user`` / ``assistant`` alternating, starting and ending with ``user``).

Every turn is a Jinja template rendered with ``prompt`` = the goal (the slot must appear in at least one turn), and
the result is a list of chat messages. A single-turn template renders to a string, unless some template of the same
call is multi-turn: then every prompt is a message list, because a pair column holds one format.

**Template safety.** Templates are rendered in a sandboxed Jinja environment with ``StrictUndefined``: no attribute
access outside the sandbox, and a variable other than ``prompt`` is an error before anything is rendered. Goals are
inserted as values, never parsed as Jinja. Each rendered turn is stripped of leading and trailing whitespace (YAML
block scalars end with a newline).

:func:`write_pairs_jsonl` writes pairs to a JSON-lines file atomically. The ``rasa-trainer build-pairs`` command
(:mod:`rasa_trainer.cli.build_pairs`) drives both builders from the command line.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from datasets import Dataset
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

from .contract import DatasetContractError, _role_order_problem, validate_pairs
from ..utils import atomic_write

__all__ = [
    "AttackTemplate",
    "load_goals",
    "load_template",
    "load_templates",
    "pairs_from_columns",
    "pairs_from_templates",
    "read_table",
    "write_pairs_jsonl",
]

SLOT = "prompt"
"""The Jinja variable a template's goal fills: ``{{ prompt }}``."""

YAML_SUFFIXES = (".yaml", ".yml")
TEMPLATE_SUFFIXES = (*YAML_SUFFIXES, ".txt", ".j2", ".jinja", ".jinja2")
"""File suffixes taken from a template directory (YAML files are PyRIT-style; the others are plain Jinja text)."""
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

PathLike = Union[str, os.PathLike]
TemplateLike = Union["AttackTemplate", str, os.PathLike, Mapping[str, Any], Sequence[Any]]

# One sandboxed environment for every template: only Jinja, no Python objects reachable, unknown variables raise.
_JINJA = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


# --------------------------------------------------------------------------------------------------------------------
# Tables (shared with rasa_trainer.evaluation.eval_sets)
# --------------------------------------------------------------------------------------------------------------------


def read_table(path: PathLike) -> list[dict[str, Any]]:
    """Read the rows of a local table file as dicts.

    Supported: ``.jsonl`` (one JSON object per line; blank lines skipped), ``.json`` (a JSON array of objects, or
    JSON lines as ``Dataset.to_json`` writes them), ``.csv`` / ``.tsv`` (a header row; every value a string),
    ``.parquet``. Errors name the file and the line or row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported table format {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    if suffix in (".csv", ".tsv"):
        return _read_delimited(text, path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and text.lstrip().startswith("["):
        return _json_array(text, path)
    return _json_lines(text, path)


def _read_delimited(text: str, path: Path, delimiter: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    if not reader.fieldnames:
        raise ValueError(f"{path}: no header row")
    rows = []
    for i, row in enumerate(reader):
        # DictReader files surplus fields under None and fills missing ones with None: both mean a broken row
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}: row {i} (line {reader.line_num}) does not have the {len(reader.fieldnames)} "
                             f"fields of the header {reader.fieldnames}")
        rows.append(row)
    return rows


def _json_array(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} is a {type(rows[bad]).__name__}, expected a JSON object")
    return rows


def _json_lines(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number}: a {type(row).__name__}, expected a JSON object")
        rows.append(row)
    return rows


def _columns_of(data: Any) -> list[str]:
    """Column names of a Dataset, or the union of keys of a list of dicts (in first-seen order)."""
    if hasattr(data, "column_names"):
        return list(data.column_names)
    return list(dict.fromkeys(key for row in data for key in row))


def _column(data: Any, name: str) -> list[Any]:
    """One column as a list (column access on a Dataset: far cheaper than iterating its rows)."""
    if hasattr(data, "column_names"):
        return list(data[name])
    return [row.get(name) for row in data]


def _require_columns(present: Sequence[str], wanted: Sequence[str], where: str) -> None:
    missing = [name for name in wanted if name not in present]
    if missing:
        raise ValueError(f"{where} has no column {', '.join(repr(m) for m in missing)} (columns present: "
                         f"{list(present)}); pass the column name that holds it")


def _as_table(dataset: Any) -> tuple[Any, str]:
    """``(rows or Dataset, description for errors)`` of a Dataset, a list of dicts or a table file."""
    if isinstance(dataset, (str, os.PathLike)):
        return read_table(dataset), str(dataset)
    if hasattr(dataset, "column_names"):
        if isinstance(dataset.column_names, Mapping):
            raise ValueError(f"got a DatasetDict with splits {sorted(dataset.column_names)}; pass one split")
        return dataset, "the dataset"
    if isinstance(dataset, Sequence) and all(isinstance(row, Mapping) for row in dataset):
        return dataset, "the dataset"
    raise TypeError(f"expected a datasets.Dataset, a list of dicts or a table file path, got {type(dataset).__name__}")


# --------------------------------------------------------------------------------------------------------------------
# Validation with the source of each row
# --------------------------------------------------------------------------------------------------------------------

_ROW = re.compile(r"^row (\d+)")


def _validated(rows: list[dict[str, Any]], sources: list[str]) -> Dataset:
    """Validate the produced rows against the pair contract and return them as a Dataset.

    The contract errors are the usual ``row i, column 'c': ...`` ones, with the source of row ``i`` added (the input
    row, or the template and goal it came from), since the produced rows are numbered differently from the input.
    """
    try:
        validate_pairs(rows)
    except DatasetContractError as err:
        located = [_ROW.sub(lambda m: f"row {m[1]} ({sources[int(m[1])]})", e, count=1) for e in err.errors]
        raise DatasetContractError(located, err.total) from None
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------------------------------------------------
# pairs_from_columns
# --------------------------------------------------------------------------------------------------------------------


def pairs_from_columns(
    dataset: Dataset | Sequence[Mapping[str, Any]] | PathLike,
    adversarial_column: str = "adversarial",
    anchor_column: str = "vanilla",
    type_column: str | None = "data_type",
    keep_types: Sequence[str] | None = ("adversarial_harmful",),
    attack_column: str | None = None,
    goal_column: str | None = None,
    completion_column: str | None = None,
    attack_name: str | None = None,
) -> Dataset:
    """Pairs from a table that holds the adversarial prompt and the plain request of each pair in two columns.

    The defaults read the WildJailbreak shape (``adversarial``, ``vanilla``, ``data_type``) and keep its
    ``adversarial_harmful`` rows; other types (``vanilla_harmful``, ``*_benign``) have no adversarial/plain pair of a
    harmful goal. Every kept row becomes one pair, in input order; nothing else is dropped.

    Args:
        dataset: a ``datasets.Dataset``, a list of dicts, or a table file (see :func:`read_table`; WildJailbreak ships
            TSV). Values may be strings or chat messages (JSON files), as the pair contract allows.
        adversarial_column: the column copied to ``prompt``.
        anchor_column: the column copied to ``anchor_prompt``.
        type_column: the column whose value selects the rows; ``None`` keeps every row.
        keep_types: the values of ``type_column`` kept; ``None`` keeps every row.
        attack_column: a column copied to ``attack`` (the attack family, for per-attack reports).
        goal_column: a column copied to ``goal``.
        completion_column: a column copied to ``completion`` (the refusal to train toward).
        attack_name: one ``attack`` value for every row, when there is no ``attack_column`` (e.g. ``"wildjailbreak"``).

    Raises:
        ValueError: a named column is missing (the message lists the columns present), or no row has a kept type.
        DatasetContractError: produced rows break the pair contract; each error names the produced row and its input
            row.
    """
    if attack_column is not None and attack_name is not None:
        raise ValueError("give attack_column or attack_name, not both")
    table, where = _as_table(dataset)
    filtering = type_column is not None and keep_types is not None
    outputs = {"prompt": adversarial_column, "anchor_prompt": anchor_column, "attack": attack_column,
               "goal": goal_column, "completion": completion_column}
    outputs = {target: source for target, source in outputs.items() if source is not None}
    _require_columns(_columns_of(table), [*outputs.values(), *([type_column] if filtering else [])], where)

    kept = _kept_rows(table, type_column, keep_types, where) if filtering else list(range(len(table)))
    columns = {target: _column(table, source) for target, source in outputs.items()}
    rows = [{target: values[i] for target, values in columns.items()} for i in kept]
    if attack_name is not None:
        for row in rows:
            row["attack"] = attack_name
    return _validated(rows, [f"input row {i}" for i in kept])


def _kept_rows(table: Any, type_column: str, keep_types: Sequence[str], where: str) -> list[int]:
    if isinstance(keep_types, str):
        keep_types = [keep_types]  # a lone string would otherwise be read as a set of characters
    types = _column(table, type_column)
    kept = [i for i, value in enumerate(types) if value in keep_types]
    if not kept:
        present = sorted({str(v) for v in types})
        raise ValueError(f"no row of {where} has {type_column!r} in {list(keep_types)} (values present: "
                         f"{present[:20]}); pass keep_types=... or type_column=None to keep every row")
    return kept


# --------------------------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackTemplate:
    """A jailbreak template: the attack family name and its turns.

    Attributes:
        name: the attack family (the ``attack`` column of the pairs).
        turns: ``(role, Jinja source)`` per message; one ``user`` turn is a single-turn template.
        origin: where the template came from, for error messages.

    Construction checks the roles, compiles every turn in the sandbox and requires the ``{{ prompt }}`` slot in some
    turn; every error names the template.
    """

    name: str
    turns: tuple[tuple[str, str], ...]
    origin: str = "<string>"
    _compiled: tuple[Any, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"template from {self.origin}: the name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "turns", tuple((role, source) for role, source in self.turns))
        if not self.turns:
            raise ValueError(f"template {self.name!r} ({self.origin}) has no turns")
        problem = _role_order_problem([role for role, _ in self.turns])
        if problem:
            raise ValueError(f"template {self.name!r} ({self.origin}): {problem}")
        object.__setattr__(self, "_compiled", tuple(self._compile(j, src) for j, (_, src) in enumerate(self.turns)))
        if not any(has_slot for _, has_slot in self._compiled):
            raise ValueError(f"template {self.name!r} ({self.origin}) has no {{{{ {SLOT} }}}} slot for the goal; add "
                             f"{{{{ {SLOT} }}}} where the harmful request goes")

    def _compile(self, j: int, source: str) -> Any:
        where = f"template {self.name!r} ({self.origin})" + (f", turn {j}" if len(self.turns) > 1 else "")
        if not isinstance(source, str):
            raise ValueError(f"{where}: expected text, got {type(source).__name__}")
        try:
            variables = meta.find_undeclared_variables(_JINJA.parse(source))
            compiled = _JINJA.from_string(source)
        except TemplateSyntaxError as err:
            raise ValueError(f"{where}: Jinja syntax error at line {err.lineno}: {err.message}") from None
        extra = sorted(variables - {SLOT})
        if extra:
            raise ValueError(f"{where} uses the variables {extra}; only {{{{ {SLOT} }}}} is filled (with the goal)")
        return compiled, SLOT in variables

    @property
    def multi_turn(self) -> bool:
        """Whether the template has several turns (it renders to chat messages)."""
        return len(self.turns) > 1

    def render(self, goal: str, as_messages: bool = False) -> str | list[dict[str, str]]:
        """Fill the slot with ``goal``: a string for a single-turn template (unless ``as_messages``), else messages.

        Each turn is stripped of surrounding whitespace.
        """
        try:
            texts = [compiled.render({SLOT: goal}).strip() for compiled, _ in self._compiled]
        except TemplateError as err:  # e.g. an attribute the sandbox refuses, a filter that fails
            raise ValueError(f"template {self.name!r} ({self.origin}) failed to render: {err}") from None
        if not self.multi_turn and not as_messages:
            return texts[0]
        return [{"role": role, "content": text} for (role, _), text in zip(self.turns, texts)]


def load_template(source: TemplateLike, name: str | None = None) -> AttackTemplate:
    """One template from any accepted form.

    Args:
        source: an :class:`AttackTemplate`; a path (``str`` or ``Path``) to a PyRIT-style YAML file (a mapping with
            ``value`` and optionally ``name``) or a plain text file (the whole text is the template); a string holding
            ``{{`` (Jinja text); a mapping ``{"name"?, "value"}`` (a loaded PyRIT YAML); or a list of turns (strings,
            alternating user/assistant, or ``{"role", "content"}`` mappings).
        name: the attack name of a source that carries none of its own (a string, a list, a mapping without
            ``name``); default ``"template"``. Files are named by their YAML ``name``, else their stem.

    Raises:
        ValueError: no ``{{ prompt }}`` slot, other variables, bad turns or roles, an unreadable YAML, a string that
            is neither a file nor Jinja text; each message names the template.
        FileNotFoundError: a ``Path`` that does not exist.
    """
    name = name or "template"
    if isinstance(source, AttackTemplate):
        return source
    if isinstance(source, os.PathLike):
        return _template_file(Path(source))
    if isinstance(source, str):
        if Path(source).is_file():
            return _template_file(Path(source))
        if "{{" not in source and "{%" not in source:
            raise ValueError(f"template {source[:80]!r} is not an existing file and has no {{{{ {SLOT} }}}} slot; pass "
                             "a template file, a directory of them, or Jinja text with the slot")
        return AttackTemplate(name, (("user", source),))
    if isinstance(source, Mapping):
        return _template_mapping(source, name, "<mapping>")
    if isinstance(source, Sequence):
        return AttackTemplate(name, _turns(source, name, "<list>"), "<list>")
    raise TypeError(f"a template must be a path, a string, a mapping or a list of turns, got {type(source).__name__}")


def _template_file(path: Path) -> AttackTemplate:
    if not path.is_file():
        raise FileNotFoundError(f"template file {path} not found")
    if path.suffix.lower() not in YAML_SUFFIXES:
        return AttackTemplate(path.stem, (("user", path.read_text(encoding="utf-8")),), str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"template {path}: invalid YAML ({err})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"template {path}: expected a YAML mapping with a 'value' field, got {type(data).__name__}")
    return _template_mapping(data, path.stem, str(path))


def _template_mapping(data: Mapping[str, Any], name: str | None, origin: str) -> AttackTemplate:
    """A PyRIT-style mapping: ``value`` (text or turns), ``name`` (else the given name); other fields are ignored."""
    name = data.get("name") or name
    if "value" not in data:
        raise ValueError(f"template {name!r} ({origin}) has no 'value' field (fields present: {sorted(data)}); a "
                         "PyRIT-style template puts the Jinja text in 'value'")
    value = data["value"]
    turns = (("user", value),) if isinstance(value, str) else _turns(value, name, origin)
    return AttackTemplate(str(name), turns, origin)


def _turns(value: Any, name: str, origin: str) -> tuple[tuple[str, str], ...]:
    """Turns of a multi-turn value: strings alternate user/assistant; mappings carry their role."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"template {name!r} ({origin}): 'value' must be text or a non-empty list of turns, got "
                         f"{type(value).__name__}")
    if all(isinstance(turn, str) for turn in value):
        return tuple(("user" if j % 2 == 0 else "assistant", turn) for j, turn in enumerate(value))
    if all(isinstance(turn, Mapping) and {"role", "content"} <= set(turn) for turn in value):
        return tuple((str(turn["role"]), turn["content"]) for turn in value)
    raise ValueError(f"template {name!r} ({origin}): turns must be all strings (alternating user/assistant) or all "
                     "{'role', 'content'} mappings")


def load_templates(templates: TemplateLike | Sequence[TemplateLike]) -> list[AttackTemplate]:
    """Templates from one source or a list of sources (see :func:`load_template`); a directory stands for every
    template file under it (suffixes in :data:`TEMPLATE_SUFFIXES`, recursively, in sorted order).

    A list of strings is a list of templates; wrap a multi-turn template given as a list in another list. Strings
    without a name are named ``template_<i>`` by position. Two templates with the same name are an error, since their
    pairs would merge into one attack family in reports.
    """
    items = [templates] if _is_single(templates) else list(templates)
    loaded: list[AttackTemplate] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            files = sorted(p for p in Path(item).rglob("*") if p.is_file() and p.suffix.lower() in TEMPLATE_SUFFIXES)
            if not files:
                raise ValueError(f"template directory {item} holds no template file ({', '.join(TEMPLATE_SUFFIXES)})")
            loaded += [load_template(p) for p in files]
        else:
            loaded.append(load_template(item, name=f"template_{i}"))
    if not loaded:
        raise ValueError("no templates given")
    _check_unique_names(loaded)
    return loaded


def _is_single(templates: Any) -> bool:
    return isinstance(templates, (str, os.PathLike, Mapping, AttackTemplate))


def _check_unique_names(templates: list[AttackTemplate]) -> None:
    origins: dict[str, list[str]] = {}
    for template in templates:
        origins.setdefault(template.name, []).append(template.origin)
    duplicates = {name: where for name, where in origins.items() if len(where) > 1}
    if duplicates:
        raise ValueError(f"templates share names (their pairs would merge into one attack family): {duplicates}; "
                         "give each template a distinct name")


# --------------------------------------------------------------------------------------------------------------------
# Goals
# --------------------------------------------------------------------------------------------------------------------


def load_goals(goals: PathLike | Sequence[str], column: str = "goal") -> list[str]:
    """Harmful goals from a list of strings or a file.

    Files: ``.txt`` (one goal per line; blank lines skipped, each line stripped) or a table (see :func:`read_table`;
    the goals are ``column``, e.g. AdvBench's ``goal``). Goals are kept in order, duplicates included.

    Raises:
        ValueError: a missing column (the message lists the columns present), or an empty or non-string goal (the
            message names the file and row).
    """
    if isinstance(goals, (str, os.PathLike)):
        path = Path(goals)
        if not path.is_file():
            raise FileNotFoundError(f"goals file {path} not found (pass a list of strings for goals given in Python)")
        if path.suffix.lower() == ".txt":
            values = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            where = str(path)
        else:
            rows = read_table(path)
            _require_columns(_columns_of(rows), [column], f"goals file {path}")
            values, where = [row.get(column) for row in rows], f"goals file {path}, column {column!r}"
    elif isinstance(goals, Sequence):
        values, where = list(goals), "goals"
    else:
        raise TypeError(f"goals must be a file path or a list of strings, got {type(goals).__name__}")
    for i, goal in enumerate(values):
        if not isinstance(goal, str) or not goal.strip():
            raise ValueError(f"{where}: row {i} is {goal!r}; every goal must be non-empty text")
    if not values:
        raise ValueError(f"{where}: no goals")
    return [goal.strip() for goal in values]


# --------------------------------------------------------------------------------------------------------------------
# pairs_from_templates
# --------------------------------------------------------------------------------------------------------------------


def pairs_from_templates(
    templates: TemplateLike | Sequence[TemplateLike],
    goals: PathLike | Sequence[str],
    num_pairs: int | None = None,
    per_goal: int | None = None,
    seed: int = 0,
    goal_column: str = "goal",
    completion: str | None = None,
) -> Dataset:
    """Pairs from jailbreak templates crossed with harmful goals.

    Each pair is ``{"prompt": template rendered with the goal, "anchor_prompt": goal, "goal": goal,
    "attack": template name}`` (plus ``completion`` when given).

    Sampling of the (goal, template) combinations:

    - default: every combination, goal-major (all templates of goal 0, then of goal 1, ...);
    - ``num_pairs=n``: ``n`` distinct combinations drawn without replacement with ``random.Random(seed).sample``
      over the goal-major list, then put back in goal-major order;
    - ``per_goal=k``: for each goal in order, ``k`` distinct templates drawn with the same generator, in template order.

    The same inputs and seed give the same pairs; ``seed`` is unused without sampling.

    Args:
        templates: one template or a list (see :func:`load_templates`: files, directories, Jinja strings, PyRIT-style
            mappings, lists of turns).
        goals: a list of strings or a file (see :func:`load_goals`).
        num_pairs: draw this many combinations.
        per_goal: draw this many templates per goal.
        seed: seed of the draw.
        goal_column: the column of a goals table that holds the goals.
        completion: the refusal to train toward, for every row (default: none, so training uses
            :data:`~rasa_trainer.data.contract.DEFAULT_REFUSAL`).

    Raises:
        ValueError: bad templates or goals (named), both or impossible sampling sizes.
        DatasetContractError: produced rows break the pair contract (each error names the template and goal).
    """
    loaded = load_templates(templates)
    goal_list = load_goals(goals, column=goal_column)
    chosen = _sample_combinations(len(goal_list), len(loaded), num_pairs, per_goal, seed)
    as_messages = any(t.multi_turn for t in loaded)  # one format per column, whichever templates were drawn
    rows, sources = [], []
    for g, t in chosen:
        goal, template = goal_list[g], loaded[t]
        row = {"prompt": template.render(goal, as_messages), "anchor_prompt": goal, "goal": goal,
               "attack": template.name}
        if completion is not None:
            row["completion"] = completion
        rows.append(row)
        sources.append(f"template {template.name!r}, goal {g}")
    return _validated(rows, sources)


def _sample_combinations(n_goals: int, n_templates: int, num_pairs: int | None, per_goal: int | None,
                         seed: int) -> list[tuple[int, int]]:
    """``(goal index, template index)`` pairs, as documented in :func:`pairs_from_templates`."""
    combos = [(g, t) for g in range(n_goals) for t in range(n_templates)]
    if num_pairs is not None and per_goal is not None:
        raise ValueError("give num_pairs or per_goal, not both")
    rng = random.Random(seed)
    if num_pairs is not None:
        if not 1 <= num_pairs <= len(combos):
            raise ValueError(f"num_pairs={num_pairs}, but there are {n_goals} goals x {n_templates} templates = "
                             f"{len(combos)} combinations; choose 1..{len(combos)}")
        return [combos[i] for i in sorted(rng.sample(range(len(combos)), num_pairs))]
    if per_goal is not None:
        if not 1 <= per_goal <= n_templates:
            raise ValueError(f"per_goal={per_goal}, but there are {n_templates} templates; choose 1..{n_templates}")
        return [(g, t) for g in range(n_goals) for t in sorted(rng.sample(range(n_templates), per_goal))]
    return combos


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def write_pairs_jsonl(pairs: Dataset | Sequence[Mapping[str, Any]], path: PathLike,
                      anchor_column: str = "anchor_prompt") -> Path:
    """Validate ``pairs`` against the contract and write them as JSON lines to ``path`` atomically (a reader never
    sees a half-written file). ``None`` values are left out. Returns the path."""
    validate_pairs(pairs, anchor_column=anchor_column)
    rows = pairs.to_list() if hasattr(pairs, "to_list") else list(pairs)
    lines = [json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) for row in rows]
    atomic_write(path, "\n".join(lines) + "\n")
    return Path(path)
