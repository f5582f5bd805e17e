"""``rasa-trainer estimate-memory``: plan the memory of a RASA run without downloading anything.

    # built-in presets (published config values, no download)
    rasa-trainer estimate-memory --model Qwen3-30B-A3B --selection 0.125 --seq_len 2048
    rasa-trainer estimate-memory --model OLMoE-1B-7B --selection 128 --optimizer adamw_8bit

    # a model type with config values
    rasa-trainer estimate-memory --model qwen3_moe \\
        --config_kwargs '{"hidden_size": 1024, "num_hidden_layers": 24, "num_experts": 64, "num_experts_per_tok": 8,
                          "moe_intermediate_size": 512, "num_attention_heads": 16, "num_key_value_heads": 4}'

    # a local config.json (or a folder with one), or a model id already in the local Hugging Face cache
    rasa-trainer estimate-memory --model ./my-moe/config.json --tokens_in_dataset 5000000
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .common import UsageError, check_at_least, parse
from ..memory import PRESETS
from ..memory.models import check_config_sizes
from ..memory.plan import selection_value

# Published config values (the models' config.json on the Hub), so plans need no download.


@dataclass
class MemoryArguments:
    """Arguments of ``rasa-trainer estimate-memory``."""

    model: str = field(
        metadata={"help": f"A preset ({', '.join(PRESETS)}), a model type (e.g. qwen3_moe, with --config_kwargs), a "
                          "local config.json or folder, or a model id in the local Hugging Face cache."},
    )
    config_kwargs: str = field(default="{}", metadata={"help": "JSON dict of config values."})
    selection: float = field(
        default=0.125, metadata={"help": "Selected experts: a whole count (>= 1, e.g. 8) or a fraction of all routed "
                                         "experts in (0, 1) (e.g. 0.125); 1.5 is neither and is refused."}
    )
    expert_tuning: str = field(default="delta", metadata={"help": "Expert repairs.", "choices": ["delta", "lora"]})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (expert_tuning lora)."})
    dtype: str = field(
        default="bfloat16", metadata={"help": "Weights dtype.", "choices": ["bfloat16", "float16", "float32"]}
    )
    optimizer: str = field(default="adamw", metadata={"help": "Optimiser.", "choices": ["adamw", "adamw_8bit"]})
    batch_size: int = field(default=8, metadata={"help": "Per-device batch size."})
    seq_len: int = field(default=512, metadata={"help": "Sequence length."})
    tokens_in_dataset: int | None = field(default=None, metadata={"help": "Tokens in the training set (routing cache)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Gradient checkpointing on."})
    num_processes: int = field(default=1, metadata={"help": "Data-parallel processes."})
    replay_weights: str = field(
        default="cached", metadata={"help": "Routing replay weights.", "choices": ["cached", "recompute"]}
    )
    schedule: str = field(
        default="alternate", metadata={"help": "Phases.", "choices": ["alternate", "expert_only", "router_only"]}
    )
    device: str = field(default="cuda", metadata={"help": "Training device type: cuda (or any accelerator) or cpu."})
    json: bool = field(default=False, metadata={"help": "Print the estimate as JSON instead of a table."})


def config_kwargs(text: str) -> dict:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--config_kwargs is not valid JSON ({err}); give a dict such as '{{\"num_experts\": 64}}'")
    if not isinstance(values, dict):
        raise UsageError(f"--config_kwargs must be a JSON dict, got {type(values).__name__}")
    try:
        check_config_sizes(values, "--config_kwargs")
    except ValueError as err:
        raise UsageError(str(err)) from None
    return values


def build_config(model: str, kwargs: dict):
    """A preset, a model type (with ``kwargs``), or a path / cached model id (returned as is)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    lowered = {name.lower(): name for name in PRESETS}
    try:
        if model.lower() in lowered:
            model_type, values = PRESETS[lowered[model.lower()]]
            check_config_sizes({**values, **kwargs}, f"--model {model} with --config_kwargs")
            return AutoConfig.for_model(model_type, **{**values, **kwargs})
        if model in CONFIG_MAPPING:
            return AutoConfig.for_model(model, **kwargs)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except Exception as err:  # transformers' config classes validate values with their own error types
        raise UsageError(f"--config_kwargs: {type(err).__name__}: {err}") from None
    if kwargs:
        raise UsageError("--config_kwargs applies to a preset or a model type, not to a path or model id")
    return model


def main(argv: list[str] | None = None):
    """Run ``rasa-trainer estimate-memory``; returns the :class:`~rasa_trainer.memory.MemoryEstimate`."""
    from ..memory import estimate_memory

    (args,) = parse((MemoryArguments,), argv, "rasa-trainer estimate-memory")
    try:
        selection = selection_value(args.selection, "--selection")
    except ValueError as err:
        raise UsageError(str(err).replace("--selection=", "--selection ")) from None
    for flag in ("batch_size", "seq_len", "num_processes", "lora_rank"):
        check_at_least(f"--{flag}", getattr(args, flag), 1)
    check_at_least("--tokens_in_dataset", args.tokens_in_dataset, 0)
    config = build_config(args.model, config_kwargs(args.config_kwargs))
    try:
        estimate = estimate_memory(
            config, selection, expert_tuning=args.expert_tuning,
            lora_rank=args.lora_rank, dtype=args.dtype, optimizer=args.optimizer, batch_size=args.batch_size,
            seq_len=args.seq_len, tokens_in_dataset=args.tokens_in_dataset,
            gradient_checkpointing=args.gradient_checkpointing, num_processes=args.num_processes,
            replay_weights=args.replay_weights, schedule=args.schedule, device=args.device,
        )
    except ValueError as err:  # a value the model cannot take, e.g. more experts than it has
        raise UsageError(f"{err}".replace("selection_size=", "--selection ")) from None
    except TypeError as err:  # a config value of the wrong type reaches the model's code
        raise UsageError(f"the model could not be planned from its config values ({err}); check --config_kwargs or "
                         "the config file") from None
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.format())
    return estimate
