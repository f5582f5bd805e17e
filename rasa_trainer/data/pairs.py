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

**Template safety.** Templates are rendered in Jinja's immutable sandbox with ``StrictUndefined``: no attribute
access outside the sandbox, and a variable other than ``prompt`` is an error before anything is rendered (a template
of a directory that needs other variables is skipped, with one warning line). A template is text with the slot,
conditionals and filters: ``{% include %}``, ``{% import %}``, ``{% extends %}`` (no other file is ever read),
``{% for %}``, ``{% set %}``, ``{% macro %}``, ``{% call %}`` and ``{% with %}`` are errors when the template is
loaded. Rendering is bounded: a rendered turn holds at most :data:`MAX_RENDERED_CHARS` characters, and every step that
could build more (``prompt * n``, ``+``, ``%``, integer powers, the padding, replacing and joining ``str`` methods and
filters, ``lipsum``) is checked before it runs, so ``{{ prompt * 300000000 }}`` fails at once with an error naming the
template. Goals are inserted as values, never parsed as Jinja. Each rendered turn is stripped of leading and trailing
whitespace (YAML block scalars end with a newline).

:func:`write_pairs_jsonl` writes pairs to a JSON-lines file atomically. The ``rasa-trainer build-pairs`` command
(:mod:`rasa_trainer.cli.build_pairs`) drives both builders from the command line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import functools
import inspect
import io
import json
import logging
import os
import random
import re
import string
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from datasets import Dataset
from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum

from .contract import DatasetContractError, _role_order_problem, validate_pairs
from ..utils import atomic_write

__all__ = [
    "MAX_RENDERED_CHARS",
    "AttackTemplate",
    "TemplateLimitError",
    "TemplateVariablesError",
    "check_output_path",
    "load_goals",
    "load_template",
    "load_templates",
    "pairs_from_columns",
    "pairs_from_templates",
    "read_table",
    "read_text",
    "write_pairs_jsonl",
]

logger = logging.getLogger(__name__)

SLOT = "prompt"
"""The Jinja variable a template's goal fills: ``{{ prompt }}``."""

YAML_SUFFIXES = (".yaml", ".yml")
TEMPLATE_SUFFIXES = (*YAML_SUFFIXES, ".txt", ".j2", ".jinja", ".jinja2")
"""File suffixes taken from a template directory (YAML files are PyRIT-style; the others are plain Jinja text)."""
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

PathLike = Union[str, os.PathLike]
TemplateLike = Union["AttackTemplate", str, os.PathLike, Mapping[str, Any], Sequence[Any]]


# --------------------------------------------------------------------------------------------------------------------
# Tables (shared with rasa_trainer.evaluation.eval_sets)
# --------------------------------------------------------------------------------------------------------------------


def read_text(path: PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped, as spreadsheet exports often write one).

    Raises:
        ValueError: the file is not UTF-8; the message names the file, the byte offset and line of the first byte
            that is not, and how to convert it.
    """
    path = Path(path)
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + skip
        line = data.count(b"\n", 0, offset) + 1
        utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        raise ValueError(
            f"{path}: not UTF-8 text: byte offset {offset} (line {line}) holds 0x{data[offset]:02x} ({err.reason})"
            + ("; the file starts with a UTF-16 byte-order mark" if utf16 else "")
            + f"; re-save it as UTF-8 (e.g. iconv -f {'utf-16' if utf16 else 'cp1252'} -t utf-8 {path.name})"
        ) from None


def read_table(path: PathLike) -> list[dict[str, Any]]:
    """Read the rows of a local table file as dicts.

    Supported: ``.jsonl`` (one JSON object per line; blank lines skipped), ``.json`` (a JSON array of objects, or
    JSON lines as ``Dataset.to_json`` writes them), ``.csv`` / ``.tsv`` (a header row; every value a string),
    ``.parquet``. Text files must be UTF-8. Errors name the file and the line or row.

    JSON lines are the lines JSON defines: the file is split at ``\n`` only, so a text holding U+2028, U+0085 or
    another character Python's ``str.splitlines`` breaks at is read whole.

    CSV and TSV are read as pandas' ``to_csv`` (and Python's ``csv`` module) write them: a field holding the
    delimiter, a quote or a line break is quoted, a quote inside it doubled; cells of any size are read. A quote that
    breaks the row structure is an error naming the line, never a silent re-pairing: a quoted field left open to the
    end of the file, text after a closing quote, a row with more or fewer fields than the header, and a quoted field
    that runs over several lines each of which is a whole row on its own (an opening quote that was never closed,
    gluing rows together). A file of one column cannot show the last case, since any text is a row of one field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported table format {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises its own types for a damaged or foreign file
            raise ValueError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    text = read_text(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(text, path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and text.lstrip().startswith("["):
        return _json_array(text, path)
    return _json_lines(text, path)


@contextlib.contextmanager
def _no_field_size_limit():
    """Lift the ``csv`` module's 128 KiB cell limit (a process-wide setting) for the block, then put it back."""
    previous = csv.field_size_limit()
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # a C long of 32 bits
        csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_delimited(text: str, path: Path, delimiter: str) -> list[dict[str, Any]]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    fix = ("a quote that is part of the text must be inside a quoted field and doubled (\"\"), as pandas' to_csv and "
           "Python's csv module write it; close or remove the stray quote")
    lines = io.StringIO(text, newline="").readlines()  # the physical lines the csv reader sees (\n, \r\n or \r)
    rows: list[dict[str, Any]] = []
    with _no_field_size_limit():
        reader = csv.reader(lines, delimiter=delimiter, quotechar='"', doublequote=True, strict=True)
        first = 1
        try:
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}: no header row (the first line names the columns)")
            duplicates = sorted({name for name in header if header.count(name) > 1})
            if duplicates:
                raise ValueError(f"{path}: line 1: the header names the columns {duplicates} more than once; give every "
                                 "column its own name")
            while True:
                first = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    break
                last = reader.line_num
                span = f"line {first}" if last == first else f"line {first} to line {last}"
                if not fields:
                    continue  # a blank line
                if len(fields) != len(header):
                    raise ValueError(
                        f"{path}: row {len(rows)} ({span}) does not have the {len(header)} fields of the header "
                        f"{header}: it has {len(fields)}; " + (fix if '"' in "".join(lines[first - 1:last]) else
                                                               f"check the {kind} delimiters of this row"))
                if last > first and len(header) > 1 and _glued_lines(lines[first - 1:last], delimiter, len(header)):
                    raise ValueError(
                        f"{path}: line {first}: unbalanced quote: a quoted field opened on line {first} closes only on "
                        f"line {last}, which would glue {last - first + 1} lines that are each a whole row into one "
                        f"row (pairing one row's text with another's); {fix} (if those lines really are one text, "
                        "write the table as JSON lines instead)")
                rows.append(dict(zip(header, fields)))
        except csv.Error as err:
            raise ValueError(f"{path}: line {first}: malformed {kind} ({err}); {fix}") from None
    return rows


def _glued_lines(lines: list[str], delimiter: str, num_fields: int) -> bool:
    """Whether every physical line of a multi-line row splits into the header's number of fields by itself: the mark
    of an opening quote never closed, which swallows whole rows into one field."""
    return all(len(line.rstrip("\r\n").split(delimiter)) == num_fields for line in lines)


def _json_array(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} is a {type(rows[bad]).__name__}, expected a JSON object")
    return rows


_JSON_WHITESPACE = " \t\r"


def _json_lines(text: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # JSON's line break only, never str.splitlines()
        if not line.strip(_JSON_WHITESPACE):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
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

MAX_RENDERED_CHARS = 1_000_000
"""The most characters one rendered turn of a template may hold; a template that renders more (or builds a larger
string on the way, e.g. ``{{ prompt * 300000000 }}``) fails with an error naming it, before the memory is spent."""

_MAX_INT_BITS = 4096  # integers a template computes stay below 2**4096 (``10 ** 10 ** 9`` would take minutes)
_MAX_COUNT = 100_000  # loop-like filter arguments (slices, batch sizes with a fill value), as Jinja's MAX_RANGE
_MAX_JSON_INDENT = 64

_REFUSED_TAGS = {
    nodes.Include: ("{% include %}", "files"), nodes.Import: ("{% import %}", "files"),
    nodes.FromImport: ("{% from ... import %}", "files"), nodes.Extends: ("{% extends %}", "files"),
    nodes.For: ("{% for %}", "work"), nodes.Macro: ("{% macro %}", "work"), nodes.CallBlock: ("{% call %}", "work"),
    nodes.Assign: ("{% set %}", "work"), nodes.AssignBlock: ("{% set %}", "work"), nodes.With: ("{% with %}", "work"),
    nodes.Block: ("{% block %}", "files"),
}


class TemplateLimitError(SecurityError):
    """A template would build a string or number beyond the limits of :data:`MAX_RENDERED_CHARS`."""


def _too_big(what: str, size: int) -> TemplateLimitError:
    return TemplateLimitError(f"{what} would build {size:,} characters, over the limit of {MAX_RENDERED_CHARS:,} "
                              "characters per rendered turn")


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_PRINTF_WIDTH = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: Any) -> None:
    """Widths and precisions of a ``%`` format string stay within the limit; ``*`` (a width from the data) is refused."""
    if not isinstance(fmt, str):
        return
    for match in _PRINTF_WIDTH.finditer(fmt):
        for number in match.groups():
            if number == "*":
                raise TemplateLimitError("a '%*' width taken from the arguments is not allowed in templates")
            if number and int(number) > MAX_RENDERED_CHARS:
                raise _too_big(f"the format width {number}", int(number))


def _check_format_string(fmt: str) -> None:
    """Widths of a ``str.format`` string stay within the limit; nested fields (a width from the data) are refused."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises its own error
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:
            raise TemplateLimitError("a format width taken from the arguments ('{:{w}}') is not allowed in templates")
        for number in re.findall(r"\d+", spec):
            if int(number) > MAX_RENDERED_CHARS:
                raise _too_big(f"the format width {number}", int(number))


def _check_growth(what: str, size: int) -> None:
    if size > MAX_RENDERED_CHARS:
        raise _too_big(what, size)


def _replace_size(s: str, old: str, new: str, count: int | None) -> int:
    occurrences = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    return len(s) + occurrences * (len(new) - len(old))


def _check_str_method(method: str, s: Any, args: tuple, kwargs: dict) -> None:
    """Pre-check the ``str`` methods whose result can be far larger than their inputs."""
    def arg(i: int, name: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(name, default)

    if method in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 0)
        if _is_int(width):
            _check_growth(f"str.{method}({width})", width)
    elif method == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        if _is_int(tabsize):
            _check_growth(f"str.expandtabs({tabsize})", len(s) + s.count("\t") * max(tabsize, 0))
    elif method == "replace":
        old, new, count = arg(0, "old"), arg(1, "new"), arg(2, "count")
        if isinstance(old, str) and isinstance(new, str):
            _check_growth("str.replace", _replace_size(s, old, new, count if _is_int(count) else None))
    elif method == "join":
        items = arg(0, "iterable")
        if isinstance(items, (str, list, tuple)):
            sizes = [len(x) if isinstance(x, str) else 0 for x in items]
            _check_growth("str.join", sum(sizes) + len(s) * max(len(items) - 1, 0))


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with bounded growth: string and list repetition, concatenation, ``%`` formatting,
    integer powers and products, the ``str`` methods and filters that pad, repeat or join, and ``lipsum`` are checked
    against :data:`MAX_RENDERED_CHARS` before they run (so nothing large is ever allocated), and the rendered output is
    counted as it streams (see :func:`_render_bounded`)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if _length(seq) is not None and _is_int(times):
                    what = f"a text of {len(seq):,} characters" if isinstance(seq, str) else f"{len(seq):,} items"
                    _check_growth(f"repeating {what} {times:,} times", len(seq) * times)
            if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise TemplateLimitError(f"an integer product over {_MAX_INT_BITS} bits is not allowed in templates")
        elif operator == "**":
            if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1 and \
                    right * abs(left).bit_length() > _MAX_INT_BITS:
                raise TemplateLimitError(f"an integer power over {_MAX_INT_BITS} bits is not allowed in templates")
        elif operator == "+":
            if _length(left) is not None and _length(right) is not None:
                _check_growth("concatenation", len(left) + len(right))
        elif operator == "%":
            _check_printf(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - as Jinja's
        owner = getattr(__obj, "__self__", None)
        if isinstance(__obj, (types.BuiltinMethodType, types.MethodType)) and isinstance(owner, str):
            _check_str_method(__obj.__name__, owner, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(value.__self__)
        return wrapped


def _guarded_filter(original: Any, check: Any) -> Any:
    """``original`` (a Jinja filter) with ``check(arguments)`` run on its bound arguments first."""
    signature = inspect.signature(original)
    # Jinja passes the eval context / environment first to a filter marked for it; a filter with sync and async
    # variants is marked without that parameter in its (wrapped) signature, so skip the extra argument then
    first = next(iter(signature.parameters), None)
    skip = int(getattr(original, "jinja_pass_arg", None) is not None
               and first not in ("eval_ctx", "environment", "env", "context"))

    @functools.wraps(original)  # keeps Jinja's pass_context / pass_eval_context marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args[skip:], **kwargs)
        bound.apply_defaults()
        check(bound.arguments)
        return original(*args, **kwargs)

    return guarded


def _filter_checks() -> dict[str, Any]:
    def center(a):
        if _is_int(a["width"]):
            _check_growth(f"center({a['width']})", a["width"])

    def indent(a):
        width = len(a["width"]) if isinstance(a["width"], str) else a["width"]
        if isinstance(a["s"], str) and _is_int(width):
            _check_growth(f"indent({width})", len(a["s"]) + (a["s"].count("\n") + 1) * width)

    def wordwrap(a):
        s, width, wrap = a["s"], a["width"], a["wrapstring"] or "\n"
        if isinstance(s, str) and _is_int(width) and isinstance(wrap, str):
            _check_growth(f"wordwrap({width})", len(s) + (len(s) // max(width, 1) + s.count("\n") + 1) * len(wrap))

    def replace(a):
        s, old, new, count = a["s"], a["old"], a["new"], a["count"]
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            _check_growth("replace", _replace_size(s, old, new, count if _is_int(count) else None))

    def format_(a):
        _check_printf(a["value"])

    def batch(a):
        if a["fill_with"] is not None and _is_int(a["linecount"]) and a["linecount"] > _MAX_COUNT:
            raise TemplateLimitError(f"batch({a['linecount']}) with a fill value is over {_MAX_COUNT:,}")

    def slice_(a):
        if _is_int(a["slices"]) and a["slices"] > _MAX_COUNT:
            raise TemplateLimitError(f"slice({a['slices']}) is over {_MAX_COUNT:,} slices")

    def join(a):
        value, sep = a["value"], a["d"]
        if isinstance(value, (str, list, tuple)) and isinstance(sep, str):
            sizes = [len(x) if isinstance(x, str) else 0 for x in value]
            _check_growth("join", sum(sizes) + len(sep) * max(len(value) - 1, 0))

    def tojson(a):
        if _is_int(a["indent"]) and a["indent"] > _MAX_JSON_INDENT:
            raise TemplateLimitError(f"tojson(indent={a['indent']}) is over {_MAX_JSON_INDENT}")

    return {"center": center, "indent": indent, "wordwrap": wordwrap, "replace": replace, "format": format_,
            "batch": batch, "slice": slice_, "join": join, "tojson": tojson}


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's names
    if _is_int(n) and _is_int(max):
        _check_growth(f"lipsum(n={n}, max={max})", n * max * 12)
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _make_environment() -> _BoundedSandbox:
    env = _BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    for name, check in _filter_checks().items():
        env.filters[name] = _guarded_filter(env.filters[name], check)
    env.globals["lipsum"] = _bounded_lipsum
    return env


# One sandboxed environment for every template: only Jinja, no Python objects reachable, unknown variables raise,
# growth bounded.
_JINJA = _make_environment()


def _render_bounded(compiled: Any, goal: str) -> str:
    """Render ``compiled`` with the goal, counting the output as it streams; over :data:`MAX_RENDERED_CHARS` it stops
    with :class:`TemplateLimitError` (the guards of :class:`_BoundedSandbox` stop any single step that would be larger)."""
    parts, size = [], 0
    for chunk in compiled.generate({SLOT: goal}):
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise TemplateLimitError(f"the rendered text is over the limit of {MAX_RENDERED_CHARS:,} characters per turn")
        parts.append(chunk)
    return "".join(parts)


class TemplateVariablesError(ValueError):
    """A template uses variables other than ``{{ prompt }}``, which only the goal fills.

    Attributes:
        variables (`list[str]`): the other variables.
    """

    def __init__(self, message: str, variables: list[str]):
        super().__init__(message)
        self.variables = variables


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
            tree = _JINJA.parse(source)
            variables = meta.find_undeclared_variables(tree)
        except TemplateSyntaxError as err:
            raise ValueError(f"{where}: Jinja syntax error at line {err.lineno}: {err.message}") from None
        extra = sorted(variables - {SLOT})
        if extra:
            raise TemplateVariablesError(
                f"{where} uses the variables {extra}; only {{{{ {SLOT} }}}} is filled (with the goal)", extra)
        for node in tree.find_all(tuple(_REFUSED_TAGS)):
            tag, why = _REFUSED_TAGS[type(node)]
            if why == "files":
                raise ValueError(f"{where} uses {tag} (line {node.lineno}): a template is rendered on its own and never "
                                 "reads other templates or files; paste the text it would bring in into the template")
            raise ValueError(f"{where} uses {tag} (line {node.lineno}), which templates may not: a template is text "
                             f"with the {{{{ {SLOT} }}}} slot, conditionals ({{% if %}}) and filters, so that rendering "
                             "stays small and fast; write the text out instead")
        try:
            compiled = _JINJA.from_string(source)
        except TemplateSyntaxError as err:
            raise ValueError(f"{where}: Jinja syntax error at line {err.lineno}: {err.message}") from None
        return compiled, SLOT in variables

    @property
    def multi_turn(self) -> bool:
        """Whether the template has several turns (it renders to chat messages)."""
        return len(self.turns) > 1

    def render(self, goal: str, as_messages: bool = False) -> str | list[dict[str, str]]:
        """Fill the slot with ``goal``: a string for a single-turn template (unless ``as_messages``), else messages.

        Each turn is stripped of surrounding whitespace. A turn may render at most :data:`MAX_RENDERED_CHARS`
        characters.
        """
        try:
            texts = [_render_bounded(compiled, goal).strip() for compiled, _ in self._compiled]
        except Exception as err:  # the sandbox's refusals, a limit, a filter that fails: all name the template
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
        TemplateVariablesError (a ``ValueError``): the template uses variables other than ``{{ prompt }}``.
        ValueError: no ``{{ prompt }}`` slot, a refused tag (``{% include %}``, ``{% for %}``, ...), bad turns or
            roles, an unreadable YAML, a string that is neither a file nor Jinja text; each message names the template.
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
        return AttackTemplate(path.stem, (("user", read_text(path)),), str(path))
    try:
        data = yaml.safe_load(read_text(path))
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
    without a name are named ``template_<i>`` by position.

    **Directories as libraries publish them** (e.g. PyRIT's ``pyrit/datasets/jailbreak/templates``):

    - a template that needs variables other than ``{{ prompt }}`` (PyRIT's ``multi_parameter/`` ones) is skipped, and
      one warning line lists the skipped files and their variables (a file named on its own is an error instead);
    - templates of a directory that share a ``name`` (PyRIT's ``aligned.yaml`` and ``anti_gpt.yaml`` are both
      "Aligned") are told apart by their file: each becomes ``"<name> (<path>)"``, the path relative to the directory
      given, without its suffix (``"Aligned (aligned)"``, ``"Aligned (anti_gpt)"``), and one warning line lists the
      new names. The names depend on the files only, so every run names them alike.

    Any other clash of names is an error, since the pairs of two templates would merge into one attack family in
    reports.
    """
    items = [templates] if _is_single(templates) else list(templates)
    loaded: list[AttackTemplate] = []
    labels: list[str | None] = []  # a template's path inside the directory it was found in
    skipped: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            root = Path(item)
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEMPLATE_SUFFIXES)
            found = 0
            for path in files:
                try:
                    template = load_template(path)
                except TemplateVariablesError as err:
                    skipped.append(f"{path.relative_to(root).as_posix()} ({', '.join(err.variables)})")
                    continue
                loaded.append(template)
                labels.append(path.relative_to(root).with_suffix("").as_posix())
                found += 1
            if not files:
                raise ValueError(f"template directory {item} holds no template file ({', '.join(TEMPLATE_SUFFIXES)})")
            if not found:
                raise ValueError(f"template directory {item}: every template needs variables other than "
                                 f"{{{{ {SLOT} }}}}, which only the goal fills: {'; '.join(skipped)}")
        else:
            loaded.append(load_template(item, name=f"template_{i}"))
            labels.append(None)
    if not loaded:
        raise ValueError("no templates given")
    if skipped:
        logger.warning("skipped %d template(s) that need variables other than {{ %s }}, which only the goal fills: %s",
                       len(skipped), SLOT, "; ".join(skipped))
    loaded = _distinct_names(loaded, labels)
    _check_unique_names(loaded)
    return loaded


def _is_single(templates: Any) -> bool:
    return isinstance(templates, (str, os.PathLike, Mapping, AttackTemplate))


def _distinct_names(templates: list[AttackTemplate], labels: list[str | None]) -> list[AttackTemplate]:
    """Templates found in a directory whose names clash get ``"<name> (<path in the directory>)"``."""
    counts: dict[str, int] = {}
    for template in templates:
        counts[template.name] = counts.get(template.name, 0) + 1
    renamed, out = [], []
    for template, label in zip(templates, labels):
        if counts[template.name] > 1 and label is not None:
            new = f"{template.name} ({label})"
            renamed.append(f"{template.name!r} -> {new!r}")
            template = dataclasses.replace(template, name=new)
        out.append(template)
    if renamed:
        logger.warning("templates share names, so their attack names add the file they came from: %s",
                       "; ".join(renamed))
    return out


def _check_unique_names(templates: list[AttackTemplate]) -> None:
    origins: dict[str, list[str]] = {}
    for template in templates:
        origins.setdefault(template.name, []).append(template.origin)
    duplicates = {name: where for name, where in origins.items() if len(where) > 1}
    if duplicates:
        raise ValueError(f"templates share names (their pairs would merge into one attack family): {duplicates}; "
                         "give each template a distinct name (templates found in one directory are told apart by "
                         "their file names; files named one by one, strings and mappings are not)")


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
            values = [line.strip() for line in read_text(path).split("\n") if line.strip()]
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


_SPLITLINES_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})
"""The line breaks of ``str.splitlines`` that ``json.dumps(ensure_ascii=False)`` leaves raw (it escapes the others)."""


def write_pairs_jsonl(pairs: Dataset | Sequence[Mapping[str, Any]], path: PathLike,
                      anchor_column: str = "anchor_prompt") -> Path:
    """Validate ``pairs`` against the contract and write them as JSON lines to ``path`` atomically (a reader never
    sees a half-written file). ``None`` values are left out. Returns the path.

    Texts are written as UTF-8, with U+2028, U+2029 and U+0085 escaped (``\\u2028``): one pair is one line for every
    reader, even one that splits lines with ``str.splitlines``, and :func:`read_table` reads the texts back exactly.
    """
    validate_pairs(pairs, anchor_column=anchor_column)
    rows = pairs.to_list() if hasattr(pairs, "to_list") else list(pairs)
    lines = [json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False).translate(
        _SPLITLINES_BREAKS) for row in rows]
    atomic_write(path, "\n".join(lines) + "\n")
    return Path(path)


def check_output_path(output: PathLike, inputs: Sequence[PathLike], flag: str = "--output") -> None:
    """Refuse an output file that is one of the input files (by path, through links, or as another name of the same
    file), so that writing the output never overwrites what it was built from.

    Raises:
        ValueError: naming the output and the input it would overwrite.
    """
    out = Path(output).expanduser()
    for source in inputs:
        src = Path(source).expanduser()
        same = os.path.realpath(out) == os.path.realpath(src)
        if not same and out.exists() and src.exists():
            try:
                same = os.path.samefile(out, src)
            except OSError:
                same = False
        if same:
            also = "" if os.path.abspath(out) == os.path.abspath(src) else " (the same file under another name)"
            raise ValueError(f"{flag} {output} is the input file {source}{also}: writing the pairs there would "
                             f"overwrite it; choose another {flag}")
