"""The ``rasa-trainer`` command: one subcommand per step of a RASA run, each a TRL-style script (``TrlParser``, YAML
``--config``, ``--help``).

    rasa-trainer train            detect (or load) the Safety-Critical Experts, train, save, evaluate what was saved
    rasa-trainer detect           detect the Safety-Critical Experts of a model on pairs
    rasa-trainer evaluate         evaluate a saved checkpoint on evaluation sets (SafetyWorld's by default)
    rasa-trainer estimate-memory  plan the memory of a run without downloading anything
    rasa-trainer build-pairs      turn a public jailbreak dataset into RASA pairs

With no arguments, ``rasa-trainer train`` runs the embedded SafetyWorld demo on a CPU. Every subcommand also runs as
``python -m rasa_trainer.cli <subcommand> ...`` and under ``accelerate launch -m rasa_trainer.cli <subcommand> ...``.
"""

from __future__ import annotations

import importlib
import sys

from ._errors import UsageError

SUBCOMMANDS = {
    "train": ("rasa_trainer.cli.train", "detect or load the Safety-Critical Experts, train, save, evaluate the saved model"),
    "detect": ("rasa_trainer.cli.detect", "detect the Safety-Critical Experts of a model on pairs"),
    "evaluate": ("rasa_trainer.cli.evaluate", "evaluate a saved checkpoint on evaluation sets (SafetyWorld's by default)"),
    "estimate-memory": ("rasa_trainer.cli.estimate_memory", "plan the memory of a run without downloading anything"),
    "build-pairs": ("rasa_trainer.cli.build_pairs", "turn a public jailbreak dataset into RASA pairs"),
}

__all__ = ["SUBCOMMANDS", "UsageError", "main"]


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items()]
    return ("usage: rasa-trainer <subcommand> [--config file.yaml] [--<argument> <value> ...]\n\nsubcommands:\n"
            + "\n".join(lines) + "\n\n`rasa-trainer <subcommand> --help` lists the arguments of a subcommand; "
            "`rasa-trainer train` alone runs the SafetyWorld demo.")


def main(argv: list[str] | None = None) -> int:
    """Run ``rasa-trainer <subcommand> <arguments>``; a :class:`UsageError` exits with status 2 and its message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"rasa-trainer: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        module.main(rest)
    except UsageError as err:
        print(f"rasa-trainer {name}: error: {err}", file=sys.stderr)
        return 2
    return 0
