"""Rebuild the SafetyWorld base model and print its measured base rates.

    python examples/build_safety_world.py                       # into ./outputs/safety_world
    python examples/build_safety_world.py --output-dir rasa_trainer/safety_world/assets   # refresh the shipped model
    python examples/build_safety_world.py --seed 1 --steps 600
    python examples/build_safety_world.py --variant routing_decides \
        --output-dir rasa_trainer/safety_world/assets_routing_decides      # the routing_decides world

Takes about 3-5 minutes on 2 CPU cores (one thread is used on purpose: the tensors are tiny). The routing_decides
variant is accepted on validation world 1 (its `eval_world_seed`); the script then also runs detection on that world's
aligned-family training pairs with the demo's settings and prints which planted and family experts it selects.
"""

from __future__ import annotations

import argparse
import json

from rasa_trainer.safety_world import VARIANTS, build_safety_world_model, load_safety_world_model, make_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/safety_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: BuildConfig.steps)")
    parser.add_argument("--variant", choices=VARIANTS, default="shared")
    args = parser.parse_args()

    overrides: dict = {"steps": args.steps} if args.steps is not None else {}
    if args.variant != "shared":
        overrides.update(variant=args.variant, eval_world_seed=1)  # accepted on a validation world, never seed 0
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
    if args.variant != "shared":
        print(f"family experts: {json.dumps(meta['family_experts'])}")
        print(f"family routing: {json.dumps(meta['family_routing'])}")
        for name, rates in meta["routing_checks"].items():
            print(f"{name:<28s} {json.dumps(rates)}")
        print(f"detection on world 1: {json.dumps(detection_check(args.output_dir, meta))}")


def detection_check(path: str, meta: dict) -> dict:
    """Detection with the demo's settings on validation world 1's training pairs: which shared planted and which family
    experts it selects."""
    from rasa_trainer import detect_safety_critical_experts
    from rasa_trainer.safety_world import SafetyWorldJudge

    model, tokenizer = load_safety_world_model(path)
    detected = detect_safety_critical_experts(model, tokenizer, make_world(seed=1).train_pairs(), judge=SafetyWorldJudge(),
                                              batch_size=32, max_new_tokens=16, policy="global_topk", num_experts=0.125,
                                              threshold=0.0, seed=0, progress=False)
    chosen = {(int(layer), int(e)) for layer, experts in detected.by_moe_layer().items() for e in experts}
    family = {tuple(x) for experts in meta["family_experts"].values() for x in experts}
    return {"selected": len(chosen), "shared_planted": len(chosen & {tuple(x) for x in meta["planted_experts"]}),
            "family_experts": len(chosen & family)}


if __name__ == "__main__":
    main()
