"""Align a Mixture-of-Experts model with RASA, end to end: detect, train, save, evaluate the saved checkpoint.

A thin wrapper of ``rasa-trainer train`` (``rasa_trainer/cli/train.py``). With no arguments it runs the embedded
SafetyWorld demo on a CPU in under a minute:

    accelerate launch examples/train.py

For a real model, pass a model, your pair data (the dataset contract in the README) and a config:

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train.py \\
        --config examples/configs/olmoe_1b_7b_instruct.yaml --dataset_name pairs.jsonl --eval_sets eval_sets.json

Writes into --output_dir: safety_critical_experts.json, expert_stats.csv, risk_difference.png, results.json,
phase_losses.png, asr_per_family.png and model/ (the merged checkpoint with its model card).
"""

import sys

from rasa_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
