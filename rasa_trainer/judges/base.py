"""The judge protocol: decide whether a model's reply refused a harmful request. Shared by detection and evaluation.

A judge is any object with a `name` and a `__call__(prompts, replies) -> list[bool]` that returns, for each reply,
`True` when the reply is a **refusal** (the model did not comply, the attack failed) and `False` when it complied.

Semantics, the same everywhere in rasa-trainer:

- Attack-success rate (ASR) counts every reply judged *not refused* as a success.
- A judge never answers "refused" by default. When it cannot decide (the model raised, its output cannot be parsed,
  it returned the wrong number of verdicts) it raises [`JudgeError`]. Counting failures as safe would bias ASR down
  silently; the authors' code did exactly that.
- Call judges through [`run_judge`], which checks lengths and types of what the judge returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Judge", "JudgeError", "Prompt", "describe_judge", "judge_provenance", "run_judge"]

Prompt = str | Sequence[Mapping[str, Any]]  # a context: a string or chat messages, as in the dataset contract


class JudgeError(RuntimeError):
    """A judge could not give a verdict. Never caught and turned into "refused"."""


@runtime_checkable
class Judge(Protocol):
    """The judge protocol.

    Attributes:
        name: a short identifier, written into reports.

    `__call__(prompts, replies)` takes the contexts (strings or chat messages; a caller may pass the plain goal instead)
    and the replies, and returns one `bool` per reply: `True` = refused (attack failed), `False` = complied.
    """

    name: str

    def __call__(self, prompts: list[Prompt], replies: list[str]) -> list[bool]: ...


def run_judge(judge: Judge, prompts: Sequence[Prompt], replies: Sequence[str]) -> list[bool]:
    """Call `judge` and check its output: one `bool` per reply. Every failure becomes a [`JudgeError`].

    Returns:
        `list[bool]`, `True` where the reply is a refusal.
    """
    name = getattr(judge, "name", type(judge).__name__)
    if len(prompts) != len(replies):
        raise JudgeError(f"judge {name!r}: got {len(prompts)} prompts but {len(replies)} replies")
    if not replies:
        return []
    try:
        verdicts = judge(list(prompts), list(replies))
    except JudgeError:
        raise
    except Exception as err:  # any model/runtime failure must surface, never read as a verdict
        raise JudgeError(f"judge {name!r} failed: {type(err).__name__}: {err}") from err
    if not isinstance(verdicts, Sequence) or isinstance(verdicts, (str, bytes)):
        raise JudgeError(f"judge {name!r} returned a {type(verdicts).__name__}; expected a list of bools")
    if len(verdicts) != len(replies):
        raise JudgeError(f"judge {name!r} returned {len(verdicts)} verdicts for {len(replies)} replies")
    for i, verdict in enumerate(verdicts):
        # bool only (numpy.bool_ included): 0/1 or None would hide a judge that lost track of its labels
        if not isinstance(verdict, (bool, np.bool_)):
            raise JudgeError(f"judge {name!r} returned {verdict!r} ({type(verdict).__name__}) for row {i}; "
                             "expected a bool (True = refused)")
    return [bool(v) for v in verdicts]


def describe_judge(judge: Judge) -> dict[str, Any]:
    """The judge's identity for results.json and model cards: its `describe()` when it has one (name, kind, format
    and format version, model, endpoint; never a secret), else its name and class.

    Returns:
        a JSON-plain dict with at least `name` and `kind`.
    """
    describe = getattr(judge, "describe", None)
    if callable(describe):
        info = dict(describe())
    else:
        info = {"name": str(getattr(judge, "name", type(judge).__name__)), "kind": type(judge).__name__}
    info.setdefault("name", str(getattr(judge, "name", type(judge).__name__)))
    info.setdefault("kind", type(judge).__name__)
    return info


def judge_provenance(judge: Any) -> dict[str, Any]:
    """What names a judge in a report: ``name``, ``class``, ``version`` and ``format``, plus whatever the judge's own
    ``describe()`` reports (a model judge: its checkpoint, revision and prompt format with the format's version).

    ``version``: the judge's ``version`` attribute; else its model and revision (``describe()``'s ``model`` and
    ``revision``); else, for a judge defined in rasa-trainer, the package version (its behaviour ships with it);
    otherwise ``None``, never a guess. ``format``: the prompt format it applies (``describe()``'s ``format``, or the
    name of its ``format`` attribute), ``None`` when it has none (keyword matching).
    """
    from .. import __version__

    cls = type(judge)
    described = judge.describe() if callable(getattr(judge, "describe", None)) else {}
    if not isinstance(described, Mapping):
        raise TypeError(f"{cls.__name__}.describe() returned {type(described).__name__}; expected a dict")
    version = getattr(judge, "version", None)
    if version is None and described.get("model"):
        revision = described.get("revision")
        version = f"{described['model']}@{revision}" if revision else str(described["model"])
    if version is None and cls.__module__.startswith("rasa_trainer."):
        version = f"rasa-trainer {__version__}"
    fmt = described.get("format", getattr(judge, "format", None))
    fmt = getattr(fmt, "name", fmt)
    info = {
        "name": str(getattr(judge, "name", cls.__name__)),
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "version": None if version is None else str(version),
        "format": None if fmt is None else str(fmt),
    }
    info.update({str(k): v for k, v in described.items() if str(k) not in info})
    return info
