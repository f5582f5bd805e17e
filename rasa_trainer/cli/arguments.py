"""Checks of the data arguments of the ``rasa-trainer`` subcommands that need the whole command line: a user's data
must come with the user's model, never silently with the SafetyWorld demo model."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["check_dataset_has_model"]


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
