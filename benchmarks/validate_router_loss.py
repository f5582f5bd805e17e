"""The choice of the default `router_loss`, on the validation worlds only (README, "Router phase").

Runs RASA with the demo's settings (rasa_trainer/configs/safety_world.yaml) and each router loss on
`make_world(seed=1)` and `seed=2` with training seeds 0-2 (the worlds and seeds the demo was tuned on; never the
evaluation world), evaluates each run like the demo (strict judge, routing diagnostics against the base model) and
prints one JSON line per run and the mean (min-max) per router loss.

    python benchmarks/validate_router_loss.py [--losses pooled,per_pair] [--seeds 0,1,2] [--worlds 1,2]
"""

import argparse
import copy
import json
import logging
import os
import tempfile
import time

import yaml

import rasa_trainer
from rasa_trainer import RASAConfig, RASATrainer, detect_safety_critical_experts, evaluate_safety
from rasa_trainer.safety_world import SafetyWorldJudge, load_safety_world_model, make_world, utility_correct

METRICS = ("asr_aligned", "asr_held_out", "over_refusal_rate", "utility_accuracy", "routing_shift", "forced_asr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default="pooled,per_pair")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--worlds", default="1,2")
    args = parser.parse_args()
    if 0 in [int(w) for w in args.worlds.split(",")]:
        parser.error("world 0 is the evaluation world: choices are made on validation worlds only")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    logging.getLogger("rasa_trainer").setLevel(logging.ERROR)
    config = os.path.join(os.path.dirname(rasa_trainer.__file__), "configs", "safety_world.yaml")
    with open(config) as f:
        raw = yaml.safe_load(f)
    settings = {k: v for k, v in raw.items() if k in RASAConfig.__dataclass_fields__ and k != "output_dir"}
    settings.update(report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10_000, bf16=False)
    base, tokenizer = load_safety_world_model()
    base.eval()
    judge = SafetyWorldJudge()
    rows = []
    for world_seed in [int(w) for w in args.worlds.split(",")]:
        world = make_world(seed=world_seed)
        pairs, eval_sets = world.train_pairs(), world.eval_sets()
        selection = detect_safety_critical_experts(base, tokenizer, pairs, judge=judge, batch_size=32,
                                                   max_new_tokens=16, progress=False)
        for loss in args.losses.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    trainer = RASATrainer(copy.deepcopy(base), args=RASAConfig(
                        output_dir=tmp, **{**settings, "seed": seed, "router_loss": loss}), train_dataset=pairs,
                        processing_class=tokenizer, safety_critical_experts=selection)
                    trainer.train()
                seconds = time.perf_counter() - start
                report = evaluate_safety(trainer.model.eval(), tokenizer, eval_sets, judge, refusal_judge=judge,
                                         base_model=base, utility_check=utility_correct, batch_size=64,
                                         max_new_tokens=16, progress=False)
                row = {"world": world_seed, "router_loss": loss, "seed": seed, "train_s": round(seconds, 1),
                       **{m: getattr(report, m) for m in METRICS}}
                print(json.dumps(row), flush=True)
                rows.append(row)
    for loss in args.losses.split(","):
        runs = [r for r in rows if r["router_loss"] == loss]
        summary = ", ".join(
            f"{m} {100 * sum(r[m] for r in runs) / len(runs):.1f} ({100 * min(r[m] for r in runs):.1f}-"
            f"{100 * max(r[m] for r in runs):.1f})" for m in METRICS)
        print(f"{loss} ({len(runs)} runs): {summary}")


if __name__ == "__main__":
    main()
