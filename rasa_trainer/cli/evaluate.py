"""``rasa-trainer evaluate``: evaluate a saved checkpoint on evaluation sets and write ``results.json``.

    rasa-trainer evaluate --model_name_or_path outputs/safety_world/model            # SafetyWorld's sets
    rasa-trainer evaluate --model_name_or_path ./olmoe-rasa --eval_sets eval_sets.json --output_dir out/eval \\
        --base_model allenai/OLMoE-1B-7B-0125-Instruct                                 # + routing diagnostics
    rasa-trainer evaluate --model_name_or_path ./olmoe-rasa --output_dir out/eval --eval_sets eval_sets.json \\
        --attack_experts sce/ --attacks routing,refusal_suppression,unsafe_steering --attack_budget 2   # + attacks

The checkpoint is loaded in the dtype it was saved in (``--dtype auto``) unless told otherwise, so the numbers are
those of the published artefact. ``--eval_sets`` is ``safety_world`` (the default: SafetyWorld's evaluation sets, its
exact judge and answer check) or a JSON file ``{"attacks": [...], "anchors": [...], "over_refusal": [...],
"utility": [...], "wrapped_benign": [...]}`` (see ``rasa_trainer.evaluate_safety``). ``--benchmark NAME=PATH``
(repeatable) reads a benchmark file as published (``rasa_trainer.evaluation.benchmarks``), e.g. ``--benchmark
harmbench=harmbench_behaviors_text_test.csv --benchmark xstest=xstest_prompts.csv``, and ``--attack_templates
<PyRIT-style folder>`` wraps the behaviours into attack sets; benchmarks replace the default SafetyWorld sets and come
after the rows of an ``--eval_sets`` file. ``results.json`` holds every rate with its ``n`` and 95% Wilson interval
(``report.intervals``), the judges (name, version, format) and the files read with their SHA-256 (``benchmarks``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .arguments import JudgeArguments, check_generation_options, join_repeated
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
    load_model_skeleton,
    load_selection,
    model_location,
    parse,
    torch_dtype,
    with_judge_cache,
)


@dataclass
class EvaluationArguments:
    """Evaluation sets, judge and generation arguments of ``rasa-trainer evaluate`` (the checkpoint:
    ``--model_name_or_path``)."""

    eval_sets: str = field(
        default=SAFETY_WORLD,
        metadata={"help": "'safety_world' (SafetyWorld's evaluation sets) or a JSON file of evaluation sets."},
    )
    benchmark: list[str] | None = field(
        default=None,
        metadata={"help": "NAME=PATH, repeatable: a benchmark file as published (harmbench, jailbreakbench, "
                          "jailbreakbench-benign, strongreject, xstest, or-bench, or-bench-toxic, wildjailbreak). "
                          "Replaces the SafetyWorld sets; added after the rows of an --eval_sets file."},
    )
    attack_templates: list[str] | None = field(
        default=None,
        metadata={"help": "Jailbreak templates (PyRIT-style folders or files) that wrap the behaviours of the "
                          "--benchmark behaviour sets into attack sets, one family per template."},
    )
    templates_per_goal: int | None = field(
        default=None, metadata={"help": "With --attack_templates: templates drawn per behaviour (default: all)."}
    )
    templates_seed: int = field(default=0, metadata={"help": "With --templates_per_goal: the seed of the draw."})
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
    attacks: str | None = field(
        default=None,
        metadata={"help": "Comma-separated attacks to run beside plain jailbreaks: 'base' (ASR under the base model's "
                          "routing; needs --base_model), 'routing' (steering toward the base model's Safety-Critical "
                          "Experts; needs --attack_experts), 'refusal_suppression' (switch off the evaluated model's "
                          "refusal experts) and 'unsafe_steering' (steer jailbreaks toward its compliance experts); "
                          "the last two are off by default and need --attack_budget. Default: 'base' with --base_model, "
                          "'routing' with --attack_experts."},
    )
    attack_experts: str | None = field(
        default=None,
        metadata={"help": "The base model's safety_critical_experts.json (or its folder), for the 'routing' attack."},
    )
    attack_budget: int | None = field(
        default=None,
        metadata={"help": "How many experts 'refusal_suppression' switches off and 'unsafe_steering' steers toward "
                          "(per MoE layer, or in total with --attack_budget_scope total)."},
    )
    attack_budget_scope: str = field(
        default="per_layer", metadata={"help": "'per_layer' or 'total': how --attack_budget counts experts."}
    )
    attack_positions: str = field(
        default="decision",
        metadata={"help": "Where the steering attacks steer: 'decision' (the prompt's last position), 'generated' "
                          "(every position that produces a reply token) or 'all'."},
    )
    attack_margin: float = field(
        default=0.01, metadata={"help": "The steering attacks' margin over the row's maximum log-probability."}
    )
    world_seed: int = field(default=0, metadata={"help": "Seed of SafetyWorld's evaluation sets."})
    batch_size: int = field(default=16, metadata={"help": "Conversations per generation batch."})
    max_new_tokens: int = field(default=32, metadata={"help": "New tokens per reply."})
    include_replies: bool = field(default=False, metadata={"help": "Also write every reply into results.json."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})
    generation_backend: str = field(
        default="hf",
        metadata={"help": "What generates the replies: 'hf' (transformers generate) or 'vllm' (vLLM on the model "
                          "folder; `pip install vllm`). The attacks that force or steer routing (--base_model, "
                          "--attack_experts, the profiled attacks) run on HF generate either way.",
                  "choices": ["hf", "vllm"]},
    )
    vllm_kwargs: str | None = field(
        default=None,
        metadata={"help": "With --generation_backend vllm: further vllm.LLM arguments as JSON, e.g. "
                          "'{\"gpu_memory_utilization\": 0.5}'."},
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={"help": "Extra chat-template variables as JSON, e.g. '{\"enable_thinking\": false}' for Qwen3."},
    )


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


def attack_names(args: EvaluationArguments) -> list[str] | None:
    """``--attacks`` as a list of names, checked: known names, each with the flag it needs."""
    from ..evaluation.attacks import ATTACKS, BUDGET_SCOPES, PROFILED_ATTACKS
    from ..evaluation.steering import STEERING_POSITIONS

    if args.attack_budget_scope not in BUDGET_SCOPES:
        raise UsageError(f"--attack_budget_scope {args.attack_budget_scope}: expected one of {list(BUDGET_SCOPES)}")
    if args.attack_positions not in STEERING_POSITIONS:
        raise UsageError(f"--attack_positions {args.attack_positions}: expected one of {list(STEERING_POSITIONS)}")
    check_at_least("--attack_margin", args.attack_margin, 0)
    if args.attack_budget is not None:
        check_at_least("--attack_budget", args.attack_budget, 1)
    if args.attacks is None:
        return None
    names = [name.strip() for name in args.attacks.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise UsageError(f"--attacks {args.attacks}: unknown attack(s) {unknown}; expected a comma-separated list of "
                         f"{', '.join(ATTACKS)}")
    needs = {"base": ("--base_model", args.base_model), "routing": ("--attack_experts", args.attack_experts)}
    needs.update({name: ("--attack_budget", args.attack_budget) for name in PROFILED_ATTACKS})
    for name in names:
        flag, value = needs[name]
        if value is None:
            raise UsageError(f"--attacks {name} needs {flag}")
    return names


def preflight(args: EvaluationArguments, model_args: ModelArguments,
              judge_args: JudgeArguments | None = None) -> tuple[dict, str]:
    """Check the arguments and read the evaluation sets before any model is loaded."""
    check_at_least("--batch_size", args.batch_size, 1)
    check_at_least("--max_new_tokens", args.max_new_tokens, 1)
    check_generation_options(args, "--generation_backend", args.generation_backend)
    torch_dtype(model_args.dtype)
    check_model(model_args.model_name_or_path)
    if args.base_model:
        check_model(args.base_model, flag="--base_model")
    check_judge(args.judge, refusal_labels=args.judge_refusal_labels,
                options=judge_args.options() if judge_args is not None else None)
    attack_names(args)
    if args.attack_experts:
        load_selection(args.attack_experts, flag="--attack_experts")
    output_dir = _output_dir(args, model_args)
    check_output_dir(output_dir)
    sets = load_eval_sets(args.eval_sets, world_seed=args.world_seed)  # every row checked (cli/common.py)
    sets = _with_benchmarks(args, sets)
    return sets, output_dir


def _with_benchmarks(args: EvaluationArguments, sets: dict):
    """The sets with the ``--benchmark`` files' rows (replacing SafetyWorld's default sets, after an --eval_sets
    file's rows), each file named with its SHA-256; every file read and every row checked before any model loads."""
    from ..evaluation.benchmarks import BenchmarkSource, EvalSets, file_sha256, load_benchmarks

    existing = None
    if args.eval_sets != SAFETY_WORLD:
        path = Path(args.eval_sets).expanduser()
        source = BenchmarkSource("eval_sets", str(path.resolve()), file_sha256(path), "rasa-trainer evaluation sets JSON",
                                 {name: len(rows) for name, rows in sets.items()})
        existing = EvalSets(sets, [source])
    if not args.benchmark:
        for flag, given in (("--attack_templates", args.attack_templates),
                            ("--templates_per_goal", args.templates_per_goal)):
            if given:
                raise UsageError(f"{flag} wraps the behaviours of --benchmark files, and no --benchmark is given")
        return sets if existing is None else existing
    check_at_least("--templates_per_goal", args.templates_per_goal, 1)
    try:
        return load_benchmarks(args.benchmark, templates=args.attack_templates,
                               templates_per_goal=args.templates_per_goal, seed=args.templates_seed, existing=existing)
    except (ValueError, OSError) as err:
        raise UsageError(f"--benchmark: {err}") from err


def suite_name(args: EvaluationArguments) -> str:
    """What the sets are called when choosing the default judges: ``benchmarks`` when --benchmark replaced the
    SafetyWorld sets (SafetyWorld's exact judge knows only its own world)."""
    return "benchmarks" if args.benchmark and args.eval_sets == SAFETY_WORLD else args.eval_sets


def _checked_attacks(args: EvaluationArguments, model, sets, base_model, attack_experts) -> list[str] | None:
    """The attacks, checked against the loaded model (the budget's per-layer limits, steerable routers, the expert
    file's shape) before anything is generated; a problem is a usage error naming the flag."""
    from ..evaluation.attacks import as_budget, check_attacks
    from ..evaluation.steering import steering_mask

    attacks = attack_names(args)
    try:
        if attack_experts is not None:
            steering_mask(model, attack_experts)
        check_attacks(model, attacks, sets, base_model=base_model is not None,
                      attack_experts=attack_experts is not None,
                      budget=as_budget(args.attack_budget, args.attack_budget_scope))
    except (ValueError, NotImplementedError) as err:
        raise UsageError(f"--attacks {args.attacks or '(default)'}: {err}") from err
    return attacks


def _judge_options(args: EvaluationArguments, judge_args: JudgeArguments, output_dir: str) -> dict[str, Any]:
    """The ``--judge_<option>`` values; the HTTP judge's answers are cached in the output folder unless
    ``--judge_cache`` says where."""
    return with_judge_cache(judge_args.options(), (args.judge,), output_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``rasa-trainer evaluate``; returns what it writes to results.json."""
    import torch

    from ..evaluation.evaluate import evaluate_safety
    from ..utils import atomic_write_json

    argv = join_repeated(sys.argv[1:] if argv is None else argv, ("--benchmark", "--attack_templates"))
    args, model_args, judge_args = parse((EvaluationArguments, ModelArguments, JudgeArguments), argv,
                                         "rasa-trainer evaluate")
    sets, output_dir = preflight(args, model_args, judge_args)
    suite = eval_suite(suite_name(args), sets, args.judge, args.judge_refusal_labels,
                       _judge_options(args, judge_args, output_dir))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.generation_backend == "vllm" and not (args.base_model or args.attack_experts or args.attacks):
        # only plain generation: vLLM holds the weights, the HF side needs the model's layout alone
        model, tokenizer = load_model_skeleton(model_args)
    else:
        model, tokenizer = load_model(model_args, device=device)
    base_model = None
    if args.base_model:
        base_args = ModelArguments(**{**vars(model_args), "model_name_or_path": args.base_model})
        base_model, _ = load_model(base_args, device=device)
    attack_experts = load_selection(args.attack_experts, flag="--attack_experts") if args.attack_experts else None
    attacks = _checked_attacks(args, model, suite.sets, base_model, attack_experts)
    report = evaluate_safety(
        model, tokenizer, suite.sets, suite.judge, refusal_judge=suite.refusal_judge, base_model=base_model,
        utility_check=suite.utility_check, attack_experts=attack_experts, attack_margin=args.attack_margin,
        attack_positions=args.attack_positions, attacks=attacks, attack_budget=args.attack_budget,
        attack_budget_scope=args.attack_budget_scope, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
        chat_template_kwargs=args.chat_template_kwargs, backend=args.generation_backend, vllm_kwargs=args.vllm_kwargs,
    )
    results = {
        "evaluated_artifact": {"path": _artifact_path(model_args.model_name_or_path), "dtype": dtype_name(model)},
        "eval_sets": args.eval_sets if args.eval_sets == SAFETY_WORLD else os.path.abspath(args.eval_sets),
        "benchmarks": [source.to_dict() for source in getattr(sets, "sources", ())],
        "judges": report.judges,
        "rasa_trainer_version": __version__,
        "base_model": args.base_model,
        "attack_experts": _artifact_path(args.attack_experts) if args.attack_experts else None,
        "report": report.to_dict(include_replies=args.include_replies),
    }
    atomic_write_json(results, os.path.join(output_dir, "results.json"))
    print(report.format_table())
    print(f"results -> {os.path.join(output_dir, 'results.json')}")
    return results
