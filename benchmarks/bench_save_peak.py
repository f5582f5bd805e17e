"""Peak memory of a mid-training save's merge at OLMoE-1B-7B's layer shapes (CPU allocator, bf16).

Model: OLMoE with OLMoE-1B-7B-0125's MoE shapes (hidden 2048, 64 experts, 1024 intermediate per expert, top-8), two
layers and a small vocabulary (the embedding is not what a save copies), bf16. Repairs (``delta``) on 8 of 64
experts in every layer, as a global top-12.5% selection touches nearly every layer.

Compared in one run, each measured as the CPU allocator's peak above its level at the start (profiler memory
events):

- ``merged_state_dict`` (what checkpoints used before): a clone of every repaired layer's fused expert tensors;
- ``merged_for_saving`` (what ``_save`` uses now): the repairs written in place, the selected experts' original slices
  kept aside and restored.

Usage: ``python benchmarks/bench_save_peak.py [--layers 2] [--selected 8]``
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rasa_trainer.memory.measure import cpu_allocated_peak as allocated_peak
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.repairs.layer import attach_repairs, merged_for_saving, merged_state_dict, repair_modules

GIB = 2**30


def olmoe_1b_7b_layers(layers: int):
    config = AutoConfig.for_model(
        "olmoe", vocab_size=1024, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    )
    with torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--selected", type=int, default=8, help="experts repaired per layer (of 64)")
    args = parser.parse_args()
    model = olmoe_1b_7b_layers(args.layers)
    attach_repairs(model, {l.index: list(range(args.selected)) for l in moe_layers(model)}, "delta")
    with torch.no_grad():
        for _, repairs in repair_modules(model):
            for p in repairs.parameters():
                p.normal_(0, 1e-3)
    experts = sum(getattr(l.experts, n).numel() * getattr(l.experts, n).element_size()
                  for l, r in repair_modules(model) for n in r.names)

    def clone_path():
        state = merged_state_dict(model)
        del state

    def in_place_path():
        with merged_for_saving(model):
            pass

    clone, in_place = allocated_peak(clone_path), allocated_peak(in_place_path)
    print(f"expert weights of the {args.layers} repaired layers: {experts / GIB:.3f} GiB "
          f"({args.selected} of 64 experts repaired per layer)")
    print(f"{'merge for a save':<28}{'peak above the model':>22}{'x expert weights':>18}")
    print(f"{'merged_state_dict (clone)':<28}{clone / GIB:>18.3f} GiB{clone / experts:>18.2f}")
    print(f"{'merged_for_saving (in place)':<28}{in_place / GIB:>18.3f} GiB{in_place / experts:>18.2f}")
    print(f"ratio clone / in place: {clone / max(in_place, 1):.1f}x")


if __name__ == "__main__":
    main()
