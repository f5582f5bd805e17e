"""Detect the Safety-Critical Experts of a Mixture-of-Experts model (RASA step 1).

A thin wrapper of ``rasa-trainer detect`` (``rasa_trainer/cli/detect.py``). Writes ``safety_critical_experts.json``,
``expert_stats.csv`` and ``risk_difference.png`` into ``--output_dir``::

    python examples/detect_experts.py --model_name_or_path ./olmoe-instruct --dataset_name pairs.jsonl \\
        --output_dir out/sce
    python examples/detect_experts.py --config detect.yaml --judge ./guard-model
    torchrun --nproc_per_node 4 examples/detect_experts.py --config detect.yaml
"""

import sys

from rasa_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["detect", *sys.argv[1:]]))
