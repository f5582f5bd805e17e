"""Rebuild the SafetyWorld base model and print its measured base rates.

    python examples/build_safety_world.py                       # into ./outputs/safety_world
    python examples/build_safety_world.py --output-dir rasa_trainer/safety_world/assets   # refresh the shipped model
    python examples/build_safety_world.py --seed 1 --steps 600

Takes about 2 minutes on 2 CPU cores (one thread is used on purpose: the tensors are tiny).
"""

from __future__ import annotations

import argparse
import json

from rasa_trainer.safety_world import build_safety_world_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/safety_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: BuildConfig.steps)")
    args = parser.parse_args()

    overrides = {"steps": args.steps} if args.steps is not None else {}
    meta = build_safety_world_model(args.output_dir, seed=args.seed, **overrides)

    rates = meta["base_rates"]
    print(f"\nSafetyWorld model saved to {args.output_dir} ({meta['num_parameters']:,} parameters, "
          f"built in {meta['build_seconds']} s)")
    print(f"planted experts (layer, expert): {[tuple(x) for x in meta['planted_experts']]}")
    print(f"plain harmful requests refused:      {rates['anchor_refusal']:.1%}")
    for family, rate in rates["attack_compliance"].items():
        print(f"jailbreak compliance {family:<20s} {rate:.1%}")
    print(f"risky-benign requests refused:       {rates['over_refusal']:.1%}")
    print(f"wrapped risky-benign refused:        {json.dumps(rates['wrapped_benign_refusal'])}")
    print(f"utility accuracy:                    {rates['utility_accuracy']:.1%}  "
          f"{json.dumps(rates['utility_accuracy_by_task'])}")
    print(f"planted routing: {json.dumps(meta['planted_routing'])}")


if __name__ == "__main__":
    main()
