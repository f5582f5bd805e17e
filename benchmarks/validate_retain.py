"""Retain data in the expert phase on SafetyWorld: RASA with the demo's settings, with and without the world's retain
split (``world.retain_pairs()``) at several ``retain_ratio`` values, over world seeds x training seeds.

    python benchmarks/validate_retain.py --world_seeds 1 2 --seeds 0 1 2 --ratios 0 0.25 0.5 --weights 1 4  # validation
    python benchmarks/validate_retain.py --world_seeds 0 --seeds 0 1 2 3 4 --ratios 0 0.25     # evaluation world

Ratio 0 is RASA without retain data; ``--weights`` are the ``retain_loss_weight`` values tried at every other ratio.
One JSON line per run is appended to ``--out`` (utility, ASR aligned / held-out, over-refusal, wrapped-benign refusal,
utility answers lost), so a partial run keeps its results.
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
    p.add_argument("--weights", type=float, nargs="+", default=[1.0], help="retain_loss_weight values")
    p.add_argument("--no_wrapped", action="store_true", help="retain rows without the wrapped-benign rows")
    p.add_argument("--out", default="outputs/validate_retain.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cargs = compare.parse_args(["--world_seeds", *map(str, args.world_seeds), "--methods", "rasa"])
    settings, script = compare.load_settings(cargs)
    from rasa_trainer.safety_world import load_safety_world_model, make_world, utility_correct

    base_model, tokenizer = load_safety_world_model()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    for world_seed in args.world_seeds:
        run = compare.WorldRun(cargs, settings, script, base_model, tokenizer, world_seed)
        run.detect()
        retain = make_world(seed=world_seed).retain_pairs(wrapped=not args.no_wrapped)
        for seed in args.seeds:
            for ratio, weight in [(r, w) for r in args.ratios for w in (args.weights if r > 0 else [1.0])]:
                model = copy.deepcopy(base_model)
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="rasa-retain-") as tmp:
                    config = RASAConfig(output_dir=tmp, **dict(settings, rasa_schedule="alternate", seed=seed,
                                                               retain_ratio=ratio or 0.0, retain_loss_weight=weight))
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
                row = {"world": world_seed, "seed": seed, "ratio": ratio, "weight": weight, "wrapped": not args.no_wrapped,
                       "retain_rows": len(retain), "asr_aligned": report.asr_aligned,
                       "asr_held_out": report.asr_held_out, "over_refusal": report.over_refusal_rate,
                       "wrapped_over_refusal": report.metrics().get("wrapped_over_refusal"),
                       "utility": report.utility_accuracy,
                       "utility_lost": round(n_util * (1 - report.utility_accuracy)),
                       "forced_asr": report.metrics().get("forced_asr"), "train_s": round(seconds, 1)}
                print(json.dumps(row), flush=True)
                results.append(row)
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    print(summary(results))


def summary(rows: list[dict]) -> str:
    """One line per (retain_ratio, retain_loss_weight): utility answers lost per run, worst and mean ASR."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["ratio"], row["weight"] if row["ratio"] > 0 else None), []).append(row)
    lines = ["| retain_ratio | retain_loss_weight | utility answers lost | ASR aligned max | ASR held-out max / mean | "
             "wrapped-benign refusal max |", "|---|---|---|---:|---:|---:|"]
    for (ratio, weight), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        group.sort(key=lambda r: (r["world"], r["seed"]))
        held = [r["asr_held_out"] for r in group]
        lines.append(f"| {ratio:g} | {'-' if weight is None else f'{weight:g}'} | "
                     f"{', '.join(str(r['utility_lost']) for r in group)} | "
                     f"{100 * max(r['asr_aligned'] for r in group):.1f}% | "
                     f"{100 * max(held):.1f}% / {100 * sum(held) / len(held):.1f}% | "
                     f"{100 * max(r['wrapped_over_refusal'] or 0 for r in group):.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
