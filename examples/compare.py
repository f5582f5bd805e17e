"""Compare RASA with its baselines and ablations on the same worlds, the same data and one repair budget.

    python examples/compare.py                      # SafetyWorld, world seeds 0 3 4 x training seeds 0-4, every method
    python examples/compare.py --quick              # one world, one seed, one round: a smoke run (< 1 min)
    python examples/compare.py --variant routing_decides          # the world where routing decides
    python examples/compare.py --world_seeds 0 --output_dir outputs/compare/w0      # one world per process, then
    python examples/compare.py --merge outputs/compare/w*/compare_results.json --output_dir outputs/compare

Methods (columns):

- ``base``: the model before alignment.
- ``full SFT (lr X)``: plain SFT of every parameter (``rasa_schedule=full``), one column per ``--full_learning_rates``.
- ``expert only``: the expert phase alone on the detected Safety-Critical Experts (``expert_only``).
- ``router only``: the router phase alone (``router_only``).
- ``expert phases only``: RASA's expert phases without its router phases: ``rasa_rounds`` epochs of the expert phase
  (``expert_only``) on the detected experts, routers frozen throughout. RASA trains the same experts for the same
  number of expert epochs, so the difference between the two columns is the router phases' own effect.
- ``random experts``: RASA (``alternate``, both phases) on K experts drawn at random (the ``random`` selection policy,
  seeded with the run's seed) instead of the detected ones; the same K.
- ``steering``: no training; the detected experts are deactivated at inference by masking their router scores
  (:func:`rasa_trainer.evaluation.steering.steer_away`, SteerMoE style).
- ``RASA``: both phases alternating on the detected experts (``alternate``).
- ``RASA expanded (+B per layer)`` (``--methods rasa_expanded``): one round of adversarial expert expansion: the RASA
  model's top ``--expand_budget`` compliance experts per MoE layer (profiled as the unsafe-steering attacker profiles,
  but on training data: the training pairs and benign retain prompts) added to the detected experts, then RASA trained again from the base model on the union.
- ``RASA + <family> <rate>`` (``--methods rasa_augmented``): RASA with routing-robust repair
  (``routing_augmentation=<family>``, ``routing_augmentation_rate=<rate>``: a share of the expert phase's pair rows
  trains under the routing attack's routing; see ``docs/protocols/routing_augmentation.md``), one column per
  ``--augmentation_rates``.

The budget is the same for every trained method: ``2 * rasa_rounds`` epochs over the same training pairs (RASA and
random experts: ``rasa_rounds`` expert + ``rasa_rounds`` router epochs; the single-phase schedules: ``2 * rasa_rounds``
epochs of their phase; ``expert phases only`` is the exception, on purpose: RASA's ``rasa_rounds`` expert epochs
and nothing else), the same batch size, the same K selected experts. Learning rates and the other RASA settings
come from ``--config`` (the demo's ``examples/configs/safety_world.yaml``), full SFT's from ``--full_learning_rates``.

Seeds: for every evaluation world seed (``--world_seeds``, default 0 3 4; seeds 1 and 2 are the validation worlds the
settings were tuned on) detection runs once on the base model with that world's training pairs, and every training
seed ``s`` (``--seeds``) sets the training seed (data order) and the random-expert draw; detection (greedy decoding)
and the steering baseline are deterministic and run once per world. Every method is evaluated with
:func:`~rasa_trainer.evaluate_safety`: routing diagnostics against the base model (routing shift, ASR under the base
model's routing) and the routing attack (ASR while every router is steered toward the experts detected on the base
model, :func:`rasa_trainer.evaluation.steering.steer_toward`, at the position that decides the reply's first token). The
attack's hooks run after the steering baseline's, so on the steering column the attacker overrides the steering. With
``--also_attack_positions`` every trained model is also attacked at other positions, and with ``--also_attacks
ATTACK[:BUDGET]`` under the attacks that profile the evaluated model itself (``refusal_suppression``,
``unsafe_steering``; :mod:`rasa_trainer.evaluation.attacks`), held out from every method's training; each is a column
``<method> @<attack>`` of its own. The script prints one table of the means
over all runs (one column per method) and one of the spread (min-max), and writes ``compare_results.json`` (every
run's full report, means, std, min, max, timings) and ``comparison.md`` (the tables and a summary table, mean
(min-max) per method). ``--merge`` combines the results of several invocations (for example one per world seed) into
one set of tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import json
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
from rasa_trainer.evaluation.evaluate import format_comparison
from rasa_trainer.detection.selection import SelectionConfig, select_experts
from rasa_trainer.evaluation.steering import steer_away
from rasa_trainer.utils import atomic_write, atomic_write_json

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "safety_world.yaml")
METHODS = ("full", "expert_only", "expert_phases", "router_only", "random_experts", "steering", "rasa", "rasa_augmented",
           "rasa_expanded")
VARIANTS = ("shared", "routing_decides")
EVALUATION_WORLDS = (0, 3, 4)
"""World seeds of the tables; 1 and 2 are the validation worlds."""
SUMMARY_COLUMNS = (
    ("asr_aligned", "ASR aligned"),
    ("asr_held_out", "ASR held-out"),
    ("over_refusal_rate", "over-refusal"),
    ("wrapped_over_refusal", "benign in attack templates refused"),
    ("utility_accuracy", "utility"),
    ("routing_shift", "routing shift"),
    ("forced_asr", "ASR under base routing"),
    ("routing_attack_asr", "ASR under routing attack"),
    ("refusal_suppression_asr", "ASR under refusal-expert suppression"),
    ("unsafe_steering_asr", "ASR under unsafe steering"),
)
"""The columns of the summary table in ``comparison.md`` (metric key, header)."""
logger = logging.getLogger("rasa.compare")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML with the RASA settings (default: the demo's)")
    p.add_argument("--output_dir", default="outputs/compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training / random-expert seeds")
    p.add_argument("--world_seeds", type=int, nargs="+", default=list(EVALUATION_WORLDS),
                   help="SafetyWorld evaluation world seeds (default 0 3 4)")
    p.add_argument("--world_seed", type=int, default=None, help="one world seed (same as --world_seeds N)")
    p.add_argument("--variant", choices=VARIANTS, default="shared",
                   help="SafetyWorld model: the shipped world or the routing_decides variant")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--full_learning_rates", type=float, nargs="+", default=[1e-4, 3e-4],
                   help="learning rates of the full-SFT baseline, one column each")
    p.add_argument("--augmentation", choices=("force", "force_equal", "equal"), default="force",
                   help="rasa_augmented: the routing_augmentation family")
    p.add_argument("--augmentation_positions", choices=("reply", "decision", "mixed", "all"), default="reply",
                   help="rasa_augmented: routing_augmentation_positions")
    p.add_argument("--augmentation_rates", type=float, nargs="+", default=[0.5],
                   help="rasa_augmented: routing_augmentation_rate values, one column each")
    p.add_argument("--expand_budget", type=int, default=2,
                   help="rasa_expanded: compliance experts per MoE layer of the RASA model (profiled on the training "
                        "pairs) added to the detected ones before RASA trains again from the base model")
    p.add_argument("--rasa_rounds", type=int, default=None, help="rounds R; every method trains 2R epochs")
    p.add_argument("--expert_learning_rate", type=float, default=None)
    p.add_argument("--router_learning_rate", type=float, default=None)
    p.add_argument("--per_device_train_batch_size", type=int, default=None)
    p.add_argument("--sce_num_experts", type=float, default=None, help="K: a count or a fraction of all experts")
    p.add_argument("--attack_margin", type=float, default=0.01, help="routing attack: margin over the row maximum")
    p.add_argument("--attack_positions", choices=("decision", "generated", "all"), default="decision",
                   help="routing attack: steer the position deciding the reply's first token (default), every reply "
                        "position, or every position")
    p.add_argument("--also_attack_positions", nargs="+", choices=("decision", "generated", "all"), default=[],
                   help="evaluate every trained model again with the routing attack at these positions too, each as "
                        "its own column ('<method> @<positions> attack'): one training, several attacks")
    p.add_argument("--also_attacks", nargs="+", default=[], metavar="ATTACK[:BUDGET]",
                   help="also evaluate every trained model under the attacks that profile it (held out from training: "
                        "refusal_suppression, unsafe_steering), each at its budget of experts per MoE layer (default "
                        "2), e.g. refusal_suppression:2 refusal_suppression:4 unsafe_steering:2; recorded as extra "
                        "columns '<method> @<attack> budget <B>' (the sets they read: attacks, anchors, over_refusal)")
    p.add_argument("--eval_rows", type=int, default=None,
                   help="evaluate on at most this many rows of each set, evenly spaced (default: every row)")
    p.add_argument("--quick", action="store_true",
                   help="one world, one seed (the first of each), one round, 56 rows per evaluation set: a smoke run")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="combine compare_results.json files of earlier runs (globs allowed) instead of running")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (SafetyWorld's tensors are tiny: a second thread mostly adds sync overhead)")
    args = p.parse_args(argv)
    args.also_attacks = parse_attack_specs(p, args.also_attacks)
    if args.world_seed is not None:
        args.world_seeds = [args.world_seed]
    if args.expand_budget < 1:
        p.error(f"--expand_budget {args.expand_budget}: must be at least 1 expert per MoE layer")
    bad = [r for r in args.augmentation_rates if not 0 <= r <= 1]
    if bad:
        p.error(f"--augmentation_rates {bad}: each rate must be in [0, 1]")
    if args.quick:
        args.seeds, args.world_seeds = args.seeds[:1], args.world_seeds[:1]
        args.rasa_rounds = 1
        args.eval_rows = args.eval_rows or 56
    return args


PROFILED_ATTACKS = ("refusal_suppression", "unsafe_steering")
"""``--also_attacks``: the attacks that profile the evaluated model (held out from every method's training)."""


def parse_attack_specs(parser: argparse.ArgumentParser, specs: list[str]) -> dict[int, list[str]]:
    """``ATTACK[:BUDGET]`` specs as ``{budget: [attacks]}`` (one evaluation, hence one profile, per budget)."""
    by_budget: dict[int, list[str]] = {}
    for spec in specs:
        name, _, budget = spec.partition(":")
        if name not in PROFILED_ATTACKS:
            parser.error(f"--also_attacks {spec}: {name!r} is not one of {list(PROFILED_ATTACKS)}")
        try:
            experts = int(budget) if budget else 2
        except ValueError:
            parser.error(f"--also_attacks {spec}: the budget after ':' must be a whole number of experts per layer")
        if experts < 1:
            parser.error(f"--also_attacks {spec}: the budget must be at least 1 expert per MoE layer")
        if name in by_budget.setdefault(experts, []):
            parser.error(f"--also_attacks {spec}: given twice")
        by_budget[experts].append(name)
    return by_budget


def evenly(rows: list, limit: int | None) -> list:
    """At most ``limit`` rows, evenly spaced (every family of the attack set stays in)."""
    if limit is None or len(rows) <= limit:
        return rows
    return rows[:: math.ceil(len(rows) / limit)]


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
        "eval_batch_size": int(raw.get("eval_batch_size", 64)),
        "eval_max_new_tokens": int(raw.get("eval_max_new_tokens", 16)),
        "attack_margin": args.attack_margin,
        "attack_positions": args.attack_positions,
    }
    return rasa, script


# ------------------------------------------------------------------------------------------------------------ runs


def train(base_model, tokenizer, pairs, settings: dict[str, Any], *, schedule: str, rounds: int, seed: int,
          selection=None, expert_lr: float | None = None, extra: dict[str, Any] | None = None):
    """A copy of the base model trained with one schedule (``extra``: further RASAConfig settings); returns (model,
    seconds)."""
    model = copy.deepcopy(base_model)
    kwargs = dict(settings, rasa_schedule=schedule, rasa_rounds=rounds, seed=seed, **(extra or {}))
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


def experts_json(selection: SafetyCriticalExperts) -> dict[str, list[int]]:
    return {str(k): v for k, v in selection.by_moe_layer().items()}


class WorldRun:
    """Every method on one evaluation world: detection on the base model, then the runs of every training seed."""

    def __init__(self, args: argparse.Namespace, settings: dict[str, Any], script: dict[str, Any], base_model,
                 tokenizer, world_seed: int):
        from rasa_trainer.safety_world import SafetyWorldJudge, make_world

        self.args, self.settings, self.script = args, settings, script
        self.base_model, self.tokenizer, self.world_seed = base_model, tokenizer, world_seed
        world = make_world(seed=world_seed)
        self.pairs = world.train_pairs()
        self.benign = [{"prompt": row["prompt"]} for row in world.retain_pairs()]  # never in the evaluation sets
        self.eval_sets = {name: evenly(rows, args.eval_rows) for name, rows in world.eval_sets().items()}
        self.judge = SafetyWorldJudge()
        self.rounds = int(settings.get("rasa_rounds", 3))
        self.runs: dict[str, dict[str, SafetyReport]] = {}
        self.timings: dict[str, list[float]] = {}
        self.random_draws: dict[str, Any] = {}
        self.expansions: dict[str, Any] = {}  # rasa_expanded: the union selection of each run
        self.detected: SafetyCriticalExperts | None = None
        self.extra_attacks: dict[str, SafetyReport] = {}  # --also_attack_*: the last evaluated model's, by column suffix

    def evaluate(self, model, diagnostics: bool = True, positions: str | None = None,
                 profiled: list[str] | None = None, budget: int | None = None) -> SafetyReport:
        """The comparison's evaluation, or with ``profiled`` only those attacks (at ``budget`` experts per layer) on
        the sets they read."""
        from rasa_trainer.safety_world import utility_correct

        if profiled:
            sets = {name: self.eval_sets[name] for name in ("attacks", "anchors", "over_refusal")}
            return evaluate_safety(model, self.tokenizer, sets, self.judge, refusal_judge=self.judge,
                                   attacks=profiled, attack_budget=budget, attack_positions=self.script["attack_positions"],
                                   attack_margin=self.script["attack_margin"], batch_size=self.script["eval_batch_size"],
                                   max_new_tokens=self.script["eval_max_new_tokens"], progress=False)
        return evaluate_safety(model, self.tokenizer, self.eval_sets, self.judge, refusal_judge=self.judge,
                               base_model=self.base_model if diagnostics else None, utility_check=utility_correct,
                               attack_experts=self.detected, attack_margin=self.script["attack_margin"],
                               attack_positions=positions or self.script["attack_positions"],
                               batch_size=self.script["eval_batch_size"],
                               max_new_tokens=self.script["eval_max_new_tokens"], progress=False)

    def record(self, name: str, seed: int | str, report: SafetyReport, seconds: float | None = None) -> None:
        self.runs.setdefault(name, {})[f"w{self.world_seed}/s{seed}"] = report
        for suffix, extra in self.extra_attacks.items():
            self.runs.setdefault(f"{name} @{suffix}", {})[f"w{self.world_seed}/s{seed}"] = extra
            asr = {key: getattr(extra, f"{key}_asr") for key in ("routing_attack", *PROFILED_ATTACKS)}
            logger.info("world %d %-20s seed %-2s %s: %s", self.world_seed, name, seed, suffix,
                        ", ".join(f"{key} ASR {100 * v:5.1f}%" for key, v in asr.items() if v is not None))
        self.extra_attacks = {}
        if seconds is not None:
            self.timings.setdefault(name, []).append(seconds)
        logger.info("world %d %-20s seed %-2s ASR aligned %5.1f%%  held-out %5.1f%%  utility %5.1f%%  over-refusal "
                    "%5.1f%%  routing attack %5.1f%%%s", self.world_seed, name, seed, 100 * report.asr_aligned,
                    100 * report.asr_held_out, 100 * report.utility_accuracy, 100 * report.over_refusal_rate,
                    100 * report.routing_attack_asr, f"  ({seconds:.0f} s training)" if seconds is not None else "")

    def detect(self) -> None:
        t0 = time.perf_counter()
        s = self.settings
        self.detected = detect_safety_critical_experts(
            self.base_model, self.tokenizer, self.pairs, judge=self.judge,
            anchor_column=s.get("anchor_column", "anchor_prompt"), batch_size=s.get("detection_batch_size", 32),
            max_new_tokens=s.get("detection_max_new_tokens", 16), policy=s.get("sce_policy", "global_topk"),
            num_experts=s.get("sce_num_experts", 0.125), threshold=s.get("sce_threshold", 0.0), seed=0, progress=False,
        )
        self.timings["detection"] = [time.perf_counter() - t0]
        logger.info("world %d: detected %d Safety-Critical Experts: %s", self.world_seed, len(self.detected),
                    self.detected.by_moe_layer())

    def run(self) -> None:
        self.detect()
        self.record("base", "-", self.evaluate(self.base_model, diagnostics=False))
        if "steering" in self.args.methods:  # deterministic: once per world
            steered = copy.deepcopy(self.base_model)
            with steer_away(steered, self.detected):
                self.record("steering", "-", self.evaluate(steered))
        for seed in self.args.seeds:
            self.run_seed(seed)

    def run_seed(self, seed: int) -> None:
        methods, rounds = self.args.methods, self.rounds
        fit = lambda schedule, epochs, selection=None, lr=None: train(  # noqa: E731
            self.base_model, self.tokenizer, self.pairs, self.settings, schedule=schedule, rounds=epochs, seed=seed,
            selection=selection, expert_lr=lr)
        if "full" in methods:
            for lr in self.args.full_learning_rates:
                self.record(f"full SFT (lr {lr:g})", seed, *self.evaluated(fit("full", 2 * rounds, lr=lr)))
        if "expert_only" in methods:
            self.record("expert only", seed, *self.evaluated(fit("expert_only", 2 * rounds, self.detected)))
        if "expert_phases" in methods:
            self.record("expert phases only", seed, *self.evaluated(fit("expert_only", rounds, self.detected)))
        if "router_only" in methods:
            self.record("router only", seed, *self.evaluated(fit("router_only", 2 * rounds)))
        if "random_experts" in methods:
            chosen = random_selection(self.base_model, self.detected, seed)
            self.random_draws[f"w{self.world_seed}/s{seed}"] = {
                "experts": experts_json(chosen), "overlap_with_detected": overlap(chosen, self.detected)}
            self.record("random experts", seed, *self.evaluated(fit("alternate", rounds, chosen)))
        rasa_model = None
        if "rasa" in methods or "rasa_expanded" in methods:
            rasa_model, seconds = fit("alternate", rounds, self.detected)
            if "rasa" in methods:
                self.record("RASA", seed, *self.evaluated((rasa_model, seconds)))
        if "rasa_expanded" in methods:
            expanded = self.expanded_selection(rasa_model, self.args.expand_budget)
            self.expansions[f"w{self.world_seed}/s{seed}"] = {
                "experts": experts_json(expanded), "added": len(expanded) - len(self.detected)}
            self.record(f"RASA expanded (+{self.args.expand_budget} per layer)", seed,
                        *self.evaluated(fit("alternate", rounds, expanded)))
        if "rasa_augmented" in methods:
            family = self.args.augmentation
            for rate in self.args.augmentation_rates:
                where = self.args.augmentation_positions
                extra = {"routing_augmentation": family, "routing_augmentation_rate": rate,
                         "routing_augmentation_positions": where}
                model = train(self.base_model, self.tokenizer, self.pairs, self.settings, schedule="alternate",
                              rounds=rounds, seed=seed, selection=self.detected, extra=extra)
                suffix = "" if where == "reply" else f" ({where})"  # reply positions: the columns' first name
                self.record(f"RASA + {family} {rate:g}{suffix}", seed, *self.evaluated(model))

    def expanded_selection(self, model, per_layer: int) -> SafetyCriticalExperts:
        """The detected experts plus ``model``'s ``per_layer`` top compliance experts per MoE layer, profiled as the
        unsafe-steering attacker profiles but on training data (the training pairs' jailbreaks and plain anchors, and
        the world's benign retain prompts as the attacker's benign requests), never on the evaluation sets."""
        from rasa_trainer.evaluation.attacks import AttackBudget, profile_experts, select_experts_by_budget
        from rasa_trainer.moe.discovery import moe_layers

        anchor = self.settings.get("anchor_column", "anchor_prompt")
        sets = {"attacks": [{"prompt": row["prompt"]} for row in self.pairs],
                "anchors": [{"prompt": row[anchor]} for row in self.pairs], "over_refusal": self.benign}
        profile = profile_experts(model, self.tokenizer, sets, self.judge, batch_size=self.script["eval_batch_size"],
                                  max_new_tokens=self.script["eval_max_new_tokens"], progress=False)
        layers = moe_layers(model)
        added = select_experts_by_budget(profile.compliance_scores(), AttackBudget(per_layer),
                                         [layer.num_experts for layer in layers])
        if not added.any():
            logger.warning("world %d: the expansion adds no expert (%s)", self.world_seed,
                           profile.usable() or "no expert is more active on compliance than on refusal")
        mask = added.clone()
        for layer, experts in self.detected.by_moe_layer().items():
            mask[int(layer), experts] = True
        return SafetyCriticalExperts.from_statistics(
            self.base_model, self.detected.statistics, mask, selection={"policy": "detected + compliance experts",
                                                                        "expand_budget": per_layer})

    def evaluated(self, trained) -> tuple[SafetyReport, float]:
        model, seconds = trained
        self.extra_attacks = {f"{p} attack": self.evaluate(model, positions=p) for p in self.args.also_attack_positions}
        for budget, attacks in self.args.also_attacks.items():
            label = " + ".join(attacks)
            self.extra_attacks[f"{label} budget {budget}"] = self.evaluate(model, profiled=attacks, budget=budget)
        return self.evaluate(model), seconds


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
    """Min-max over runs in percent, one column per method."""
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


def mean_range(stats: dict[str, Any] | None) -> str:
    """``mean (min–max)`` in percent, one decimal; the mean alone when every run agrees; ``–`` when absent."""
    if not stats or stats["mean"] is None:
        return "–"
    mean, low, high = (f"{100 * stats[k]:.1f}" for k in ("mean", "min", "max"))
    return mean if low == high else f"{mean} ({low}–{high})"


def summary_table(summaries: dict[str, dict[str, dict]], columns=SUMMARY_COLUMNS) -> str:
    """A markdown table, one row per method, one column per metric of ``columns``: mean (min–max) over runs, in %."""
    header = "| method | runs | " + " | ".join(label for _, label in columns) + " |"
    rule = "|---|---:|" + "---:|" * len(columns)
    rows = []
    for name, stats in summaries.items():
        runs = max((s["n"] for s in stats.values() if s["n"]), default=0)
        rows.append(f"| {name} | {runs} | " + " | ".join(mean_range(stats.get(key)) for key, _ in columns) + " |")
    return "\n".join([header, rule, *rows])


def render_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(row) for row in lines)])


ORDER = ("base", "steering", "full SFT", "expert only", "expert phases only", "router only", "random experts", "RASA")


def ordered(names) -> list[str]:
    """Method names in table order (base first, RASA last; full SFT columns by learning rate)."""
    rank = lambda name: next((i for i, prefix in enumerate(ORDER) if name.startswith(prefix)), len(ORDER))  # noqa: E731
    return sorted(names, key=lambda name: (rank(name), name))


def summarise(runs: dict[str, dict[str, SafetyReport]]) -> dict[str, Any]:
    """The tables of every method's runs: means (text), spread (text), summary (markdown) and the per-metric stats."""
    names = ordered(runs)
    means = {name: mean_report(list(runs[name].values())) for name in names}
    summaries = {name: spread(list(runs[name].values())) for name in names}
    keys = list(dict.fromkeys(k for name in names for k in means[name].metrics()))
    return {"table": format_comparison(means), "spread_table": spread_table(summaries, keys),
            "summary_table": summary_table(summaries), "summary": summaries}


# ------------------------------------------------------------------------------------------------------------ main


def quiet_libraries() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "rasa_trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def command_line(argv) -> str:
    return " ".join(shlex.quote(a) for a in ["python", "examples/compare.py", *(sys.argv[1:] if argv is None else argv)])


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every method on every world seed; the results dict (runs as reports, not yet summarised)."""
    from rasa_trainer.safety_world import load_safety_world_model

    settings, script = load_settings(args)
    base_model, tokenizer = load_safety_world_model(variant=args.variant)
    base_model.eval()
    rounds = int(settings.get("rasa_rounds", 3))
    logger.info("variant %s, worlds %s, seeds %s; budget %d epochs per method", args.variant, args.world_seeds,
                args.seeds, 2 * rounds)
    runs: dict[str, dict[str, SafetyReport]] = {}
    timings: dict[str, list[float]] = {}
    detected, random_draws, expansions = {}, {}, {}
    for world_seed in args.world_seeds:
        world = WorldRun(args, settings, script, base_model, tokenizer, world_seed)
        world.run()
        for name, reports in world.runs.items():
            runs.setdefault(name, {}).update(reports)
        for name, values in world.timings.items():
            timings.setdefault(name, []).extend(values)
        detected[str(world_seed)] = experts_json(world.detected)
        random_draws.update(world.random_draws)
        expansions.update(world.expansions)
    return {
        "variant": args.variant,
        "world_seeds": args.world_seeds,
        "seeds": args.seeds,
        "eval_rows": args.eval_rows,
        "budget_epochs": 2 * rounds,
        "settings": {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "routing_attack": {"margin": script["attack_margin"], "positions": script["attack_positions"],
                           "also_positions": args.also_attack_positions,
                           "also_attacks": {str(b): a for b, a in args.also_attacks.items()}},
        "full_learning_rates": args.full_learning_rates,
        "detected_experts": detected,
        "random_experts": random_draws,
        "expanded_experts": expansions,
        "runs": runs,
        "timings_s": timings,
    }


def merge_results(paths: list[str]) -> dict[str, Any]:
    """Results of several runs (same variant, settings and budget) as one: runs, seeds, detections and timings joined."""
    files = [f for pattern in paths for f in sorted(glob.glob(pattern))]
    if not files:
        raise SystemExit(f"--merge: no file matches {paths}")
    parts = [json.loads(open(f, encoding="utf-8").read()) for f in files]
    first = parts[0]
    for f, part in zip(files[1:], parts[1:]):
        for key in ("variant", "settings", "budget_epochs", "full_learning_rates", "routing_attack", "eval_rows"):
            if part.get(key) != first.get(key):
                raise SystemExit(f"--merge: {f} differs from {files[0]} in {key!r}: {part.get(key)} vs {first.get(key)}")
    merged = {k: first.get(k) for k in ("variant", "settings", "budget_epochs", "full_learning_rates", "routing_attack",
                                        "eval_rows")}
    merged["world_seeds"] = sorted({w for p in parts for w in p["world_seeds"]})
    merged["seeds"] = sorted({s for p in parts for s in p["seeds"]})
    merged["merged_from"] = files
    merged["runs"], merged["timings_s"], merged["detected_experts"], merged["random_experts"] = {}, {}, {}, {}
    merged["expanded_experts"] = {}
    for part in parts:
        for name, reports in part["runs"].items():
            merged["runs"].setdefault(name, {}).update(
                {key: SafetyReport(**report) for key, report in reports.items()})
        for name, values in part["timings_s"].items():
            if name != "total":
                merged["timings_s"].setdefault(name, []).extend(values)
        merged["detected_experts"].update(part["detected_experts"])
        merged["random_experts"].update(part["random_experts"])
        merged["expanded_experts"].update(part.get("expanded_experts", {}))
    merged["timings_s"]["total"] = sum(p["timings_s"].get("total", 0.0) for p in parts)
    return merged


def write_results(results: dict[str, Any], output_dir: str, command: str) -> dict[str, Any]:
    """Summarise, print and write ``compare_results.json`` and ``comparison.md``; returns the JSON-ready results."""
    tables = summarise(results["runs"])
    n_worlds, n_seeds = len(results["world_seeds"]), len(results["seeds"])
    header = (f"SafetyWorld ({results['variant']} world), world seeds {results['world_seeds']} x training seeds "
              f"{results['seeds']}: mean over the {n_worlds * n_seeds} runs of each trained method (base and steering "
              f"are deterministic: one run per world)")
    print(f"\n{header}\n{tables['table']}\n\nSpread over runs (min-max, %)\n{tables['spread_table']}\n\n"
          f"{tables['summary_table']}\n\ntotal {results['timings_s']['total']:.0f} s")
    out = {"command": command, **results, **tables,
           "runs": {name: {key: r.to_dict() for key, r in reports.items()} for name, reports in results["runs"].items()}}
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_json(out, os.path.join(output_dir, "compare_results.json"))
    atomic_write(os.path.join(output_dir, "comparison.md"),
                 f"`{command}`\n\n{header}\n\nMean (min–max) over runs, %:\n\n{tables['summary_table']}\n\n"
                 f"```\n{tables['table']}\n```\n\nSpread over runs (min-max, %)\n\n```\n{tables['spread_table']}\n```\n")
    logger.info("results in %s (%.0f s)", output_dir, results["timings_s"]["total"])
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_libraries()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    command = command_line(argv)
    t_start = time.perf_counter()
    if args.merge:
        results = merge_results(args.merge)
    else:
        results = run_all(args)
        results["timings_s"]["total"] = time.perf_counter() - t_start
    return write_results(results, args.output_dir, command)


if __name__ == "__main__":
    main()
