"""The dataset contract shared by detection, training and evaluation.

A RASA dataset is a [`datasets.Dataset`] or a list of dicts. Each row is one *pair*:

- `prompt` (required): the adversarial context. A string, or a list of chat messages `{"role", "content"}`: an
  optional leading `system` message, then `user` / `assistant` turns alternating and starting with `user`, ending
  with a `user` turn (the model answers it).
- `anchor_prompt` (required; the name is configurable with `anchor_column`): the same harmful goal asked plainly,
  in the same two formats.
- `completion` (optional): the refusal to train toward. A string, or a list holding exactly one assistant message.
  Rows without it train toward [`DEFAULT_REFUSAL`].
- `goal` (optional string): the harmful goal, for reports.
- `attack` (optional string): the attack family, for per-attack reports.

Call [`validate_pairs`] before any model work: it checks every row and raises one [`DatasetContractError`] listing the
problems, so a misaligned or malformed pair can never reach detection or training silently. Rows are never dropped,
re-paired or modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_REFUSAL",
    "DatasetContractError",
    "as_messages",
    "check_chat_template_kwargs",
    "completion_text",
    "render_chat",
    "retain_conflicts",
    "validate_eval_sets",
    "validate_pairs",
]

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
"""The refusal trained toward for rows that carry no `completion`."""

PROMPT_COLUMN = "prompt"
COMPLETION_COLUMN = "completion"
OPTIONAL_STRING_COLUMNS = ("goal", "attack")
ROLES = ("system", "user", "assistant")

_MISSING = object()  # a key absent from a list-of-dicts row (distinct from an explicit None)
_ROLE_HINTS = {"bot": "assistant", "model": "assistant", "ai": "assistant", "gpt": "assistant", "chatbot": "assistant",
               "human": "user", "question": "user", "prompter": "user"}


class DatasetContractError(ValueError):
    """Raised by [`validate_pairs`] when rows break the dataset contract.

    Attributes:
        errors (`list[str]`): the reported problems (at most `max_errors`), each naming row, column, problem and fix.
        total (`int`): how many problems were found in all.
    """

    def __init__(self, errors: list[str], total: int, subject: str = "The dataset breaks the RASA pair contract"):
        self.errors = list(errors)
        self.total = total
        shown = f"showing the first {len(errors)}" if total > len(errors) else "all shown"
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{subject}: {total} error(s) ({shown}):\n{lines}")


# ----------------------------------------------------------------------------------------------------------------
# Public helpers


def as_messages(x: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return `x` as a list of chat messages.

    A string becomes `[{"role": "user", "content": x}]`; a message list is copied (a new list of new dicts), so callers
    can append to it without touching the dataset.
    """
    if isinstance(x, str):
        return [{"role": "user", "content": x}]
    if isinstance(x, Sequence) and all(isinstance(m, Mapping) for m in x):
        return [dict(m) for m in x]
    raise TypeError(f"expected a string or a list of chat messages, got {type(x).__name__}")


def completion_text(x: str | Sequence[Mapping[str, Any]] | None, default: str | None = DEFAULT_REFUSAL) -> str:
    """Return the text of a `completion` value.

    Args:
        x: a string, a list holding exactly one assistant message, or `None` (the row has no completion).
        default: returned when `x` is `None`. Pass `None` to make a missing completion an error instead.
    """
    if x is None:
        if default is None:
            raise ValueError("the row has no completion and no default was given")
        return default
    problem = _completion_problem(x)
    if problem is not None:
        raise ValueError(f"invalid completion: {problem}")
    return x if isinstance(x, str) else x[0]["content"]


# the arguments render_chat sets itself: a template kwarg of the same name would silently replace them
_RESERVED_TEMPLATE_KWARGS = ("add_generation_prompt", "chat_template", "continue_final_message", "conversation",
                             "messages", "return_dict", "tokenize")


def check_chat_template_kwargs(kwargs: Mapping[str, Any] | None, name: str = "chat_template_kwargs") -> dict[str, Any]:
    """``kwargs`` as a plain dict of extra chat-template variables (e.g. Qwen3's ``{"enable_thinking": False}``),
    ``{}`` for ``None``; a clear error for anything else, for non-string keys and for the names ``render_chat`` sets
    itself (``add_generation_prompt``, ``tokenize``, ...)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{name} must be a dict of chat-template variables, e.g. {{\"enable_thinking\": false}}; got "
                         f"{type(kwargs).__name__} {kwargs!r}")
    bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ValueError(f"{name}: keys must be template variable names (identifiers), got {bad}")
    reserved = sorted(set(kwargs) & set(_RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ValueError(f"{name} sets {reserved}, which RASA sets itself when it renders a conversation; remove "
                         f"them (only extra template variables such as enable_thinking belong there)")
    return dict(kwargs)


def render_chat(
    tokenizer: Any, messages: str | Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
    tokenize: bool = False, chat_template: str | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str | list[int]:
    """Render a conversation with the tokenizer's chat template: the one renderer of the package (detection,
    evaluation, generation and the trainer's anchor/prompt tokenisation all use it).

    With ``add_generation_prompt=True`` (default) the result ends where the assistant's reply starts. The rendered
    string already holds the template's special tokens (BOS, ...): tokenize it with ``add_special_tokens=False``, or
    pass ``tokenize=True`` to get the token ids directly.

    Args:
        tokenizer: a tokenizer (or processor) with a chat template.
        messages: a string (one user turn) or a list of chat messages.
        add_generation_prompt: append the assistant's generation prompt.
        tokenize: return token ids (``list[int]``) instead of the string.
        chat_template: a template to use instead of the tokenizer's own.
        chat_template_kwargs: extra variables for the template, e.g. ``{"enable_thinking": False}`` for Qwen3 (as
            ``chat_template_kwargs`` in TRL's GRPOConfig and vLLM's chat API); checked by
            :func:`check_chat_template_kwargs`.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so RASA cannot format contexts the way the model sees "
            "them. Set `tokenizer.chat_template` (e.g. copy it from the instruct version of the model) before training."
        )
    kwargs = check_chat_template_kwargs(chat_template_kwargs)
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    out = tokenizer.apply_chat_template(
        as_messages(messages), add_generation_prompt=add_generation_prompt, tokenize=tokenize, return_dict=False, **kwargs
    )
    if tokenize and (isinstance(out, dict) or hasattr(out, "keys")):
        out = out["input_ids"]
    return list(out) if tokenize else out


def validate_pairs(
    dataset: Any,
    anchor_column: str = "anchor_prompt",
    require_completion: bool = False,
    max_errors: int = 10,
) -> None:
    """Check that every row satisfies the dataset contract; raise one error listing the problems otherwise.

    Returns `None`: the dataset is valid as given and is never modified (use [`as_messages`] and [`completion_text`]
    to read rows). Checks: required columns present, texts non-empty, roles known and in order (optional `system`, then
    alternating `user` / `assistant` starting and ending with `user`), one format per column (all strings or all
    message lists), anchor different from prompt, a valid `completion` (a string or one assistant message), string
    `goal` / `attack`.

    Args:
        dataset: a `datasets.Dataset` or a sequence of dicts.
        anchor_column: the column holding the plain harmful request.
        require_completion: make `completion` required (otherwise rows without it use [`DEFAULT_REFUSAL`]).
        max_errors: how many problems the error message lists (all are counted).

    Raises:
        DatasetContractError (a `ValueError`): each listed problem reads
            `row <i>, column '<name>': <what is wrong>; <how to fix it>`.
    """
    columns, num_rows = _columns(dataset)
    collector = _Collector(max_errors)
    if num_rows == 0:
        collector.add("the dataset has no rows; RASA needs at least one (prompt, anchor) pair")
        collector.raise_if_any()

    required = [PROMPT_COLUMN, anchor_column] + ([COMPLETION_COLUMN] if require_completion else [])
    for name in required:
        if name not in columns:
            collector.add(
                f"column '{name}' is missing from all {num_rows} rows (columns present: {sorted(columns)}); "
                + _missing_column_fix(name, anchor_column)
            )
    collector.raise_if_any()  # without the key columns the per-row checks would only repeat this

    values = {name: _column_values(dataset, name) for name in columns}
    _check_conversations(values[PROMPT_COLUMN], PROMPT_COLUMN, collector)
    _check_conversations(values[anchor_column], anchor_column, collector)
    _check_anchor_differs(values[PROMPT_COLUMN], values[anchor_column], anchor_column, collector)
    if COMPLETION_COLUMN in values:
        _check_completions(values[COMPLETION_COLUMN], require_completion, collector)
    for name in OPTIONAL_STRING_COLUMNS:
        if name in values:
            _check_optional_strings(values[name], name, collector)
    collector.raise_if_any()


def validate_eval_sets(
    eval_sets: Any,
    set_names: Sequence[str] | None = None,
    *,
    where: str = "eval_sets",
    allow_empty_sets: bool = False,
    max_errors: int = 10,
    row_sources: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Check evaluation sets row by row with the rules of the pair contract; raise one error listing the problems.

    ``eval_sets`` is a dict ``{set name: [row, ...]}`` (what ``evaluate_safety`` and ``rasa-trainer evaluate
    --eval_sets`` read). Every row must be a dict whose ``prompt`` is a valid context exactly as a training pair's
    ``prompt`` (non-empty text, or ``{"role", "content"}`` messages with known roles in the contract's order; a
    conversation whose earlier assistant turns are fixed), or a multi-turn row whose model turns are generated:
    ``turns``, the user's (attacker's) turns as a non-empty list of non-empty strings, and no ``prompt``. The
    set-specific fields (``answer``, ``attack``, ``held_out``) are checked by ``evaluate_safety`` itself.

    Args:
        eval_sets: the sets.
        set_names: the set names allowed (``None``: any name).
        where: how the sets are named in the message (e.g. the file they came from).
        allow_empty_sets: accept a set given as an empty list (it is skipped). By default an empty set is an error,
            since a file that lists a set without rows almost always lost them. A dict without any row is an error
            either way.
        max_errors: how many problems the message lists (all are counted).
        row_sources: ``{set name: [where each row came from]}`` (e.g. ``"harmbench.csv line 7"``), named in the
            message after the row number.

    Raises:
        DatasetContractError (a ``ValueError``): each problem reads ``set '<name>', row <i> (<source>), column
            'prompt': <what is wrong>; <how to fix it>``.
    """
    subject = f"{where}: rows break the evaluation-set contract"
    allowed = f"; expected some of {list(set_names)}" if set_names is not None else ""
    if not isinstance(eval_sets, Mapping):
        raise DatasetContractError([f"expected a dict {{set name: [rows]}}, got {type(eval_sets).__name__}{allowed}"],
                                   1, subject)
    collector = _Collector(max_errors)
    if set_names is not None:
        for name in eval_sets:
            if name not in set_names:
                collector.add(f"set {name!r} is not an evaluation set{allowed} (a misspelt set would be skipped)")
    total_rows = 0
    for name, rows in eval_sets.items():
        if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
            collector.add(f"set {name!r}: expected a list of rows, got {type(rows).__name__}")
            continue
        total_rows += len(rows)
        if not rows and not allow_empty_sets:
            collector.add(f"set {name!r} has no rows; give its rows or remove the set")
        sources = (row_sources or {}).get(name)
        for i, row in enumerate(rows):
            label = f"set {name!r}, row {i}" + (f" ({sources[i]})" if sources is not None and i < len(sources) else "")
            if not isinstance(row, Mapping):
                collector.add(f"{label}: is a {type(row).__name__}, expected a dict with a 'prompt'")
                continue
            column, problem = _eval_row_problem(row)
            if problem:
                collector.add(f"{label}, column {column!r}: {problem}")
    if total_rows == 0 and not collector.total:
        collector.add("no evaluation set has any row, so nothing would be evaluated; give at least one set with rows"
                      + (f" ({', '.join(set_names)})" if set_names is not None else ""))
    if collector.total:
        raise DatasetContractError(collector.errors, collector.total, subject)


TURNS_COLUMN = "turns"
"""A multi-turn evaluation row whose model turns are generated: the user's turns, in order."""


def _eval_row_problem(row: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(column, problem)`` of an evaluation row: its ``prompt`` as a context, or its ``turns`` (user turns whose
    replies the evaluated model generates); ``problem`` is None when the row is valid."""
    if TURNS_COLUMN not in row:
        return PROMPT_COLUMN, _conversation_problem(row.get(PROMPT_COLUMN, _MISSING))
    turns = row[TURNS_COLUMN]
    if PROMPT_COLUMN in row:
        return TURNS_COLUMN, ("the row has both 'prompt' and 'turns'; give 'prompt' (a conversation, its assistant "
                              "turns fixed) or 'turns' (the user's turns, the model's replies generated), not both")
    if not isinstance(turns, (list, tuple)):
        return TURNS_COLUMN, f"has type {type(turns).__name__}; expected a list of the user's turns as strings"
    if not turns:
        return TURNS_COLUMN, "empty list; give the user's turns"
    for j, turn in enumerate(turns):
        problem = _text_problem(turn)
        if problem:
            return TURNS_COLUMN, f"turn {j}: {problem}; every user turn is non-empty text"
    return TURNS_COLUMN, None


def retain_conflicts(
    retain: Any,
    pairs: Any,
    is_refusal: Callable[[str], bool],
    anchor_column: str = "anchor_prompt",
) -> list[str]:
    """Retain rows that would teach the model to answer what the pairs teach it to refuse.

    A retain row conflicts with the pairs when its ``prompt`` is (up to whitespace) the ``prompt`` or the anchor of a
    pair, and its ``completion`` is not a refusal, or is missing (the base model's own reply would be generated and
    kept, and the base model is the one that answers these prompts).

    Args:
        retain: retain rows (a ``datasets.Dataset`` or a list of dicts with ``prompt`` and optional ``completion``).
        pairs: the training pairs.
        is_refusal: ``is_refusal(text) -> bool`` (the trainer passes the keyword refusal judge's; the contract
            itself judges nothing, so the data room stays below the judges).
        anchor_column: the pairs' anchor column.

    Returns:
        One line per conflicting retain row, naming it and the pair row it repeats; empty when there is none. Rows that
        break the contract are skipped (their own validation reports them).
    """
    seen: dict[tuple, tuple[int, str]] = {}
    columns, _ = _columns(pairs)
    for column in (PROMPT_COLUMN, anchor_column):
        if column not in columns:
            continue
        for i, value in enumerate(_column_values(pairs, column)):
            if _conversation_problem(value) is None:
                seen.setdefault(_normalised(value), (i, column))
    retain_columns, _ = _columns(retain)
    if PROMPT_COLUMN not in retain_columns:
        return []
    prompts = _column_values(retain, PROMPT_COLUMN)
    completions = (_column_values(retain, COMPLETION_COLUMN) if COMPLETION_COLUMN in retain_columns
                   else [_MISSING] * len(prompts))
    conflicts = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if _conversation_problem(prompt) is not None:
            continue
        match = seen.get(_normalised(prompt))
        if match is None:
            continue
        pair_row, column = match
        if completion is _MISSING or completion is None:
            conflicts.append(f"retain row {i} repeats pair row {pair_row}'s {column!r} and has no completion, so the "
                             "base model's own reply (the one the pairs train away) would be kept; give it a refusal "
                             "completion or drop the row")
        elif _completion_problem(completion) is None and not is_refusal(completion_text(completion, None)):
            text = completion_text(completion, None)
            conflicts.append(f"retain row {i} repeats pair row {pair_row}'s {column!r} with a completion that is not a "
                             f"refusal ({text[:60]!r}), so it would train the model to answer what the pair trains it "
                             "to refuse; drop the row or make its completion a refusal")
    return conflicts


# ----------------------------------------------------------------------------------------------------------------
# Validation internals


class _Collector:
    """Counts every problem, keeps the first `limit` messages."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.errors: list[str] = []
        self.total = 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.errors) < self.limit:
            self.errors.append(message)

    def row(self, index: int, column: str, message: str) -> None:
        self.add(f"row {index}, column '{column}': {message}")

    def raise_if_any(self) -> None:
        if self.total:
            raise DatasetContractError(self.errors, self.total)


def _columns(dataset: Any) -> tuple[set[str], int]:
    """Return (column names, number of rows); columns of a list of dicts are the union over rows."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "num_rows"):
        names = dataset.column_names
        if isinstance(names, Mapping):  # a DatasetDict: column_names is {split: [...]}
            raise DatasetContractError(
                [f"got a DatasetDict with splits {sorted(names)}; pass one split, e.g. dataset['train']"], 1
            )
        return set(names), dataset.num_rows
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        bad = [i for i, row in enumerate(dataset) if not isinstance(row, Mapping)]
        if bad:
            raise DatasetContractError(
                [f"row {i}: is a {type(dataset[i]).__name__}, expected a dict of columns" for i in bad[:10]], len(bad)
            )
        return set().union(*(row.keys() for row in dataset)), len(dataset)
    raise DatasetContractError(
        [f"expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__} (an IterableDataset must be "
         "materialised first, e.g. Dataset.from_list(list(iterable)))"],
        1,
    )


def _column_values(dataset: Any, name: str) -> list[Any]:
    """One column as a list; a key absent from a list-of-dicts row becomes `_MISSING`."""
    if hasattr(dataset, "column_names"):
        return list(dataset[name])  # column access: far cheaper than iterating rows of a Dataset
    return [row.get(name, _MISSING) for row in dataset]


def _missing_column_fix(name: str, anchor_column: str) -> str:
    if name == anchor_column:
        return f"add the plain harmful request as '{name}', or pass anchor_column=<your column name>"
    if name == COMPLETION_COLUMN:
        return "add the refusal to train toward as 'completion', or pass require_completion=False"
    return f"add the adversarial context as '{name}' (rename your column)"


def _format_of(value: Any) -> str | None:
    """'string', 'messages', or None for a value of neither format."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "messages"
    return None


def _check_mixed_formats(values: list[Any], column: str, collector: _Collector) -> None:
    """Flag a column that holds strings in some rows and message lists in others."""
    rows: dict[str, list[int]] = {"string": [], "messages": []}
    for i, value in enumerate(values):
        fmt = _format_of(value)
        if fmt is not None:
            rows[fmt].append(i)
    if rows["string"] and rows["messages"]:
        minority = min(rows["string"], rows["messages"], key=len)  # point at the rows most likely to be the mistake
        collector.add(
            f"row {minority[0]}, column '{column}': mixed formats, {len(rows['string'])} row(s) are strings "
            f"(first: row {rows['string'][0]}) and {len(rows['messages'])} are message lists (first: row "
            f"{rows['messages'][0]}); use one format for every row (convert strings with rasa_trainer.data.contract.as_messages)"
        )


def _text_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"content has type {type(value).__name__}, expected a string"
    if not value.strip():
        return "empty text (empty or only whitespace)"
    return None


def _conversation_problem(value: Any) -> str | None:
    """Describe what is wrong with a context value (string or messages), or None if it is valid."""
    if value is _MISSING or value is None:
        return "value is missing (absent or None); every row needs one"
    if isinstance(value, str):
        problem = _text_problem(value)
        return f"{problem}; give the text of the request" if problem else None
    if not isinstance(value, (list, tuple)):
        return f"has type {type(value).__name__}; expected a string or a list of {{'role', 'content'}} messages"
    if not value:
        return "empty message list; give at least one user message"
    for j, message in enumerate(value):
        problem = _message_problem(message, j)
        if problem:
            return problem
    return _role_order_problem([m["role"] for m in value])


def _message_problem(message: Any, j: int) -> str | None:
    if not isinstance(message, Mapping):
        return f"message {j} is not a {{'role', 'content'}} dict: {message!r:.80}"
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        return (f"message {j} has no {' and no '.join(repr(k) for k in missing)} (keys present: "
                f"{sorted(map(str, message))}); every message is a {{'role', 'content'}} dict: {message!r:.80}")
    if message["role"] not in ROLES:
        hint = _ROLE_HINTS.get(str(message["role"]).strip().lower())
        return (f"message {j} has unknown role {message['role']!r}; allowed roles are {', '.join(ROLES)}"
                + (f" (write {hint!r} for this turn)" if hint else ""))
    problem = _text_problem(message["content"])
    return f"message {j} ({message['role']}): {problem}; give it text or remove the message" if problem else None


def _role_order_problem(roles: list[str]) -> str | None:
    """Roles must read: optional system, then user, assistant, user, ..., ending with user."""
    turns = roles[1:] if roles[0] == "system" else roles
    offset = len(roles) - len(turns)
    if not turns:
        return "has only a system message; add the user turn the model should answer"
    for j, role in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            return (
                f"bad role order: message {j + offset} is {role!r} where {expected!r} was expected; roles must be an "
                "optional leading system message, then user and assistant alternating, starting with user"
            )
    if turns[-1] != "user":
        return "the conversation ends with an assistant turn; it must end with the user turn the model answers"
    return None


def _check_conversations(values: list[Any], column: str, collector: _Collector) -> None:
    _check_mixed_formats(values, column, collector)
    for i, value in enumerate(values):
        problem = _conversation_problem(value)
        if problem:
            collector.row(i, column, problem)


def _normalised(value: Any) -> tuple[tuple[str, str], ...]:
    """A comparable form of a context: strings and one-user-message lists with the same text compare equal."""
    return tuple((m["role"], " ".join(m["content"].split())) for m in as_messages(value))


def _check_anchor_differs(prompts: list[Any], anchors: list[Any], anchor_column: str, collector: _Collector) -> None:
    for i, (prompt, anchor) in enumerate(zip(prompts, anchors)):
        if _conversation_problem(prompt) or _conversation_problem(anchor):
            continue  # already reported; comparing invalid values would only add noise
        if _normalised(prompt) == _normalised(anchor):
            collector.row(
                i, anchor_column,
                "is identical to 'prompt'; the anchor must be the plain harmful request and the prompt the "
                "adversarial context, so the pair carries no routing contrast (check the pairing of your rows)",
            )


def _completion_problem(value: Any) -> str | None:
    if isinstance(value, str):
        problem = _text_problem(value)
        return f"{problem}; give the refusal text" if problem else None
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            return (f"is a list of {len(value)} messages; a completion must be a string or exactly one "
                    "{'role': 'assistant', 'content': ...} message")
        message = value[0]
        if not isinstance(message, Mapping) or message.get("role") != "assistant" or "content" not in message:
            return f"the single message must be {{'role': 'assistant', 'content': ...}}, got {message!r:.80}"
        problem = _text_problem(message["content"])
        return f"{problem}; give the refusal text" if problem else None
    return f"has type {type(value).__name__}; expected a string or a list holding one assistant message"


def _check_completions(values: list[Any], required: bool, collector: _Collector) -> None:
    _check_mixed_formats(values, COMPLETION_COLUMN, collector)
    for i, value in enumerate(values):
        if value is _MISSING or value is None:
            if required:
                collector.row(i, COMPLETION_COLUMN, "value is missing (absent or None); give the refusal to train "
                                                    "toward, or pass require_completion=False to use DEFAULT_REFUSAL")
            continue
        problem = _completion_problem(value)
        if problem:
            collector.row(i, COMPLETION_COLUMN, problem)


def _check_optional_strings(values: Iterable[Any], column: str, collector: _Collector) -> None:
    for i, value in enumerate(values):
        if value is _MISSING or value is None:
            continue
        if not isinstance(value, str):
            collector.row(i, column, f"has type {type(value).__name__}; expected a string (or None when unknown)")
        elif not value.strip():
            collector.row(i, column, "empty text; give a name or use None when unknown")
