"""The judge registry: every way to name a judge, in one place. `judge_from_name` (and the `--judge` /
`--detection_judge` options of the command line, and `RASAConfig.detection_judge`) dispatch through it.

Two sorts of judge kinds:

- **named**: the name is the judge (`keyword`, `safety_world`); built as `build(**options)`.
- **checkpoint kinds** (`classifier`, `guard`): the name is the path of a local checkpoint folder; the kind is read
  from the folder's `config.json` (each kind says which configurations it takes, e.g. a `*ForSequenceClassification`
  architecture), or named explicitly as `kind:path` (the form of a model-backed judge's `name`, e.g.
  `guard:./llama-guard`); built as `build(path, **options)`.

Adding a judge is one class (the [`Judge`](base.py) protocol) and one registration::

    @register_judge("always_refuses")
    class AlwaysRefuses:
        name = "always_refuses"

        def __call__(self, prompts, replies):
            return [True] * len(replies)

    @register_judge("my_guard", checkpoint=lambda c: "MyGuardModel" in c.architectures)
    class MyGuard:
        def __init__(self, model_name_or_path, threshold=0.5): ...

A registration may give `check(checkpoint, **options)`: a cheap validation run by [`check_judge_name`] before
anything is loaded (the classifier's refusal labels against the checkpoint's labels). The options a judge takes are
those of `build`'s signature; any other option is refused, never ignored.

Names are resolved without loading a model: a registered name or a local checkpoint folder at once; a Hub repository
id (`owner/name`) by fetching its `config.json` alone. Anything else (a typo such as `keywrod`) is a `ValueError` at
once, without a Hub lookup.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .base import Judge
from .checkpoint import Checkpoint, read_checkpoint

__all__ = ["JUDGE_KINDS", "JudgeKind", "check_judge_name", "judge_from_name", "judge_kind", "judge_names",
           "register_judge"]


@dataclass(frozen=True)
class JudgeKind:
    """A registered judge kind.

    Attributes:
        name: the registered name (a named judge's name, or a checkpoint kind's, as in `kind:path`).
        build: the class or factory: `build(**options)`, or `build(path, **options)` for a checkpoint kind.
        checkpoint: for a checkpoint kind, whether a [`Checkpoint`] (folder and `config.json`) is of this kind;
            None for a named judge.
        check: optional cheap validation `check(checkpoint, **options)` (`checkpoint` is None for a named judge),
            raising `ValueError`; run before anything loads.
        about: one line for messages (default: the first line of `build`'s docstring).
    """

    name: str
    build: Callable[..., Judge]
    checkpoint: Callable[[Checkpoint], bool] | None = None
    check: Callable[..., None] | None = None
    about: str = ""

    @property
    def from_checkpoint(self) -> bool:
        return self.checkpoint is not None

    def options(self) -> tuple[str, ...] | None:
        """The keyword options `build` takes (None: any, it has `**kwargs`)."""
        params = list(inspect.signature(self.build).parameters.values())
        if self.from_checkpoint:
            params = params[1:]  # the checkpoint path
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def takes(self, option: str) -> bool:
        options = self.options()
        return options is None or option in options

    def check_options(self, options: Mapping[str, Any], checkpoint: Checkpoint | None = None) -> None:
        """Refuse options this kind does not take, then run its `check`."""
        accepted = self.options()
        unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
        if unknown:
            raise ValueError(f"the {self.name!r} judge takes no option {', '.join(map(repr, unknown))}; it takes "
                             f"{', '.join(accepted) or 'none'}")
        if self.check is not None:
            self.check(checkpoint, **options)


JUDGE_KINDS: dict[str, JudgeKind] = {}  # name -> kind, in registration order


def register_judge(name: str, *, checkpoint: Callable[[Checkpoint], bool] | None = None,
                   check: Callable[..., None] | None = None, about: str | None = None):
    """Register the decorated class or factory as the judge kind `name` (see the module docstring).

    Raises:
        ValueError: `name` is taken, empty, or holds `:` (reserved for `kind:path`).
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"a judge kind needs a non-empty name without ':', got {name!r}")

    def decorator(build: Callable[..., Judge]):
        if name in JUDGE_KINDS:
            taken = JUDGE_KINDS[name].build
            raise ValueError(f"judge {name!r} is already registered ({taken.__module__}.{taken.__qualname__}); "
                             "choose another name")
        line = about if about is not None else ((build.__doc__ or "").strip().splitlines() or [""])[0]
        JUDGE_KINDS[name] = JudgeKind(name, build, checkpoint, check, line)
        return build

    return decorator


def judge_names(*, from_checkpoint: bool | None = None) -> tuple[str, ...]:
    """Registered judge kinds: all, only the named ones (`from_checkpoint=False`) or only the checkpoint kinds."""
    return tuple(k.name for k in JUDGE_KINDS.values() if from_checkpoint is None or k.from_checkpoint == from_checkpoint)


def judge_kind(name_or_path: str | os.PathLike) -> JudgeKind:
    """The kind of judge `name_or_path` names (reads a checkpoint's `config.json`; loads nothing).

    Raises:
        ValueError: neither a registered name nor a local checkpoint folder of a registered kind; the message lists
            the registered judges.
    """
    return _resolve(name_or_path)[0]


def check_judge_name(name_or_path: str | os.PathLike, **options: Any) -> JudgeKind:
    """Validate a judge name and its options before anything is loaded, and return its kind.

    Cheap: a registered name is looked up; a path is checked to be a local checkpoint folder whose `config.json`
    says which kind it is; the options are checked against the kind (e.g. a classifier needs `refusal_labels`, each
    one of the checkpoint's labels). No model, tokenizer or Hub lookup.

    Raises:
        ValueError: with a message that says what to change.
    """
    kind, checkpoint = _resolve(name_or_path)
    kind.check_options(options, checkpoint)
    return kind


def judge_from_name(name_or_path: str | os.PathLike, **options: Any) -> Judge:
    """Build a judge from a registered name or a local checkpoint folder (for the command line and configs).

    - `"keyword"`: [`RefusalKeywordJudge`] (options: `phrases`, `prefixes`).
    - `"safety_world"`: SafetyWorld's exact judge (the embedded demo world).
    - a checkpoint folder whose `config.architectures` is a `*ForSequenceClassification`: [`ClassifierJudge`]
      (options must include `refusal_labels`).
    - a checkpoint folder with a `*ForCausalLM` / `*ForConditionalGeneration` architecture: [`GuardModelJudge`].
    - `kind:folder` names the checkpoint kind explicitly; any other registered kind by its name (see
      [`register_judge`]).

    `options` are passed to the judge's constructor; it is validated first, as by [`check_judge_name`].
    """
    kind, checkpoint = _resolve(name_or_path)
    kind.check_options(options, checkpoint)
    judge = kind.build(**options) if checkpoint is None else kind.build(checkpoint.path, **options)
    if not isinstance(judge, Judge):
        raise TypeError(f"the {kind.name!r} judge built a {type(judge).__name__}, which lacks the Judge protocol "
                        "(a `name` and `__call__(prompts, replies) -> list[bool]`)")
    return judge


# ------------------------------------------------------------------------------------------------------------ resolve


def _resolve(name_or_path: str | os.PathLike) -> tuple[JudgeKind, Checkpoint | None]:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"a judge is named by a string, got {type(name_or_path).__name__} {name_or_path!r}")
    name = os.fspath(name_or_path)
    kind = JUDGE_KINDS.get(name)
    if kind is not None and not kind.from_checkpoint:
        return kind, None
    if kind is not None:
        raise ValueError(f"{name!r} is a kind of judge read from a checkpoint: pass the checkpoint folder (or "
                         f"'{name}:<folder>')")
    prefix, colon, rest = name.partition(":")
    explicit = JUDGE_KINDS.get(prefix) if colon else None
    if explicit is not None and explicit.from_checkpoint:
        checkpoint = read_checkpoint(rest)
        if checkpoint is None and _HUB_REPO.fullmatch(rest):
            checkpoint = _hub_checkpoint(rest)
        if checkpoint is None:
            raise ValueError(f"{name!r}: no such checkpoint folder {rest!r} ({os.path.abspath(os.path.expanduser(rest))})")
        return explicit, checkpoint
    checkpoint = read_checkpoint(name)
    if checkpoint is None and _HUB_REPO.fullmatch(name):
        checkpoint = _hub_checkpoint(name)
    if checkpoint is None:
        raise ValueError(_unknown_message(name))
    matching = [k for k in JUDGE_KINDS.values() if k.from_checkpoint and k.checkpoint(checkpoint)]
    if len(matching) == 1:
        return matching[0], checkpoint
    kinds = [k for k in JUDGE_KINDS.values() if k.from_checkpoint]
    if not matching:
        raise ValueError(f"cannot tell what kind of judge {name!r} is: config.architectures = "
                         f"{checkpoint.architectures}; the checkpoint kinds are "
                         + "; ".join(f"{k.name} ({k.about})" for k in kinds))
    raise ValueError(f"{name!r} fits several kinds of judge ({', '.join(k.name for k in matching)}); name one, e.g. "
                     f"'{matching[0].name}:{name}'")


# a Hub repository id ("owner/name"): what a user types for Llama Guard, WildGuard or the HarmBench classifier
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_checkpoint(repo_id: str) -> Checkpoint:
    """A Hub repository's ``config.json`` (one small file, from the local cache when it is there), so the kind of
    judge and its labels are checked before any weights download or load."""
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(repo_id, "config.json")
    except Exception as err:  # offline, gated, missing: the judge cannot be built, say so before any model loads
        raise ValueError(f"judge {repo_id!r} is neither a registered judge nor a local folder, and its config.json "
                         f"could not be fetched from the Hub ({type(err).__name__}: {err}); check the repository id "
                         f"and your access, or download it (`hf download {repo_id} --local-dir <folder>`) and pass "
                         "the folder") from None
    checkpoint = read_checkpoint(os.path.dirname(config_file))
    return Checkpoint(repo_id, checkpoint.config)


def _unknown_message(name: str) -> str:
    named = judge_names(from_checkpoint=False)
    close = difflib.get_close_matches(name, named, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    looks_like_path = os.sep in name or "/" in name or name.startswith((".", "~"))
    where = os.path.abspath(os.path.expanduser(name))
    return (f"unknown judge {name!r}{hint}: "
            + (f"no such folder ({where}); " if looks_like_path else "")
            + f"the registered judges are {', '.join(map(repr, named))}; a model-backed judge "
            f"({', '.join(judge_names(from_checkpoint=True))}) is the path of a local checkpoint folder or a Hub "
            "repository id 'owner/name'")
