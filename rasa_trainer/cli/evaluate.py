"""``rasa-trainer evaluate``: evaluate a saved checkpoint on evaluation sets and write ``results.json``.

    rasa-trainer evaluate --model_name_or_path outputs/safety_world/model            # SafetyWorld's sets
    rasa-trainer evaluate --model_name_or_path ./olmoe-rasa --eval_sets eval_sets.json --output_dir out/eval \\
        --base_model allenai/OLMoE-1B-7B-0125-Instruct                                 # + routing diagnostics

The checkpoint is loaded in the dtype it was saved in (``--dtype auto``) unless told otherwise, so the numbers are
those of the published artefact. ``--eval_sets`` is ``safety_world`` (the default: SafetyWorld's evaluation sets, its
exact judge and answer check) or a JSON file ``{"attacks": [...], "anchors": [...], "over_refusal": [...],
"utility": [...], "wrapped_benign": [...]}`` (see ``rasa_trainer.evaluate_safety``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .common import (
    SAFETY_WORLD,
    ModelArguments,
    UsageError,
    check_at_least,
    check_judge,
    check_model,
    check_output_dir,
    dtype_name,
    eval_suite,
    load_eval_sets,
    load_model,
    model_location,
    parse,
    torch_dtype,
)


@dataclass
class EvaluationArguments:
    """Evaluation sets, judge and generation arguments of ``rasa-trainer evaluate`` (the checkpoint:
    ``--model_name_or_path``)."""

    eval_sets: str = field(
        default=SAFETY_WORLD,
        metadata={"help": "'safety_world' (SafetyWorld's evaluation sets) or a JSON file of evaluation sets."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write results.json. Default: the checkpoint folder itself."}
    )
    judge: str | None = field(
        default=None,
        metadata={"help": "'keyword', 'safety_world' or the folder of a classifier / guard model. Default: "
                          "SafetyWorld's exact judge for its sets, 'keyword' otherwise."},
    )
    judge_refusal_labels: list[str] | None = field(
        default=None, metadata={"help": "For a classifier judge: the labels that mean 'refused'."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "The model before alignment (folder, Hub id or 'safety_world'): adds the routing shift and "
                          "the attack success under the base model's routing."},
    )
    world_seed: int = field(default=0, metadata={"help": "Seed of SafetyWorld's evaluation sets."})
    batch_size: int = field(default=16, metadata={"help": "Conversations per generation batch."})
    max_new_tokens: int = field(default=32, metadata={"help": "New tokens per reply."})
    include_replies: bool = field(default=False, metadata={"help": "Also write every reply into results.json."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})


def _output_dir(args: EvaluationArguments, model_args: ModelArguments) -> str:
    if args.output_dir:
        return args.output_dir
    location = model_location(model_args.model_name_or_path)
    if not os.path.isdir(location) or model_args.model_name_or_path == SAFETY_WORLD:
        raise UsageError("--output_dir is required when --model_name_or_path is not a local checkpoint folder")
    return location


def _artifact_path(name: str) -> str:
    location = model_location(name)
    return os.path.abspath(location) if os.path.isdir(location) else name


def preflight(args: EvaluationArguments, model_args: ModelArguments) -> tuple[dict, str]:
    """Check the arguments and read the evaluation sets before any model is loaded."""
    check_at_least("--batch_size", args.batch_size, 1)
    check_at_least("--max_new_tokens", args.max_new_tokens, 1)
    torch_dtype(model_args.dtype)
    check_model(model_args.model_name_or_path)
    if args.base_model:
        check_model(args.base_model, flag="--base_model")
    check_judge(args.judge, refusal_labels=args.judge_refusal_labels)
    output_dir = _output_dir(args, model_args)
    check_output_dir(output_dir)
    sets = load_eval_sets(args.eval_sets, world_seed=args.world_seed)  # every row checked (cli/common.py)
    return sets, output_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``rasa-trainer evaluate``; returns what it writes to results.json."""
    import torch

    from ..evaluation.evaluate import evaluate_safety
    from ..utils import atomic_write_json

    args, model_args = parse((EvaluationArguments, ModelArguments), argv, "rasa-trainer evaluate")
    sets, output_dir = preflight(args, model_args)
    suite = eval_suite(args.eval_sets, sets, args.judge, args.judge_refusal_labels)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model, tokenizer = load_model(model_args, device=device)
    base_model = None
    if args.base_model:
        base_args = ModelArguments(**{**vars(model_args), "model_name_or_path": args.base_model})
        base_model, _ = load_model(base_args, device=device)
    report = evaluate_safety(
        model, tokenizer, suite.sets, suite.judge, refusal_judge=suite.refusal_judge, base_model=base_model,
        utility_check=suite.utility_check, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    results = {
        "evaluated_artifact": {"path": _artifact_path(model_args.model_name_or_path), "dtype": dtype_name(model)},
        "eval_sets": args.eval_sets if args.eval_sets == SAFETY_WORLD else os.path.abspath(args.eval_sets),
        "base_model": args.base_model,
        "report": report.to_dict(include_replies=args.include_replies),
    }
    atomic_write_json(results, os.path.join(output_dir, "results.json"))
    print(report.format_table())
    print(f"results -> {os.path.join(output_dir, 'results.json')}")
    return results
