"""The plan of a training config: the YAML file (or dict) that ``rasa-trainer train --config`` reads."""

from __future__ import annotations

import os

from .models import _model_or_preset
from .plan import MemoryEstimate, estimate_memory, selection_value

_OPTIMIZER_NAMES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_bnb_8bit": "adamw_8bit",
                    "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit"}


def estimate_memory_from_config(config, model=None, **overrides) -> MemoryEstimate:
    """The memory plan of a training config: the YAML file (or dict) that ``rasa-trainer train --config`` reads.

    The plan's settings come from the config's own keys (``RASAConfig`` / ``SFTConfig`` defaults where a key is
    absent): ``expert_tuning``, ``expert_lora_rank``, ``dtype``, ``optim``, ``per_device_train_batch_size``,
    ``max_length`` (the padded length), ``activation_checkpointing`` (or the deprecated ``gradient_checkpointing``),
    ``replay_weights``, ``rasa_schedule``, ``replay_cache_device``, ``sce_num_experts`` (the selection size),
    ``bf16`` / ``fp16`` (autocast) and ``use_cpu``. The model is ``model`` (a model, config or path) or the config's
    ``model_name_or_path``, resolved offline: a local path, a model id in the local Hugging Face cache, or else a
    built-in preset of the same name (``Qwen/Qwen3-30B-A3B`` -> the ``Qwen3-30B-A3B`` preset: the published
    config values). ``overrides`` are passed on to :func:`estimate_memory` (e.g. ``num_processes``,
    ``tokens_in_dataset``).
    """
    if isinstance(config, (str, os.PathLike)):
        import yaml

        with open(config) as f:
            values = yaml.safe_load(f) or {}
    else:
        values = dict(config)
    if model is None:
        model_id = values.get("model_name_or_path")
        if not model_id:
            raise ValueError("the config has no model_name_or_path; pass model=")
        model = _model_or_preset(model_id)
    ckpt = values.get("activation_checkpointing", values.get("gradient_checkpointing"))
    optim = values.get("optim", "adamw_torch")
    if optim not in _OPTIMIZER_NAMES:
        raise ValueError(f"optim={optim!r}: the plan knows {sorted(_OPTIMIZER_NAMES)}")
    dtype = values.get("dtype") or values.get("torch_dtype")
    if dtype in (None, "auto"):
        dtype = "bfloat16" if values.get("bf16") else "float16" if values.get("fp16") else "float32"
    selection = selection_value(values.get("sce_num_experts", 0.125), "sce_num_experts")
    kwargs = dict(
        expert_tuning=values.get("expert_tuning", "delta"), lora_rank=int(values.get("expert_lora_rank", 8)),
        dtype=dtype, optimizer=_OPTIMIZER_NAMES[optim],
        batch_size=int(values.get("per_device_train_batch_size", 8)), seq_len=int(values.get("max_length", 1024)),
        gradient_checkpointing=True if ckpt is None else bool(ckpt),
        replay_weights=values.get("replay_weights", "cached"), schedule=values.get("rasa_schedule", "alternate"),
        replay_cache_device=values.get("replay_cache_device", "cpu"),
        device="cpu" if values.get("use_cpu") else "cuda",
        mixed_precision=bool(values.get("bf16") or values.get("fp16")),
    )
    kwargs.update(overrides)
    return estimate_memory(model, selection, **kwargs)
