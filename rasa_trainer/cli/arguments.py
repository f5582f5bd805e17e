"""Checks of the data arguments of the ``rasa-trainer`` subcommands that need the whole command line (a user's data
must come with the user's model, never silently with the SafetyWorld demo model), and the judge options shared by
the subcommands that judge replies (``JudgeArguments``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JudgeArguments", "check_dataset_has_model", "check_generation_options", "join_repeated", "json_object"]


def _value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag value`` or ``--flag=value``; the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def check_dataset_has_model(argv: Sequence[str], dataset_name: str | None, model_name_or_path: str | None) -> None:
    """Refuse ``--dataset_name`` (the user's pairs) without a model chosen by the user.

    ``rasa-trainer train`` with neither ``--config`` nor ``--model_name_or_path`` runs on the SafetyWorld demo config,
    whose model is the demo model; so ``rasa-trainer train --dataset_name pairs.jsonl`` would train the demo model on
    the user's pairs, and a ``--config`` file that names a dataset but no model would do the same. A model named on
    the command line or in the user's own config (``safety_world`` included, when written out) is a choice and passes.

    Args:
        argv: the command line as the user typed it (the demo config the command adds may be in it).
        dataset_name: the parsed ``--dataset_name``.
        model_name_or_path: the parsed ``--model_name_or_path`` (from the command line or a config file).

    Raises:
        rasa_trainer.cli.UsageError: the message says which flag to add.
    """
    from ._errors import UsageError
    from .common import SAFETY_WORLD, SAFETY_WORLD_CONFIG

    if dataset_name in (None, SAFETY_WORLD) or _value(argv, "--model_name_or_path"):
        return
    config = _value(argv, "--config")
    user_config = config is not None and os.path.realpath(os.path.expanduser(config)) != os.path.realpath(
        SAFETY_WORLD_CONFIG)
    if user_config and model_name_or_path:
        return
    where = f"the --config file {config} names no model" if user_config else "no --model_name_or_path is given"
    raise UsageError(f"--dataset_name {dataset_name}: {where}, so SafetyWorld's demo model would be trained on your "
                     "pairs; add --model_name_or_path <your model folder or Hub id> (or --model_name_or_path "
                     "safety_world to train the demo model on them)")


# the command-line options of a judge: `--judge_<option>` reaches the judge's constructor option `<option>`
JUDGE_OPTION_FLAGS = ("base_url", "model", "format", "api_key_env", "api", "max_workers", "timeout", "max_retries",
                      "cache", "controversial")


@dataclass
class JudgeArguments:
    """The options of the judges in published formats and of the OpenAI-compatible HTTP judge (``--judge openai``).
    Each reaches the judge that takes it; an option given to a command whose judges do not take it is an error."""

    judge_base_url: str | None = field(
        default=None, metadata={"help": "--judge openai: the endpoint's API root, e.g. http://localhost:8000/v1."})
    judge_model: str | None = field(
        default=None, metadata={"help": "--judge openai: the model name the endpoint serves."})
    judge_format: str | None = field(
        default=None,
        metadata={"help": "--judge openai: the prompt format: harmbench, llama_guard, wildguard, qwen3guard, "
                          "qwen3guard_loose, strongreject or refusal."})
    judge_api_key_env: str | None = field(
        default=None, metadata={"help": "--judge openai: the environment variable holding the API key (default "
                                        "OPENAI_API_KEY; the key is never logged or written)."})
    judge_api: str | None = field(
        default=None, metadata={"help": "--judge openai: 'chat' (default; chat completions) or 'completions' (the "
                                        "format's raw prompt, for HarmBench's or WildGuard's classifier)."})
    judge_max_workers: int | None = field(default=None, metadata={"help": "--judge openai: concurrent requests (8)."})
    judge_timeout: float | None = field(default=None, metadata={"help": "--judge openai: seconds per request (60)."})
    judge_max_retries: int | None = field(
        default=None, metadata={"help": "--judge openai: retries after a 429, a 5xx or a timeout, with exponential "
                                        "backoff (5)."})
    judge_cache: str | None = field(
        default=None, metadata={"help": "--judge openai: the JSON file of this run's judge answers (default: "
                                        "judge_cache.json in the output folder)."})
    judge_controversial: str | None = field(
        default=None, metadata={"help": "--judge qwen3guard:<folder>: what a Controversial verdict counts as, "
                                        "'unsafe' (strict, default) or 'safe' (loose)."})

    def options(self) -> dict[str, Any]:
        """The options given (``--judge_<option>`` -> ``<option>``), without the ones left at their default."""
        values = {name: getattr(self, f"judge_{name}") for name in JUDGE_OPTION_FLAGS}
        return {name: value for name, value in values.items() if value is not None}


def join_repeated(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``argv`` with every repetition of a list flag joined into its first: ``--benchmark a=x --benchmark b=y`` as
    ``--benchmark a=x b=y`` (argparse keeps only the last occurrence of a list option, which would drop files
    silently). ``--flag=value`` counts as one value."""
    argv = list(argv)
    out: list[str] = []
    collected: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag not in flags:
            out.append(argv[i])
            i += 1
            continue
        values = [value] if eq else []
        i += 1
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if flag not in collected:
            collected[flag] = []
            out += [flag, collected[flag]]  # the values are filled in place, in order of appearance
        collected[flag] += values
    return [item for entry in out for item in (entry if isinstance(entry, list) else [entry])]


def json_object(flag: str, value: str | dict | None) -> dict[str, Any] | None:
    """The JSON object given to ``flag`` (e.g. ``--chat_template_kwargs '{"enable_thinking": false}'``) as a dict; a
    dict (from a YAML ``--config``) as it is; ``None`` when not given. Anything else is a usage error naming the flag."""
    import json

    from ._errors import UsageError

    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise UsageError(f"{flag} {value!r} is not JSON ({err.msg}); give an object, e.g. "
                         f"{flag} '{{\"enable_thinking\": false}}'") from err
    if not isinstance(parsed, dict):
        raise UsageError(f"{flag} {value!r}: give a JSON object ({{...}}), not a {type(parsed).__name__}")
    return parsed


def check_generation_options(args, backend_flag: str, backend: str, world_size: int = 1) -> None:
    """``--chat_template_kwargs`` and ``--vllm_kwargs`` parsed from JSON (in place) and checked, and the backend
    usable (vLLM installed, one process), before anything is loaded."""
    from ..data.contract import check_chat_template_kwargs
    from ..detection.backends import check_backend
    from ._errors import UsageError

    args.chat_template_kwargs = json_object("--chat_template_kwargs", args.chat_template_kwargs)
    args.vllm_kwargs = json_object("--vllm_kwargs", args.vllm_kwargs)
    try:
        check_chat_template_kwargs(args.chat_template_kwargs, "--chat_template_kwargs")
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        check_backend(backend, world_size, args.vllm_kwargs)
    except (ValueError, ImportError) as err:
        raise UsageError(f"{backend_flag} {backend}: {err}") from err
