"""Plan the memory of a RASA run without downloading anything.

Examples::

    # built-in presets (published config values, no download)
    python examples/estimate_memory.py --model Qwen3-30B-A3B --selection 0.125 --seq_len 2048
    python examples/estimate_memory.py --model OLMoE-1B-7B --selection 128 --optimizer adamw_8bit

    # a model type with config values
    python examples/estimate_memory.py --model qwen3_moe \
        --config_kwargs '{"hidden_size": 1024, "num_hidden_layers": 24, "num_experts": 64, "num_experts_per_tok": 8,
                          "moe_intermediate_size": 512, "num_attention_heads": 16, "num_key_value_heads": 4}'

    # a local config.json (or a directory with one), or a model id already in the local Hugging Face cache
    python examples/estimate_memory.py --model ./my-moe/config.json --tokens_in_dataset 5000000
"""

from __future__ import annotations

import argparse
import json

from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from rasa_trainer.memory import estimate_memory

# Published config values (the models' config.json on the Hub), so plans need no download.
PRESETS = {
    "Qwen3-30B-A3B": (
        "qwen3_moe",
        dict(hidden_size=2048, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
             intermediate_size=6144, vocab_size=151936, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
             max_position_embeddings=40960),
    ),
    "OLMoE-1B-7B": (
        "olmoe",
        dict(hidden_size=2048, num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, intermediate_size=1024,
             vocab_size=50304, num_attention_heads=16, num_key_value_heads=16, norm_topk_prob=False,
             tie_word_embeddings=False, max_position_embeddings=4096),
    ),
}


def build_config(model: str, config_kwargs: dict):
    """A preset, a model type (with ``config_kwargs``), or a path / cached model id (returned as is)."""
    lowered = {name.lower(): name for name in PRESETS}
    if model.lower() in lowered:
        model_type, values = PRESETS[lowered[model.lower()]]
        return AutoConfig.for_model(model_type, **{**values, **config_kwargs})
    if model in CONFIG_MAPPING:
        return AutoConfig.for_model(model, **config_kwargs)
    if config_kwargs:
        raise SystemExit("--config_kwargs applies to a preset or a model type, not to a path or model id")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description="Plan the memory of a RASA run (no download).")
    parser.add_argument("--model", required=True,
                        help=f"a preset ({', '.join(PRESETS)}), a model type (e.g. qwen3_moe, with --config_kwargs), a "
                             f"local config.json or directory, or a model id in the local Hugging Face cache")
    parser.add_argument("--config_kwargs", type=json.loads, default={}, help="JSON dict of config values")
    parser.add_argument("--selection", type=float, default=0.125,
                        help="selected experts: a count (>= 1) or a fraction of all routed experts (< 1)")
    parser.add_argument("--expert_tuning", choices=["delta", "lora"], default="delta")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
    parser.add_argument("--batch_size", type=int, default=8, help="per device")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--tokens_in_dataset", type=int, default=None)
    parser.add_argument("--gradient_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--replay_weights", choices=["cached", "recompute"], default="cached")
    parser.add_argument("--schedule", choices=["alternate", "expert_only", "router_only"], default="alternate")
    parser.add_argument("--device", default="cuda", help="training device type: cuda (or any accelerator) or cpu")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    args = parser.parse_args()

    selection = int(args.selection) if args.selection >= 1 else args.selection
    estimate = estimate_memory(
        build_config(args.model, args.config_kwargs), selection, expert_tuning=args.expert_tuning,
        lora_rank=args.lora_rank, dtype=args.dtype, optimizer=args.optimizer, batch_size=args.batch_size,
        seq_len=args.seq_len, tokens_in_dataset=args.tokens_in_dataset,
        gradient_checkpointing=args.gradient_checkpointing, num_processes=args.num_processes,
        replay_weights=args.replay_weights, schedule=args.schedule, device=args.device,
    )
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.format())


if __name__ == "__main__":
    main()
