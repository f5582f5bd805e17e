"""Retain data in the expert phase on SafetyWorld: RASA with the demo's settings, with and without the world's retain
split (``world.retain_pairs()``) at several ``retain_ratio`` values, over world seeds x training seeds.

    python benchmarks/validate_retain.py --world_seeds 1 2 --seeds 0 1 2 --ratios 0 0.25 0.5   # validation worlds
    python benchmarks/validate_retain.py --world_seeds 0 --seeds 0 1 2 3 4 --ratios 0 0.25     # evaluation world

Ratio 0 is RASA without retain data. One JSON line per run is appended to ``--out`` (utility, ASR aligned / held-out,
over-refusal, wrapped-benign refusal, utility answers lost), so a partial run keeps its results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import compare  # noqa: E402

from rasa_trainer import RASAConfig, RASATrainer, evaluate_safety  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world_seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("--no_wrapped", action="store_true", help="retain rows without the wrapped-benign rows")
    p.add_argument("--out", default="outputs/validate_retain.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cargs = compare.parse_args(["--world_seeds", *map(str, args.world_seeds), "--methods", "rasa"])
    settings, script = compare.load_settings(cargs)
    from rasa_trainer.safety_world import load_safety_world_model, make_world, utility_correct

    base_model, tokenizer = load_safety_world_model()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for world_seed in args.world_seeds:
        run = compare.WorldRun(cargs, settings, script, base_model, tokenizer, world_seed)
        run.detect()
        retain = make_world(seed=world_seed).retain_pairs(wrapped=not args.no_wrapped)
        for seed in args.seeds:
            for ratio in args.ratios:
                model = copy.deepcopy(base_model)
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="rasa-retain-") as tmp:
                    config = RASAConfig(output_dir=tmp, **dict(settings, rasa_schedule="alternate", seed=seed,
                                                               retain_ratio=ratio or 0.0))
                    trainer = RASATrainer(model, args=config, train_dataset=run.pairs, processing_class=tokenizer,
                                          safety_critical_experts=run.detected,
                                          retain_dataset=retain if ratio > 0 else None)
                    trainer.train()
                seconds = time.perf_counter() - t0
                report = evaluate_safety(trainer.model.eval(), tokenizer, run.eval_sets, run.judge,
                                         refusal_judge=run.judge, base_model=base_model, utility_check=utility_correct,
                                         batch_size=script["eval_batch_size"],
                                         max_new_tokens=script["eval_max_new_tokens"], progress=False)
                n_util = len(run.eval_sets["utility"])
                row = {"world": world_seed, "seed": seed, "ratio": ratio, "wrapped": not args.no_wrapped,
                       "retain_rows": len(retain), "asr_aligned": report.asr_aligned,
                       "asr_held_out": report.asr_held_out, "over_refusal": report.over_refusal_rate,
                       "wrapped_over_refusal": report.metrics().get("wrapped_over_refusal"),
                       "utility": report.utility_accuracy,
                       "utility_lost": round(n_util * (1 - report.utility_accuracy)),
                       "forced_asr": report.metrics().get("forced_asr"), "train_s": round(seconds, 1)}
                print(json.dumps(row), flush=True)
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
