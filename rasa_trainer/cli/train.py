"""``rasa-trainer train``: align a Mixture-of-Experts model with RASA end to end: detect (or load) the Safety-Critical
Experts, train, save the merged checkpoint, reload it from disk and evaluate what was saved.

With no arguments it runs the embedded SafetyWorld demo (``rasa_trainer/configs/safety_world.yaml``) on a CPU::

    rasa-trainer train
    accelerate launch -m rasa_trainer.cli train          # the same under accelerate

For a real model, pass a model, your pairs (the dataset contract in the README) and a config::

    accelerate launch --config_file multi_gpu.yaml -m rasa_trainer.cli train \\
        --config examples/configs/olmoe_1b_7b_instruct.yaml --dataset_name pairs.jsonl --eval_sets eval_sets.json

Writes into ``--output_dir``: safety_critical_experts.json, expert_stats.csv, risk_difference.png (when it detects),
results.json, phase_losses.png, asr_per_family.png (when it evaluates) and model/ (the merged checkpoint with its
model card, which names the evaluated artefact).

The before/after evaluation runs the plain jailbreaks and, by default, two MoE attacks (``--attacks``): the routing
attack, steering toward the Safety-Critical Experts detected on the base model (the run's selection), and
refusal-expert suppression, switching off ``--attack_budget`` (2) of the evaluated model's refusal experts per MoE
layer. Judges take the ``--judge_<option>`` options (``--judge openai --judge_base_url ... --judge_model ...
--judge_format ...``; the HTTP judge's answers are cached in ``--output_dir``/judge_cache.json).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..detection.selection import JSON_NAME as SELECTION_FILE
from .arguments import JudgeArguments
from .common import (
    SAFETY_WORLD,
    SAFETY_WORLD_CONFIG,
    EvalSuite,
    ModelLoadArguments,
    UsageError,
    build_judge,
    check_at_least,
    check_judges,
    check_model,
    check_output_dir,
    check_threshold,
    dtype_name,
    eval_suite,
    load_eval_sets,
    load_model,
    load_pairs,
    load_selection,
    options_given,
    parse,
    split_equals,
    torch_dtype,
    with_judge_cache,
)

logger = logging.getLogger("rasa")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0", "none", "")
TRAIN_ATTACKS = ("routing", "refusal_suppression", "unsafe_steering")
"""The MoE attacks ``--attacks`` can name (the base model's routing is ``--routing_diagnostics``)."""
DEFAULT_TRAIN_ATTACKS = ("routing", "refusal_suppression")
DEFAULT_ATTACK_BUDGET = 2
"""Experts per MoE layer the profiled attacks use when ``--attack_budget`` is not given: the measured setting of the
README's threat models (2 of SafetyWorld's 16; about 3% of a 64-expert layer such as OLMoE's)."""


@dataclass
class TrainScriptArguments(JudgeArguments):
    """Data, evaluation, judge and selection arguments of ``rasa-trainer train`` (training arguments: ``RASAConfig``;
    model arguments: ``ModelLoadArguments``; ``trust_remote_code`` is a ``RASAConfig`` field). The ``--judge_<option>``
    fields come from ``JudgeArguments`` (``options()``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Pairs: a .json/.jsonl/.csv/.parquet file, a folder saved with Dataset.save_to_disk, a Hub "
                          "dataset, or 'safety_world' (the embedded demo data, the default)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_sets: str | None = field(
        default=None,
        metadata={"help": "JSON file of evaluation sets (attacks, anchors, over_refusal, utility, wrapped_benign; see "
                          "rasa_trainer.evaluate_safety) or 'safety_world'. Default: SafetyWorld's with SafetyWorld "
                          "data, none otherwise."},
    )
    retain_dataset: str | None = field(
        default=None,
        metadata={"help": "Retain data mixed into expert-phase batches (at --retain_ratio): a .json/.jsonl/.csv/.parquet "
                          "file or dataset folder of `prompt` rows with an optional `completion` (rows without one get "
                          "the base model's greedy reply), or 'safety_world' for the world's retain_pairs() (benign rows "
                          "disjoint from its evaluation items). Default: none."},
    )
    safety_critical_experts: str | None = field(
        default=None,
        metadata={"help": "A saved selection (safety_critical_experts.json from `rasa-trainer detect`). Default: the "
                          "one in the checkpoint resumed from, else detect on the training pairs."},
    )
    judge: str | None = field(
        default=None,
        metadata={"help": "Judge of detection and evaluation: 'keyword', 'safety_world' or a local classifier/guard "
                          "checkpoint. Default: SafetyWorld's exact judge for SafetyWorld data and evaluation sets, "
                          "'keyword' otherwise. --detection_judge, when given, sets the judge of detection (the two "
                          "must then agree)."},
    )
    judge_refusal_labels: list[str] | None = field(
        default=None, metadata={"help": "For a classifier judge (--judge or --detection_judge): the labels that mean "
                                        "'refused'."}
    )
    world_seed: int = field(default=0, metadata={"help": "Seed of the SafetyWorld data and evaluation sets."})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "New tokens per reply in evaluation."})
    eval_batch_size: int = field(default=16, metadata={"help": "Generation batch size of evaluation."})
    skip_eval: bool = field(default=False, metadata={"help": "Skip the before/after evaluation."})
    routing_diagnostics: bool = field(
        default=True,
        metadata={"help": "Routing shift and ASR under the base model's routing (keeps a copy of the base model)."},
    )
    attacks: str | None = field(
        default=None,
        metadata={"help": "MoE attacks of the before/after evaluation, comma-separated, or 'none': 'routing' (steer "
                          "toward the Safety-Critical Experts detected on the base model, at the decision position), "
                          "'refusal_suppression' (switch off the evaluated model's --attack_budget top refusal "
                          "experts; needs 'anchors' in the evaluation sets), 'unsafe_steering' (steer the jailbreaks "
                          "toward its compliance experts). Default: routing and refusal_suppression, each where it can "
                          "run (a selection; anchors; softmax routers; a log line names the others); results.json "
                          "lists the attacks run."},
    )
    attack_budget: int | None = field(
        default=None,
        metadata={"help": f"Experts that refusal_suppression switches off and unsafe_steering steers toward, per MoE "
                          f"layer (or in total with --attack_budget_scope total). Default: {DEFAULT_ATTACK_BUDGET} per "
                          "layer."},
    )
    attack_budget_scope: str = field(
        default="per_layer", metadata={"help": "'per_layer' or 'total': how --attack_budget counts experts."}
    )


@dataclass
class Inputs:
    """Everything read and checked before the model is loaded."""

    pairs: Any
    suite: EvalSuite | None
    detection_judge: str
    selection: Any
    resume: str | None
    retain: Any = None
    judge_options: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None):
    """``(script_args, training_args, model_args)``; with neither ``--config`` nor ``--model_name_or_path`` the
    SafetyWorld demo config is the base."""
    from .arguments import check_dataset_has_model
    from ..training.config import RASAConfig

    argv = split_equals(list(sys.argv[1:] if argv is None else argv), ("--config", "--model_name_or_path"))
    if "--config" not in argv and "--model_name_or_path" not in argv:
        argv = ["--config", str(SAFETY_WORLD_CONFIG), *argv]
    parsed = parse((TrainScriptArguments, RASAConfig, ModelLoadArguments), argv, "rasa-trainer train")
    check_dataset_has_model(argv, parsed[0].dataset_name, parsed[2].model_name_or_path)
    resolve_detection_judge(parsed[0], parsed[1], options_given(argv))
    return parsed


def resolve_detection_judge(script_args: TrainScriptArguments, args, given: set[str]) -> None:
    """The judge of detection, written into ``args.detection_judge`` (so training_args.json records the judge used):
    ``--detection_judge`` when given (command line or YAML), else ``--judge``, else SafetyWorld's judge for SafetyWorld
    data and 'keyword' otherwise. Both given and different is refused."""
    if "detection_judge" in given:
        if script_args.judge is not None and script_args.judge != args.detection_judge:
            raise UsageError(
                f"--judge {script_args.judge} and --detection_judge {args.detection_judge} disagree: --judge is the "
                "judge of detection and evaluation, --detection_judge the judge of detection; give one of them, or the "
                "same judge to both (to evaluate with another judge, run `rasa-trainer evaluate --judge ...` on the "
                "saved model)")
        return
    world_data = script_args.dataset_name in (None, SAFETY_WORLD)
    args.detection_judge = script_args.judge or (SAFETY_WORLD if world_data else "keyword")


def resolve_resume(value: Any, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: true = the newest complete checkpoint-* in ``output_dir`` (incomplete ones, left
    by an interrupted save, are skipped with a log line), false/unset = none, else a folder that must exist."""
    from ..training.checkpoints import checkpoint_folders, checkpoint_problem

    if value is None or value is False or str(value).strip().lower() in FALSE_WORDS:
        return None
    if value is True or str(value).strip().lower() in TRUE_WORDS:
        for folder in reversed(checkpoint_folders(output_dir)):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            logger.warning("skipping incomplete checkpoint %s: %s", folder, problem)
        raise UsageError(f"--resume_from_checkpoint true: there is no complete checkpoint-* folder in --output_dir "
                         f"{output_dir} to resume from; give a checkpoint folder, or drop the flag to start afresh")
    folder = os.path.expanduser(str(value))
    if not os.path.isdir(folder):
        raise UsageError(f"--resume_from_checkpoint {value}: no such folder; give a checkpoint-* folder written by "
                         "the trainer, or true for the latest one in --output_dir")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise UsageError(f"--resume_from_checkpoint {value}: cannot resume from it: {problem}; give a complete "
                         "checkpoint-* folder, or true for the newest complete one in --output_dir")
    return folder


def check_run_folder(args, resume: str | None) -> None:
    """One run per output folder, before anything is loaded: no other run holds ``--output_dir``; a new run does not
    land on another run's checkpoint-* folders (unless ``--overwrite_output_dir``); ``model/`` holds no symbolic link
    the save would write through."""
    from ..training.output_folder import OutputFolderError, earlier_checkpoints, refuse_links, run_lock_holder

    holder = run_lock_holder(args.output_dir)
    if holder is not None:
        raise UsageError(f"--output_dir {args.output_dir} is in use by another run ({holder}); one run per output "
                         "folder: wait for it to finish, or choose another --output_dir")
    try:
        if resume is None:
            earlier_checkpoints(args.output_dir, args.overwrite_output_dir)
        model_dir = os.path.join(args.output_dir, "model")
        if os.path.lexists(model_dir):
            refuse_links(model_dir, allow_self=False)
    except OutputFolderError as err:
        raise UsageError(f"--output_dir: {err}") from err


@contextlib.contextmanager
def run_lock(output_dir: str, main_process: bool):
    """The main process holds ``output_dir``'s run lock for the whole command (the trainer inside joins it)."""
    from ..training.output_folder import OutputFolderError, hold_run_lock

    if not main_process:
        yield
        return
    try:
        lock = hold_run_lock(output_dir)
    except OutputFolderError as err:
        raise UsageError(f"--output_dir: {err}") from err
    with lock:
        yield


def check_resumed_run(resume: str | None, args, pairs, selection) -> None:
    """Resuming: the arguments that shape the result, the pairs and the selection must be those the checkpoint was
    trained with, before anything is loaded (the trainer checks the rest, and all of it again, before the first
    step; the world size it checks alone)."""
    from ..training.checkpoints import read_fingerprint
    from ..training.run_identity import run_differences

    if resume is None or args.ignore_checkpoint_mismatch or "args" not in read_fingerprint(resume):
        return  # (a manifest without a run fingerprint was not written by a run: the trainer refuses it, naming it)
    differences = [d for d in run_differences(resume, args, pairs, selection) if not d.startswith("world_size:")]
    if differences:
        raise UsageError(f"--resume_from_checkpoint {resume}: the checkpoint belongs to another run: "
                         f"{'; '.join(differences)}. Resume with the arguments, data and selection it was trained with, "
                         "start a new run in another --output_dir, or pass --ignore_checkpoint_mismatch true to resume "
                         "anyway")


def check_resumed_model(resume: str | None, model, tokenizer, args) -> None:
    """Resuming: the model just loaded (config, weights, dtype) and its tokenizer (vocabulary, special tokens, chat
    template) must be those the checkpoint was trained from, before any evaluation or training. (With
    ``--chat_template_path``, ``--eos_token`` or ``--pad_token`` the trainer changes the tokenizer first, and checks it
    itself before the first step.)"""
    if resume is None or any(getattr(args, name, None) for name in ("chat_template_path", "eos_token", "pad_token")):
        return
    from ..training.run_identity import checkpoint_model_differences

    differences = checkpoint_model_differences(resume, model, tokenizer)
    if not differences:
        return
    listed = "; ".join(differences)
    if args.ignore_checkpoint_mismatch:
        logger.warning("resuming from %s although it was trained from another model (%s)", resume, listed)
        return
    raise UsageError(f"--resume_from_checkpoint {resume}: the checkpoint was trained from another model: {listed}. "
                     "Resume with the --model_name_or_path, --dtype and tokenizer the run started from, start a new "
                     "run in another --output_dir, or pass --ignore_checkpoint_mismatch true to resume anyway")


def check_values(script_args: TrainScriptArguments, args) -> None:
    """Ranges of the numeric arguments, before anything is loaded (``RASAConfig`` checks its own fields; a threshold
    of 1 passes there but can select nothing, since experts need RD > threshold)."""
    from ..evaluation.attacks import BUDGET_SCOPES

    check_threshold("--sce_threshold", args.sce_threshold)
    check_at_least("--eval_batch_size", script_args.eval_batch_size, 1)
    check_at_least("--eval_max_new_tokens", script_args.eval_max_new_tokens, 1)
    check_at_least("--attack_budget", script_args.attack_budget, 1)
    if script_args.attack_budget_scope not in BUDGET_SCOPES:
        raise UsageError(f"--attack_budget_scope {script_args.attack_budget_scope}: expected one of "
                         f"{list(BUDGET_SCOPES)}")
    _attack_list(script_args)


def preflight(script_args: TrainScriptArguments, args, model_args: ModelLoadArguments) -> Inputs:
    """Check every argument and read every input file, so that mistakes fail before any model is loaded."""
    check_values(script_args, args)
    torch_dtype(model_args.dtype)
    check_model(model_args.model_name_or_path or SAFETY_WORLD)
    options = judge_options(script_args, args)
    check_judges([("--judge", script_args.judge), ("--detection_judge", args.detection_judge)],
                 script_args.judge_refusal_labels, options)
    check_output_dir(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_run_folder(args, resume)
    selection = _selection(script_args, args, resume)
    if selection is None and args.rasa_schedule in ("alternate", "expert_only"):
        _check_detection_backend(args)
    pairs = _pairs(script_args, args)
    check_resumed_run(resume, args, pairs, selection)
    world_data = script_args.dataset_name in (None, SAFETY_WORLD)
    suite = _suite(script_args, world_data, options)
    has_selection = selection is not None or args.rasa_schedule in ("alternate", "expert_only")
    attacks = resolve_attacks(script_args, suite, has_selection)
    return Inputs(pairs, suite, args.detection_judge, selection, resume, _retain(script_args, args),
                  judge_options=options, attacks=attacks)


def judge_options(script_args: TrainScriptArguments, args) -> dict[str, Any]:
    """The ``--judge_<option>`` values; with the HTTP judge (``--judge openai`` or ``--detection_judge openai``) its
    answers are cached in ``--output_dir``/judge_cache.json unless ``--judge_cache`` says where."""
    return with_judge_cache(script_args.options(), (script_args.judge, args.detection_judge), args.output_dir)


def _attack_list(script_args: TrainScriptArguments) -> tuple[str, ...] | None:
    """``--attacks`` as names, checked (None: not given, the default)."""
    value = script_args.attacks
    if value is None:
        return None
    if str(value).strip().lower() in FALSE_WORDS:
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in str(value).split(",") if name.strip()))
    unknown = [name for name in names if name not in TRAIN_ATTACKS]
    if unknown:
        hint = " (the base model's routing is --routing_diagnostics)" if "base" in unknown else ""
        raise UsageError(f"--attacks {value}: unknown attack(s) {unknown}{hint}; expected a comma-separated list of "
                         f"{', '.join(TRAIN_ATTACKS)}, or none")
    return names


def _attack_needs(name: str, sets: dict, has_selection: bool) -> list[str]:
    """What the attack ``name`` lacks to run on these evaluation sets (empty: it can run)."""
    from ..evaluation.attacks import PROFILED_ATTACKS

    missing = []
    if name == "routing" and not has_selection:
        missing.append("the Safety-Critical Experts of the base model (--rasa_schedule router_only and full detect "
                       "none: give --safety_critical_experts)")
    if name != "refusal_suppression" and not sets.get("attacks"):
        missing.append("the 'attacks' evaluation set (the jailbreaks it reports ASR on)")
    if name in PROFILED_ATTACKS and not sets.get("anchors"):
        missing.append("the 'anchors' evaluation set (the plain harmful requests whose refusals are profiled)")
    return missing


def resolve_attacks(script_args: TrainScriptArguments, suite: EvalSuite | None,
                    has_selection: bool) -> tuple[str, ...]:
    """The MoE attacks of the before/after evaluation, before any model loads: those ``--attacks`` names, each with
    what it needs, or by default those of ``routing`` and ``refusal_suppression`` that can run (the others named in a
    log line). An attack option without an evaluation, or a budget no attack uses, is an error (never ignored)."""
    from ..evaluation.attacks import PROFILED_ATTACKS

    asked = _attack_list(script_args)
    budget_given = script_args.attack_budget is not None or script_args.attack_budget_scope != "per_layer"
    if suite is None or script_args.skip_eval:
        if asked or budget_given:
            why = "--skip_eval is set" if script_args.skip_eval else "there are no evaluation sets (--eval_sets)"
            raise UsageError(f"--attacks / --attack_budget: the attacks are part of the before/after evaluation, and "
                             f"{why}; drop them or evaluate")
        return ()
    if asked is None:
        chosen = []
        for name in DEFAULT_TRAIN_ATTACKS:
            missing = _attack_needs(name, suite.sets, has_selection)
            if missing:
                logger.info("evaluation: the %s attack does not run: it needs %s", name, " and ".join(missing))
            else:
                chosen.append(name)
    else:
        for name in asked:
            missing = _attack_needs(name, suite.sets, has_selection)
            if missing:
                raise UsageError(f"--attacks {name} needs {' and '.join(missing)}")
        chosen = list(asked)
    if budget_given and not any(name in PROFILED_ATTACKS for name in chosen):
        raise UsageError(f"--attack_budget / --attack_budget_scope: no attack that uses a budget runs (attacks: "
                         f"{', '.join(chosen) or 'none'}); add refusal_suppression or unsafe_steering to --attacks "
                         "(refusal_suppression needs 'anchors' in the evaluation sets), or drop the option")
    return tuple(chosen)


def _check_detection_backend(args) -> None:
    """``--detection_backend vllm``: vLLM installed, one process (before the model loads)."""
    from ..detection.backends import check_backend

    try:
        check_backend(args.detection_backend, args.world_size, args.detection_vllm_kwargs)
    except (ValueError, ImportError) as err:
        raise UsageError(f"--detection_backend {args.detection_backend}: {err}") from err


def _retain(script_args: TrainScriptArguments, args):
    """The retain rows of ``--retain_dataset``, checked (errors name the file, row and column), or None."""
    name = script_args.retain_dataset
    if name is None or str(name).strip().lower() in FALSE_WORDS:
        return None
    if name == SAFETY_WORLD:
        from ..safety_world import make_world

        rows = make_world(seed=script_args.world_seed).retain_pairs()
    else:
        from .common import _read_dataset

        rows = _read_dataset(name, "train", None, "--retain_dataset")
    from ..training.retain import retain_rows

    try:
        retain_rows(rows)
    except ValueError as err:
        raise UsageError(f"--retain_dataset {name}: {err}") from err
    return rows


def _selection(script_args: TrainScriptArguments, args, resume: str | None):
    if script_args.safety_critical_experts:
        return load_selection(script_args.safety_critical_experts)
    if resume and os.path.isfile(os.path.join(resume, SELECTION_FILE)):
        logger.info("resuming with the selection saved in %s", resume)
        return load_selection(os.path.join(resume, SELECTION_FILE), flag="the checkpoint's selection")
    return None


def _pairs(script_args: TrainScriptArguments, args):
    if script_args.dataset_name in (None, SAFETY_WORLD):
        from ..safety_world import make_world

        return make_world(seed=script_args.world_seed).train_pairs()
    return load_pairs(script_args.dataset_name, anchor_column=args.anchor_column,
                      split=script_args.dataset_train_split, config=script_args.dataset_config)


def _suite(script_args: TrainScriptArguments, world_data: bool, options: dict[str, Any]) -> EvalSuite | None:
    name = script_args.eval_sets or (SAFETY_WORLD if world_data else None)
    if name is None:
        return None
    sets = load_eval_sets(name, world_seed=script_args.world_seed)
    return eval_suite(name, sets, script_args.judge or (SAFETY_WORLD if world_data else None),
                      script_args.judge_refusal_labels, options)


# ------------------------------------------------------------------------------------------------ steps


def evaluate(model, tokenizer, suite: EvalSuite, script_args: TrainScriptArguments, base_model=None,
             chat_template_kwargs=None, attacks: tuple[str, ...] = (), selection=None):
    """Evaluate ``model`` on the suite: plain jailbreaks, the base model's routing (with ``base_model``) and the MoE
    ``attacks`` (the routing attack steers toward ``selection``, the Safety-Critical Experts of the base model)."""
    from ..evaluation.attacks import PROFILED_ATTACKS
    from ..evaluation.evaluate import evaluate_safety

    profiled = any(name in PROFILED_ATTACKS for name in attacks)
    # the base model's routing is generated on the jailbreaks: a suite without them gets the routing shift alone
    base = ["base"] if base_model is not None and suite.sets.get("attacks") else []
    return evaluate_safety(
        model, tokenizer, suite.sets, suite.judge, refusal_judge=suite.refusal_judge, base_model=base_model,
        utility_check=suite.utility_check, batch_size=script_args.eval_batch_size,
        max_new_tokens=script_args.eval_max_new_tokens, chat_template_kwargs=chat_template_kwargs,
        attacks=base + list(attacks),
        attack_experts=selection if "routing" in attacks else None,
        attack_budget=_budget(script_args) if profiled else None, attack_budget_scope=script_args.attack_budget_scope,
    )


def _budget(script_args: TrainScriptArguments) -> int:
    return DEFAULT_ATTACK_BUDGET if script_args.attack_budget is None else script_args.attack_budget


def check_attacks_on_model(model, inputs: Inputs, script_args: TrainScriptArguments) -> tuple[str, ...]:
    """The attacks checked against the loaded model before anything is generated (detection included): routers the
    attacks can steer, the budget within each attack's per-layer limits, a given selection that fits the model. An
    attack asked for by ``--attacks`` that the model cannot take is an error; one of the default attacks is left out
    with a warning (e.g. sigmoid routers, which the steering does not support)."""
    from ..evaluation.attacks import PROFILED_ATTACKS, as_budget, check_attacks
    from ..evaluation.steering import _check_rule, steering_mask
    from ..moe.discovery import moe_layers

    kept = []
    for name in inputs.attacks:
        try:
            if name == "routing":
                for layer in moe_layers(model):
                    _check_rule(layer)
                if inputs.selection is not None:
                    steering_mask(model, inputs.selection)
            else:
                check_attacks(model, [name], inputs.suite.sets, base_model=False, attack_experts=False,
                              budget=as_budget(_budget(script_args), script_args.attack_budget_scope))
        except NotImplementedError as err:
            if script_args.attacks is not None:
                raise UsageError(f"--attacks {name}: {err}") from err
            logger.warning("evaluation: the %s attack does not run on this model: %s", name, err)
            continue
        except ValueError as err:
            flag = "--attack_budget" if name in PROFILED_ATTACKS else "--safety_critical_experts"
            raise UsageError(f"--attacks {name}: {err} ({flag})") from err
        kept.append(name)
    return tuple(kept)


def detect(model, tokenizer, pairs, judge, args):
    """Detection on every process (each its share of the pairs, with its own resumable progress in --output_dir;
    process 0 writes the artifacts)."""
    from ..detection.detect import detect_safety_critical_experts

    return detect_safety_critical_experts(
        model, tokenizer, pairs, judge=judge, anchor_column=args.anchor_column,
        batch_size=args.detection_batch_size, max_new_tokens=args.detection_max_new_tokens,
        do_sample=args.detection_do_sample, temperature=args.detection_temperature, seed=args.seed,
        policy=args.sce_policy, num_experts=args.sce_num_experts, threshold=args.sce_threshold,
        top_p_experts=args.sce_top_p, output_dir=args.output_dir,
        chat_template_kwargs=args.chat_template_kwargs, backend=args.detection_backend,
        vllm_kwargs=args.detection_vllm_kwargs,
    )


def release_training_memory(trainer) -> None:
    """Drop the optimiser and, in a single process, move the trained model off the accelerator: the saved checkpoint
    is evaluated in its place."""
    import torch

    trainer.optimizer, trainer.lr_scheduler = None, None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.args.world_size == 1 and next(model.parameters()).device.type != "cpu":
        model.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_saved(model_dir: str, device, suite: EvalSuite, script_args: TrainScriptArguments, base_model,
                   trust_remote_code: bool = False, chat_template_kwargs=None, attacks: tuple[str, ...] = (),
                   selection=None):
    """Reload the published checkpoint from disk in the dtype it was saved in and evaluate that model (the routing
    attack steers it toward ``selection``, the base model's Safety-Critical Experts)."""
    logger.info("evaluating the saved checkpoint %s", model_dir)
    model, tokenizer = load_model(ModelLoadArguments(model_name_or_path=model_dir, dtype="auto"), device=device,
                                  trust_remote_code=trust_remote_code)
    report = evaluate(model, tokenizer, suite, script_args, base_model, chat_template_kwargs, attacks, selection)
    return report, {"path": os.path.abspath(model_dir), "dtype": dtype_name(model)}


def card_results(report, artifact: dict[str, str]) -> dict[str, Any]:
    """The model card's evaluation: the report (every rate with its n and 95% interval, the judges, the files) as
    JSON-ready data, since the trainer keeps it as ``evaluation_results``, and the evaluated artefact."""
    return {"report": report.to_dict(),
            "evaluated_artifact": f"this checkpoint as published, reloaded from disk in {artifact['dtype']}"}


def write_results(results: dict, trainer, output_dir: str) -> None:
    from ..evaluation.reporting import plot_asr, plot_phase_losses
    from ..utils import atomic_write_json

    results["log_history"] = trainer.state.log_history
    atomic_write_json(results, os.path.join(output_dir, "results.json"))
    plot_phase_losses(trainer.state.log_history, os.path.join(output_dir, "phase_losses.png"))
    if results["after"] is not None and results["before"] is not None:
        before, after = results["before"], results["after"]
        plot_asr(before["asr_by_attack"], after["asr_by_attack"], os.path.join(output_dir, "asr_per_family.png"),
                 held_out=after["held_out_attacks"], n_before=before["n_by_attack"], n_after=after["n_by_attack"])


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run ``rasa-trainer train``; returns the results written to results.json on the main process."""
    from accelerate import PartialState

    script_args, args, model_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    inputs = preflight(script_args, args, model_args)
    state = PartialState()
    with run_lock(args.output_dir, state.is_main_process):
        return run(script_args, args, model_args, inputs, state)


def run(script_args: TrainScriptArguments, args, model_args: ModelLoadArguments, inputs: Inputs, state):
    """Everything after the checks, with the output folder held (see :func:`main`)."""
    model, tokenizer = load_model(_with_default_model(model_args), device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    check_resumed_model(inputs.resume, model, tokenizer, args)
    evaluating = inputs.suite is not None and not script_args.skip_eval
    if evaluating:
        inputs.attacks = check_attacks_on_model(model, inputs, script_args)
    base_model = copy.deepcopy(model) if evaluating and script_args.routing_diagnostics else None
    # the experts first: the base model's evaluation attacks it with them (the routing attack)
    selection = select_experts(model, tokenizer, inputs, script_args, args)
    if "routing" in inputs.attacks and selection is not None and not len(selection):
        _drop_routing_attack(inputs, script_args)
    before = None
    if evaluating and state.is_main_process:
        logger.info("evaluating the base model on %s", args.device)
        before = evaluate(model, tokenizer, inputs.suite, script_args, chat_template_kwargs=args.chat_template_kwargs,
                          attacks=inputs.attacks, selection=selection)
    state.wait_for_everyone()

    trainer = train(model, tokenizer, inputs, selection, args)
    model_dir = os.path.join(args.output_dir, "model")
    trainer.save_model(model_dir)
    results = None
    if state.is_main_process:
        results = publish(trainer, model_dir, before, base_model if evaluating else None, inputs, script_args, args)
    state.wait_for_everyone()
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name or SAFETY_WORLD)
    return results


def select_experts(model, tokenizer, inputs: Inputs, script_args: TrainScriptArguments, args):
    """The Safety-Critical Experts of the base model: the selection given (or resumed), else detected when the
    schedule trains experts; None for the schedules that train none."""
    if inputs.selection is not None or args.rasa_schedule not in ("alternate", "expert_only"):
        return inputs.selection
    judge = build_judge(inputs.detection_judge, script_args.judge_refusal_labels, inputs.judge_options)
    return detect(model, tokenizer, inputs.pairs, judge, args)


def _drop_routing_attack(inputs: Inputs, script_args: TrainScriptArguments) -> None:
    """Detection selected no expert: the routing attack has nothing to steer toward (an error when asked for)."""
    if script_args.attacks is not None:
        raise UsageError("--attacks routing: the selection holds no Safety-Critical Expert to steer toward")
    logger.warning("evaluation: the routing attack does not run: the selection holds no expert")
    inputs.attacks = tuple(name for name in inputs.attacks if name != "routing")


def train(model, tokenizer, inputs: Inputs, selection, args):
    """Train on the pairs with ``selection`` (see :func:`select_experts`); returns the trainer."""
    from ..training.trainer import RASATrainer

    trainer = RASATrainer(model, args=args, train_dataset=inputs.pairs, processing_class=tokenizer,
                          safety_critical_experts=selection, retain_dataset=inputs.retain)
    trainer.train(resume_from_checkpoint=inputs.resume)
    return trainer


def publish(trainer, model_dir: str, before, base_model, inputs: Inputs, script_args: TrainScriptArguments,
            args) -> dict[str, Any]:
    """On the main process: evaluate the saved checkpoint (when evaluating), re-render its model card with those
    numbers, write results.json and the plots."""
    from ..evaluation.evaluate import format_comparison

    selection = trainer.selection
    results = {"before": before.to_dict() if before else None, "after": None, "evaluated_artifact": None,
               "selection": selection.by_moe_layer() if selection is not None else None,
               "attacks": list(inputs.attacks) if before is not None else None}
    if before is not None:
        release_training_memory(trainer)
        after, artifact = evaluate_saved(model_dir, args.device, inputs.suite, script_args, base_model,
                                         args.trust_remote_code, args.chat_template_kwargs, inputs.attacks, selection)
        results.update(after=after.to_dict(), evaluated_artifact=artifact)
        trainer.evaluation_results = card_results(after, artifact)
        trainer.create_model_card(model_name=os.path.basename(os.path.abspath(model_dir)), output_dir=model_dir,
                                  dataset_name=script_args.dataset_name or SAFETY_WORLD,
                                  evaluation_results=trainer.evaluation_results)
        print(format_comparison({"base": before, "RASA (saved)": after}))
    write_results(results, trainer, args.output_dir)
    logger.info("results in %s", args.output_dir)
    return results


def _with_default_model(model_args: ModelLoadArguments) -> ModelLoadArguments:
    if model_args.model_name_or_path:
        return model_args
    return ModelLoadArguments(**{**vars(model_args), "model_name_or_path": SAFETY_WORLD})

