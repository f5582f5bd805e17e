"""``rasa-trainer build-pairs``: build RASA pairs from public jailbreak shapes and write them as JSON lines.

Two builders (see :mod:`rasa_trainer.data.pairs`):

- ``--from columns``: a table holding both sides of each pair, by default the WildJailbreak shape::

      rasa-trainer build-pairs --from columns --input train.tsv --output pairs.jsonl --attack_name wildjailbreak

- ``--from templates``: jailbreak templates (PyRIT-style YAML, text files, directories of them) crossed with goals::

      rasa-trainer build-pairs --from templates --templates jailbreaks/ --goals advbench.csv --goals_column goal \\
          --num_pairs 2000 --seed 0 --output pairs.jsonl

Arguments can also come from a YAML file with ``--config build.yaml`` (keys are the argument names; ``from:`` is
accepted for ``build_from``); command-line arguments override it. Errors are reported before anything is written,
and ``--output`` may not be one of the files read (``--input``, ``--templates``, ``--goals``, ``--config``), under any
name. A template folder as a library publishes it (e.g. PyRIT's ``pyrit/datasets/jailbreak/templates``) is read whole:
templates that need variables other than ``{{ prompt }}`` are skipped and templates sharing a name are told apart by
their file, each with one warning line (see :func:`rasa_trainer.data.pairs.load_templates`).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import dataclass, field

from trl import TrlParser

from ._errors import UsageError

BUILDERS = ("columns", "templates")


@dataclass
class BuildPairsArguments:
    """Arguments of ``rasa-trainer build-pairs``."""

    build_from: str = field(
        default="columns",
        metadata={"help": "Builder: 'columns' (a table with both sides of each pair, e.g. WildJailbreak) or "
                          "'templates' (jailbreak templates x goals).", "choices": list(BUILDERS),
                  "aliases": ["--from"]},
    )
    output: str | None = field(default=None, metadata={"help": "The JSONL file to write (required)."})
    # --from columns
    input: list[str] | None = field(
        default=None,
        metadata={"help": "columns: table file(s) (.jsonl, .json, .csv, .tsv, .parquet); several are concatenated."},
    )
    adversarial_column: str = field(default="adversarial", metadata={"help": "columns: column copied to 'prompt'."})
    anchor_column: str = field(default="vanilla", metadata={"help": "columns: column copied to 'anchor_prompt'."})
    type_column: str | None = field(
        default="data_type",
        metadata={"help": "columns: column whose value selects rows; 'none' or '' keeps every row."},
    )
    keep_types: list[str] = field(
        default_factory=lambda: ["adversarial_harmful"],
        metadata={"help": "columns: values of --type_column to keep."},
    )
    attack_column: str | None = field(default=None, metadata={"help": "columns: column copied to 'attack'."})
    goal_column: str | None = field(default=None, metadata={"help": "columns: column copied to 'goal'."})
    completion_column: str | None = field(default=None, metadata={"help": "columns: column copied to 'completion'."})
    attack_name: str | None = field(
        default=None, metadata={"help": "columns: one 'attack' name for every row (without --attack_column)."}
    )
    # --from templates
    templates: list[str] | None = field(
        default=None,
        metadata={"help": "templates: template files (PyRIT-style YAML with 'name' and 'value', or Jinja text with "
                          "{{ prompt }}) or directories of them."},
    )
    goals: str | None = field(
        default=None, metadata={"help": "templates: goals file (.txt one per line, or a table with --goals_column)."}
    )
    goals_column: str = field(default="goal", metadata={"help": "templates: column of the goals table."})
    num_pairs: int | None = field(
        default=None, metadata={"help": "templates: draw this many (goal, template) combinations; unset: all of them."}
    )
    per_goal: int | None = field(default=None, metadata={"help": "templates: draw this many templates per goal."})
    seed: int = field(default=0, metadata={"help": "templates: seed of the draw (random.Random(seed))."})
    completion: str | None = field(
        default=None,
        metadata={"help": "templates: the refusal to train toward, for every row; unset: none (training uses its "
                          "default)."},
    )


class _Parser(TrlParser):
    """TrlParser that also reads ``from:`` in a YAML config (``from`` cannot be a dataclass field name)."""

    def set_defaults_with_config(self, **kwargs):
        if "from" in kwargs:
            kwargs.setdefault("build_from", kwargs.pop("from"))
        return super().set_defaults_with_config(**kwargs)


def build(args: BuildPairsArguments):
    """Build the pairs described by ``args`` (a ``datasets.Dataset``); nothing is written."""
    from datasets import concatenate_datasets

    from rasa_trainer.data.pairs import pairs_from_columns, pairs_from_templates

    if args.build_from == "columns":
        if not args.input:
            raise ValueError("--from columns needs --input (one or more table files)")
        type_column = None if (args.type_column or "").lower() in ("", "none") else args.type_column
        parts = [
            pairs_from_columns(
                path, adversarial_column=args.adversarial_column, anchor_column=args.anchor_column,
                type_column=type_column, keep_types=args.keep_types, attack_column=args.attack_column,
                goal_column=args.goal_column, completion_column=args.completion_column, attack_name=args.attack_name,
            )
            for path in args.input
        ]
        return parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    if args.build_from == "templates":
        if not args.templates or not args.goals:
            raise ValueError("--from templates needs --templates (files or directories) and --goals (a file)")
        return pairs_from_templates(args.templates, args.goals, num_pairs=args.num_pairs, per_goal=args.per_goal,
                                    seed=args.seed, goal_column=args.goals_column, completion=args.completion)
    raise ValueError(f"--from {args.build_from!r}; expected one of {BUILDERS}")


def input_paths(args: BuildPairsArguments, argv: list[str] | None = None) -> list[str]:
    """Every file ``args`` reads (tables, template files and folders, goals) and the ``--config`` file of ``argv``."""
    paths = [*(args.input or []), *(args.templates or []), *([args.goals] if args.goals else [])]
    for i, arg in enumerate(argv or []):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), build the pairs and write them to ``--output``; returns 0.

    Raises:
        UsageError: a bad argument, file or row (the message names it); nothing is written then. The ``rasa-trainer``
            command prints it and exits with status 2.
    """
    from rasa_trainer.data.pairs import check_output_path, write_pairs_jsonl

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser((BuildPairsArguments,), prog="rasa-trainer build-pairs")
    (args,) = parser.parse_args_and_config(argv)
    if not args.output:
        raise UsageError("--output is required: the JSONL file to write")
    # warnings of the builders (templates skipped or renamed) reach the user as one line each, unless the
    # application has configured logging itself
    logging.basicConfig(level=logging.WARNING, format="rasa-trainer build-pairs: %(message)s")
    try:
        check_output_path(args.output, input_paths(args, argv))
        pairs = build(args)
        path = write_pairs_jsonl(pairs, args.output)
    except (ValueError, OSError) as err:  # bad inputs, not bugs: the user fixes an argument or a file
        raise UsageError(str(err)) from err
    attacks = Counter(a for a in pairs["attack"] if a) if "attack" in pairs.column_names else Counter()
    summary = ", ".join(f"{name}: {n}" for name, n in attacks.items()) or "no attack names"
    print(f"wrote {len(pairs)} pairs ({summary}) to {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as error:
        print(f"rasa-trainer build-pairs: error: {error}", file=sys.stderr)
        sys.exit(2)
