"""Compare RASA with its baselines and ablations on the same world, the same data and one repair budget.

    python examples/compare.py                      # SafetyWorld, seeds 0-4, every method (~5 min on 1 CPU core)
    python examples/compare.py --quick              # one seed, one round: a smoke run (~40 s)
    python examples/compare.py --seeds 0 1 2 3 4 --methods rasa expert_only random_experts

Methods (columns):

- ``base``: the model before alignment.
- ``full SFT (lr X)``: plain SFT of every parameter (``rasa_schedule=full``), one column per ``--full_learning_rates``.
- ``expert only``: the expert phase alone on the detected Safety-Critical Experts (``expert_only``).
- ``router only``: the router phase alone (``router_only``).
- ``random experts``: RASA (``alternate``, both phases) on K experts drawn at random (the ``random`` selection policy,
  seeded with the run's seed) instead of the detected ones; the same K.
- ``steering``: no training; the detected experts are deactivated at inference by masking their router scores
  (:func:`rasa_trainer.steering.steer_away`, SteerMoE style).
- ``RASA``: both phases alternating on the detected experts (``alternate``).

The budget is the same for every trained method: ``2 * rasa_rounds`` epochs over the same training pairs (RASA and
random experts: ``rasa_rounds`` expert + ``rasa_rounds`` router epochs; the single-phase schedules: ``2 * rasa_rounds``
epochs of their phase), the same batch size, the same K selected experts. Learning rates and the other RASA settings
come from ``--config`` (the demo's ``examples/configs/safety_world.yaml``), full SFT's from ``--full_learning_rates``.

Seeds: every seed ``s`` sets the training seed (data order) and the random-expert draw; detection (greedy decoding)
and the steering baseline are deterministic and run once. The world seed stays fixed (``--world_seed``).
Every method is evaluated with :func:`~rasa_trainer.evaluate_safety` (routing diagnostics against the base model) and
the script prints one table of the means over seeds (one column per method) and one of the spread (min-max), and
writes ``compare_results.json`` (every run's full report, means, std, min, max, timings) and ``comparison.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from typing import Any

import torch
import yaml

from rasa_trainer import RASAConfig, RASATrainer, SafetyCriticalExperts, SafetyReport, detect_safety_critical_experts, evaluate_safety
from rasa_trainer.evaluation import format_comparison
from rasa_trainer.selection import SelectionConfig, select_experts
from rasa_trainer.steering import steer_away
from rasa_trainer.utils import atomic_write, atomic_write_json

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "safety_world.yaml")
METHODS = ("full", "expert_only", "router_only", "random_experts", "steering", "rasa")
logger = logging.getLogger("rasa.compare")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML with the RASA settings (default: the demo's)")
    p.add_argument("--output_dir", default="outputs/compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training / random-expert seeds")
    p.add_argument("--world_seed", type=int, default=None, help="SafetyWorld seed (default: the config's, else 0)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--full_learning_rates", type=float, nargs="+", default=[1e-4, 3e-4],
                   help="learning rates of the full-SFT baseline, one column each")
    p.add_argument("--rasa_rounds", type=int, default=None, help="rounds R; every method trains 2R epochs")
    p.add_argument("--expert_learning_rate", type=float, default=None)
    p.add_argument("--router_learning_rate", type=float, default=None)
    p.add_argument("--per_device_train_batch_size", type=int, default=None)
    p.add_argument("--sce_num_experts", type=float, default=None, help="K: a count or a fraction of all experts")
    p.add_argument("--quick", action="store_true", help="one seed (the first), one round: a smoke run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (SafetyWorld's tensors are tiny: a second thread mostly adds sync overhead)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.rasa_rounds = 1
    return args


def load_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RASAConfig keyword arguments, script settings) from the YAML and the command line."""
    with open(args.config, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    names = {f.name for f in dataclasses.fields(RASAConfig)}
    rasa = {k: v for k, v in raw.items() if k in names and k not in ("output_dir", "num_train_epochs")}
    for key in ("rasa_rounds", "expert_learning_rate", "router_learning_rate", "per_device_train_batch_size",
                "sce_num_experts"):
        if getattr(args, key) is not None:
            rasa[key] = getattr(args, key)
    rasa.update(report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10_000)
    rasa.setdefault("bf16", False)
    script = {
        "world_seed": args.world_seed if args.world_seed is not None else int(raw.get("world_seed", 0)),
        "eval_batch_size": int(raw.get("eval_batch_size", 64)),
        "eval_max_new_tokens": int(raw.get("eval_max_new_tokens", 16)),
    }
    return rasa, script


# ------------------------------------------------------------------------------------------------------------ runs


def train(base_model, tokenizer, pairs, settings: dict[str, Any], *, schedule: str, rounds: int, seed: int,
          selection=None, expert_lr: float | None = None):
    """A copy of the base model trained with one schedule; returns (model, seconds)."""
    model = copy.deepcopy(base_model)
    kwargs = dict(settings, rasa_schedule=schedule, rasa_rounds=rounds, seed=seed)
    if expert_lr is not None:
        kwargs["expert_learning_rate"] = expert_lr
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rasa-compare-") as tmp:
        trainer = RASATrainer(model, args=RASAConfig(output_dir=tmp, **kwargs), train_dataset=pairs,
                              processing_class=tokenizer, safety_critical_experts=selection)
        trainer.train()
    model = trainer.model.eval()
    # TRL turns output_router_logits on for the load-balancing loss of full SFT and leaves it on; generation with
    # left-padded batches then fails inside transformers' load_balancing_loss_func. Inference needs no router logits.
    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        text_config.output_router_logits = False
    return model, time.perf_counter() - start


def random_selection(base_model, detected: SafetyCriticalExperts, seed: int) -> SafetyCriticalExperts:
    """K experts drawn uniformly with ``seed`` (the library's 'random' policy) from the detection statistics."""
    k = len(detected)
    config = SelectionConfig(policy="random", num_experts=k, seed=seed)
    mask = select_experts(detected.statistics, config)
    return SafetyCriticalExperts.from_statistics(base_model, detected.statistics, mask, selection=config.to_dict(),
                                                 judge=detected.judge, pairs=detected.pairs)


def overlap(a: SafetyCriticalExperts, b: SafetyCriticalExperts) -> int:
    return int((a.mask() & b.mask()).sum())


# ------------------------------------------------------------------------------------------------------------ summary


def mean_report(reports: list[SafetyReport]) -> SafetyReport:
    """A report whose rates are the means over ``reports`` (same evaluation sets), for the table."""
    dicts = [r.to_dict() for r in reports]

    def avg(values):
        first = values[0]
        if isinstance(first, bool) or not isinstance(first, (float, dict, list)):
            return first  # counts, names, flags: equal in every report
        if isinstance(first, float):
            return sum(values) / len(values)
        if isinstance(first, dict):
            return {k: avg([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [avg([v[i] for v in values]) for i in range(len(first))] if first and isinstance(first[0], float) else first
        return first

    return SafetyReport(**{key: avg([d[key] for d in dicts]) for key in dicts[0]})


def spread(reports: list[SafetyReport]) -> dict[str, dict[str, float | int | None]]:
    """Per metric key: mean, std (population), min, max over the reports, and n."""
    out = {}
    metrics = [r.metrics() for r in reports]
    for key in metrics[0]:
        values = [m.get(key) for m in metrics if m.get(key) is not None]
        if not values:
            out[key] = {"mean": None, "std": None, "min": None, "max": None, "n": 0}
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        out[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}
    return out


def spread_table(summaries: dict[str, dict[str, dict]], keys: list[str]) -> str:
    """Min-max over seeds in percent, one column per method."""
    names = list(summaries)
    lines = []
    for key in keys:
        cells = []
        for name in names:
            s = summaries[name].get(key)
            if s is None or s["mean"] is None:
                cells.append("-")
            elif s["n"] == 1 or s["min"] == s["max"]:
                cells.append(f"{100 * s['min']:.1f}")
            else:
                cells.append(f"{100 * s['min']:.1f}-{100 * s['max']:.1f}")
        if any(c != "-" for c in cells):
            lines.append([key, *cells])
    return render_table(["metric (min-max %)", *names], lines)


def render_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(row) for row in lines)])


# ------------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "rasa_trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    from rasa_trainer.safety_world import SafetyWorldJudge, load_safety_world_model, make_world, utility_correct

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings, script = load_settings(args)
    rounds = int(settings.get("rasa_rounds", 3))
    command = " ".join(shlex.quote(a) for a in ["python", "examples/compare.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()

    base_model, tokenizer = load_safety_world_model()
    base_model.eval()
    world = make_world(seed=script["world_seed"])
    pairs, eval_sets = world.train_pairs(), world.eval_sets()
    judge = SafetyWorldJudge()

    def evaluate(model, diagnostics: bool = True) -> SafetyReport:
        return evaluate_safety(model, tokenizer, eval_sets, judge, refusal_judge=judge,
                               base_model=base_model if diagnostics else None, utility_check=utility_correct,
                               batch_size=script["eval_batch_size"], max_new_tokens=script["eval_max_new_tokens"],
                               progress=False)

    timings: dict[str, list[float]] = {}
    runs: dict[str, dict[str, SafetyReport]] = {}

    def record(name: str, seed: int | str, report: SafetyReport, seconds: float | None = None) -> None:
        runs.setdefault(name, {})[str(seed)] = report
        if seconds is not None:
            timings.setdefault(name, []).append(seconds)
        logger.info("%-22s seed %-4s ASR aligned %5.1f%%  held-out %5.1f%%  utility %5.1f%%  over-refusal %5.1f%%%s",
                    name, seed, 100 * report.asr_aligned, 100 * report.asr_held_out, 100 * report.utility_accuracy,
                    100 * report.over_refusal_rate, f"  ({seconds:.0f} s training)" if seconds is not None else "")

    logger.info("world seed %d: %d training pairs; seeds %s; budget %d epochs per method", script["world_seed"],
                len(pairs), args.seeds, 2 * rounds)
    record("base", "-", evaluate(base_model, diagnostics=False))

    t0 = time.perf_counter()
    detected = detect_safety_critical_experts(
        base_model, tokenizer, pairs, judge=judge, anchor_column=settings.get("anchor_column", "anchor_prompt"),
        batch_size=settings.get("detection_batch_size", 32), max_new_tokens=settings.get("detection_max_new_tokens", 16),
        policy=settings.get("sce_policy", "global_topk"), num_experts=settings.get("sce_num_experts", 0.125),
        threshold=settings.get("sce_threshold", 0.0), seed=0, progress=False,
    )
    timings["detection"] = [time.perf_counter() - t0]
    logger.info("detected %d Safety-Critical Experts: %s", len(detected), detected.by_moe_layer())

    if "steering" in args.methods:  # deterministic: once
        steered = copy.deepcopy(base_model)
        with steer_away(steered, detected):
            record("steering", "-", evaluate(steered))

    random_draws = {}
    for seed in args.seeds:
        if "full" in args.methods:
            for lr in args.full_learning_rates:
                model, secs = train(base_model, tokenizer, pairs, settings, schedule="full", rounds=2 * rounds,
                                    seed=seed, expert_lr=lr)
                record(f"full SFT (lr {lr:g})", seed, evaluate(model), secs)
        if "expert_only" in args.methods:
            model, secs = train(base_model, tokenizer, pairs, settings, schedule="expert_only", rounds=2 * rounds,
                                seed=seed, selection=detected)
            record("expert only", seed, evaluate(model), secs)
        if "router_only" in args.methods:
            model, secs = train(base_model, tokenizer, pairs, settings, schedule="router_only", rounds=2 * rounds,
                                seed=seed)
            record("router only", seed, evaluate(model), secs)
        if "random_experts" in args.methods:
            chosen = random_selection(base_model, detected, seed)
            random_draws[str(seed)] = {"experts": {str(k): v for k, v in chosen.by_moe_layer().items()},
                                       "overlap_with_detected": overlap(chosen, detected)}
            logger.info("random experts (seed %d): %s, %d of them detected", seed, chosen.by_moe_layer(),
                        overlap(chosen, detected))
            model, secs = train(base_model, tokenizer, pairs, settings, schedule="alternate", rounds=rounds,
                                seed=seed, selection=chosen)
            record("random experts", seed, evaluate(model), secs)
        if "rasa" in args.methods:
            model, secs = train(base_model, tokenizer, pairs, settings, schedule="alternate", rounds=rounds,
                                seed=seed, selection=detected)
            record("RASA", seed, evaluate(model), secs)

    means = {name: mean_report(list(reports.values())) for name, reports in runs.items()}
    summaries = {name: spread(list(reports.values())) for name, reports in runs.items()}
    keys = list(dict.fromkeys(k for name in runs for k in means[name].metrics()))
    table = format_comparison(means)
    spreads = spread_table(summaries, keys)
    total = time.perf_counter() - t_start
    header = (f"SafetyWorld (world seed {script['world_seed']}), seeds {args.seeds}: mean over seeds "
              f"(base and steering are deterministic: one run)")
    print(f"\n{header}\n{table}\n\nSpread over seeds (min-max, %)\n{spreads}\n\ntotal {total:.0f} s")

    results = {
        "command": command,
        "world_seed": script["world_seed"],
        "seeds": args.seeds,
        "budget_epochs": 2 * rounds,
        "settings": {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "full_learning_rates": args.full_learning_rates,
        "detected_experts": {str(k): v for k, v in detected.by_moe_layer().items()},
        "random_experts": random_draws,
        "summary": summaries,
        "runs": {name: {seed: r.to_dict() for seed, r in reports.items()} for name, reports in runs.items()},
        "timings_s": {**{k: v for k, v in timings.items()}, "total": total},
        "table": table,
        "spread_table": spreads,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_json(results, os.path.join(args.output_dir, "compare_results.json"))
    atomic_write(os.path.join(args.output_dir, "comparison.md"),
                 f"`{command}`\n\n{header}\n\n```\n{table}\n```\n\nSpread over seeds (min-max, %)\n\n```\n{spreads}\n```\n")
    logger.info("results in %s (%.0f s)", args.output_dir, total)
    return results


if __name__ == "__main__":
    main()
