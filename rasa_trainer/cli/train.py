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
)

logger = logging.getLogger("rasa")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0", "none", "")


@dataclass
class TrainScriptArguments:
    """Data, evaluation and selection arguments of ``rasa-trainer train`` (training arguments: ``RASAConfig``; model
    arguments: ``ModelLoadArguments``; ``trust_remote_code`` is a ``RASAConfig`` field)."""

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


@dataclass
class Inputs:
    """Everything read and checked before the model is loaded."""

    pairs: Any
    suite: EvalSuite | None
    detection_judge: str
    selection: Any
    resume: str | None
    retain: Any = None


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
    check_threshold("--sce_threshold", args.sce_threshold)
    check_at_least("--eval_batch_size", script_args.eval_batch_size, 1)
    check_at_least("--eval_max_new_tokens", script_args.eval_max_new_tokens, 1)


def preflight(script_args: TrainScriptArguments, args, model_args: ModelLoadArguments) -> Inputs:
    """Check every argument and read every input file, so that mistakes fail before any model is loaded."""
    check_values(script_args, args)
    torch_dtype(model_args.dtype)
    check_model(model_args.model_name_or_path or SAFETY_WORLD)
    check_judges([("--judge", script_args.judge), ("--detection_judge", args.detection_judge)],
                 script_args.judge_refusal_labels)
    check_output_dir(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    check_run_folder(args, resume)
    selection = _selection(script_args, args, resume)
    if selection is None and args.rasa_schedule in ("alternate", "expert_only"):
        _check_detection_backend(args)
    pairs = _pairs(script_args, args)
    check_resumed_run(resume, args, pairs, selection)
    world_data = script_args.dataset_name in (None, SAFETY_WORLD)
    return Inputs(pairs, _suite(script_args, world_data), args.detection_judge, selection, resume,
                  _retain(script_args, args))


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


def _suite(script_args: TrainScriptArguments, world_data: bool) -> EvalSuite | None:
    name = script_args.eval_sets or (SAFETY_WORLD if world_data else None)
    if name is None:
        return None
    sets = load_eval_sets(name, world_seed=script_args.world_seed)
    return eval_suite(name, sets, script_args.judge or (SAFETY_WORLD if world_data else None),
                      script_args.judge_refusal_labels)


# ------------------------------------------------------------------------------------------------ steps


def evaluate(model, tokenizer, suite: EvalSuite, script_args: TrainScriptArguments, base_model=None,
             chat_template_kwargs=None):
    from ..evaluation.evaluate import evaluate_safety

    return evaluate_safety(
        model, tokenizer, suite.sets, suite.judge, refusal_judge=suite.refusal_judge, base_model=base_model,
        utility_check=suite.utility_check, batch_size=script_args.eval_batch_size,
        max_new_tokens=script_args.eval_max_new_tokens, chat_template_kwargs=chat_template_kwargs,
    )


def detect(model, tokenizer, pairs, judge, args, is_main: bool):
    from ..detection.detect import detect_safety_critical_experts

    return detect_safety_critical_experts(
        model, tokenizer, pairs, judge=judge, anchor_column=args.anchor_column,
        batch_size=args.detection_batch_size, max_new_tokens=args.detection_max_new_tokens,
        do_sample=args.detection_do_sample, temperature=args.detection_temperature, seed=args.seed,
        policy=args.sce_policy, num_experts=args.sce_num_experts, threshold=args.sce_threshold,
        top_p_experts=args.sce_top_p, output_dir=args.output_dir if is_main else None,
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
                   trust_remote_code: bool = False, chat_template_kwargs=None):
    """Reload the published checkpoint from disk in the dtype it was saved in and evaluate that model."""
    logger.info("evaluating the saved checkpoint %s", model_dir)
    model, tokenizer = load_model(ModelLoadArguments(model_name_or_path=model_dir, dtype="auto"), device=device,
                                  trust_remote_code=trust_remote_code)
    report = evaluate(model, tokenizer, suite, script_args, base_model, chat_template_kwargs)
    return report, {"path": os.path.abspath(model_dir), "dtype": dtype_name(model)}


def card_results(report, artifact: dict[str, str]) -> dict[str, Any]:
    metrics = {k: v for k, v in report.metrics().items() if v is not None}
    metrics["evaluated_artifact"] = f"this checkpoint as published, reloaded from disk in {artifact['dtype']}"
    return metrics


def write_results(results: dict, trainer, output_dir: str) -> None:
    from ..evaluation.reporting import plot_asr, plot_phase_losses
    from ..utils import atomic_write_json

    results["log_history"] = trainer.state.log_history
    atomic_write_json(results, os.path.join(output_dir, "results.json"))
    plot_phase_losses(trainer.state.log_history, os.path.join(output_dir, "phase_losses.png"))
    if results["after"] is not None and results["before"] is not None:
        plot_asr(results["before"]["asr_by_attack"], results["after"]["asr_by_attack"],
                 os.path.join(output_dir, "asr_per_family.png"), held_out=results["after"]["held_out_attacks"])


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
    base_model = copy.deepcopy(model) if evaluating and script_args.routing_diagnostics else None
    before = None
    if evaluating and state.is_main_process:
        logger.info("evaluating the base model on %s", args.device)
        before = evaluate(model, tokenizer, inputs.suite, script_args, chat_template_kwargs=args.chat_template_kwargs)
    state.wait_for_everyone()

    trainer = train(model, tokenizer, inputs, script_args, args, state.is_main_process)
    model_dir = os.path.join(args.output_dir, "model")
    trainer.save_model(model_dir)
    results = None
    if state.is_main_process:
        results = publish(trainer, model_dir, before, base_model if evaluating else None, inputs, script_args, args)
    state.wait_for_everyone()
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name or SAFETY_WORLD)
    return results


def train(model, tokenizer, inputs: Inputs, script_args: TrainScriptArguments, args, is_main: bool):
    """Detect the Safety-Critical Experts unless a selection was given (or resumed), then train; returns the
    trainer."""
    from ..training.trainer import RASATrainer

    selection = inputs.selection
    if selection is None and args.rasa_schedule in ("alternate", "expert_only"):
        judge = build_judge(inputs.detection_judge, script_args.judge_refusal_labels)
        selection = detect(model, tokenizer, inputs.pairs, judge, args, is_main)
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
               "selection": selection.by_moe_layer() if selection is not None else None}
    if before is not None:
        release_training_memory(trainer)
        after, artifact = evaluate_saved(model_dir, args.device, inputs.suite, script_args, base_model,
                                         args.trust_remote_code, args.chat_template_kwargs)
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

