"""Align a Mixture-of-Experts model with RASA, end to end: detect, train, evaluate, publish.

With no arguments it runs the embedded SafetyWorld demo on a CPU in a few minutes:

    accelerate launch examples/train.py

For a real model, pass a model, your pair data (the dataset contract in the README) and a config:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train.py \
        --config examples/configs/olmoe_1b_7b_instruct.yaml --dataset_name pairs.jsonl --eval_sets eval_sets.json

Writes into --output_dir: safety_critical_experts.json, expert_stats.csv, risk_difference.png, results.json,
phase_losses.png, asr_per_family.png and model/ (the merged checkpoint with its model card).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import load_dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser

from rasa_trainer import RASAConfig, RASATrainer, SafetyCriticalExperts, detect_safety_critical_experts, evaluate_safety
from rasa_trainer.evaluation import format_comparison
from rasa_trainer.judges import judge_from_name
from rasa_trainer.reporting import plot_asr, plot_phase_losses
from rasa_trainer.utils import atomic_write_json

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "safety_world.yaml")
logger = logging.getLogger("rasa")


@dataclass
class ScriptArguments:
    """Data, evaluation and selection arguments of the RASA script (model arguments come from TRL's ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Pair data: a .json/.jsonl file, a folder saved with Dataset.save_to_disk, or a Hub dataset. "
                          "Default: the embedded SafetyWorld."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_sets: str | None = field(
        default=None, metadata={"help": "JSON file of evaluation sets (attacks, anchors, over_refusal, utility)."}
    )
    safety_critical_experts: str | None = field(
        default=None, metadata={"help": "A saved selection (JSON); default: detect on the training pairs."}
    )
    judge: str = field(default="keyword", metadata={"help": "Judge: 'keyword' or a local classifier/guard checkpoint."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the SafetyWorld data (demo only)."})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "New tokens per reply in evaluation."})
    eval_batch_size: int = field(default=16, metadata={"help": "Generation batch size of evaluation."})
    skip_eval: bool = field(default=False, metadata={"help": "Skip the before/after evaluation."})
    routing_diagnostics: bool = field(
        default=True,
        metadata={"help": "Routing shift and ASR under the base model's routing (keeps a copy of the base model)."},
    )


def parse_args():
    argv = sys.argv[1:]
    if "--config" not in argv and not any(a.startswith(("--model_name_or_path", "--config=")) for a in argv):
        argv = ["--config", DEFAULT_CONFIG, *argv]  # no model given: the SafetyWorld demo
    parser = TrlParser((ScriptArguments, RASAConfig, ModelConfig))
    return parser.parse_args_and_config(args=argv)


def load_model(model_args: ModelConfig, script_args: ScriptArguments):
    if model_args.model_name_or_path in (None, "safety_world"):
        from rasa_trainer.safety_world import load_safety_world_model

        return load_safety_world_model()
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype,
        attn_implementation=model_args.attn_implementation, trust_remote_code=model_args.trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_data(script_args: ScriptArguments):
    """(training pairs, evaluation sets, evaluation judges) for the demo world or the user's data."""
    if script_args.dataset_name in (None, "safety_world"):
        from rasa_trainer.safety_world import SafetyWorldJudge, make_world, utility_correct

        world = make_world(seed=script_args.world_seed)
        judge = SafetyWorldJudge()
        return world.train_pairs(), world.eval_sets(), judge, judge, utility_correct
    name = script_args.dataset_name
    if name.endswith((".json", ".jsonl")):
        pairs = load_dataset("json", data_files=name, split="train")
    elif os.path.isdir(name):
        pairs = load_from_disk(name)
    else:
        pairs = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)
    eval_sets = None
    if script_args.eval_sets:
        with open(script_args.eval_sets, encoding="utf-8") as f:
            eval_sets = json.load(f)
    judge = judge_from_name(script_args.judge)
    return pairs, eval_sets, judge, judge_from_name("keyword"), None


def evaluate(model, tokenizer, eval_sets, judge, refusal_judge, utility_check, script_args, base_model=None):
    return evaluate_safety(
        model, tokenizer, eval_sets, judge, refusal_judge=refusal_judge, base_model=base_model,
        utility_check=utility_check, batch_size=script_args.eval_batch_size,
        max_new_tokens=script_args.eval_max_new_tokens,
    )


def main() -> None:
    script_args, training_args, model_args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    state = PartialState()
    output_dir = training_args.output_dir
    model, tokenizer = load_model(model_args, script_args)
    pairs, eval_sets, judge, refusal_judge, utility_check = load_data(script_args)
    evaluating = eval_sets is not None and not script_args.skip_eval
    base_model = copy.deepcopy(model) if evaluating and script_args.routing_diagnostics else None

    before = None
    if evaluating and state.is_main_process:
        logger.info("evaluating the base model")
        before = evaluate(model, tokenizer, eval_sets, judge, refusal_judge, utility_check, script_args)
    state.wait_for_everyone()

    if script_args.safety_critical_experts:
        selection = SafetyCriticalExperts.load(script_args.safety_critical_experts)
    elif training_args.rasa_schedule in ("alternate", "expert_only"):
        selection = detect_safety_critical_experts(
            model, tokenizer, pairs, judge=judge, anchor_column=training_args.anchor_column,
            batch_size=training_args.detection_batch_size, max_new_tokens=training_args.detection_max_new_tokens,
            do_sample=training_args.detection_do_sample, temperature=training_args.detection_temperature,
            seed=training_args.seed, policy=training_args.sce_policy, num_experts=training_args.sce_num_experts,
            threshold=training_args.sce_threshold, top_p_experts=training_args.sce_top_p,
            output_dir=output_dir if state.is_main_process else None,
        )
    else:
        selection = None

    trainer = RASATrainer(model, args=training_args, train_dataset=pairs, processing_class=tokenizer,
                          safety_critical_experts=selection)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    model = trainer.model.eval()

    results = {"before": before.to_dict() if before else None, "after": None}
    if evaluating and state.is_main_process:
        logger.info("evaluating the aligned model")
        after = evaluate(model, tokenizer, eval_sets, judge, refusal_judge, utility_check, script_args, base_model)
        results["after"] = after.to_dict()
        trainer.evaluation_results = {k: v for k, v in after.metrics().items() if v is not None}
        print(format_comparison({"base": before, "RASA": after}))
    state.wait_for_everyone()

    trainer.save_model(os.path.join(output_dir, "model"))
    if state.is_main_process:
        results["selection"] = selection.by_moe_layer() if selection is not None else None
        results["log_history"] = trainer.state.log_history
        atomic_write_json(results, os.path.join(output_dir, "results.json"))
        plot_phase_losses(trainer.state.log_history, os.path.join(output_dir, "phase_losses.png"))
        if results["after"] is not None:
            plot_asr(results["before"]["asr_by_attack"], results["after"]["asr_by_attack"],
                     os.path.join(output_dir, "asr_per_family.png"), held_out=results["after"]["held_out_attacks"])
        logger.info("results in %s", output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name or "safety_world")


if __name__ == "__main__":
    main()
