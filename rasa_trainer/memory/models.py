"""Model resolution: a model, config, local path, cached Hub id or preset name as a model on the meta device."""

from __future__ import annotations

import os

import torch

from ..moe.discovery import unwrap_model

# Published configurations of real models, by name (model type, config values): plans without a download
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


def _resolve_model(source) -> torch.nn.Module:
    """A model (real or on the meta device) for a model, a config, a local path or a cached Hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, torch.nn.Module):
        return unwrap_model(source)
    if isinstance(source, PretrainedConfig):
        return meta_model(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isfile(path):
            if os.path.basename(path) != "config.json":
                import json

                with open(path) as f:
                    data = json.load(f)
                return meta_model(AutoConfig.for_model(**data) if "model_type" in data else _bad_config(path))
            path = os.path.dirname(path) or "."
        if os.path.isdir(path):
            return meta_model(AutoConfig.from_pretrained(path))
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means "not available offline"
            raise ValueError(
                f"cannot load the config of {source!r} offline: it is neither a local directory or config.json nor a "
                f"model id in the local Hugging Face cache ({type(err).__name__}: {err}). Download it first "
                f"(`hf download {source} config.json`), pass a local config path or a transformers config object, "
                f"or use a preset of examples/estimate_memory.py."
            ) from None
        return meta_model(config)
    raise TypeError(
        f"estimate_memory needs a model, a transformers config, a local config path or a model id; got "
        f"{type(source).__name__}"
    )


def _bad_config(path: str):
    raise ValueError(f"{path} has no 'model_type'; pass a transformers config.json")


SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "moe_intermediate_size", "vocab_size", "num_experts", "n_routed_experts",
               "num_local_experts", "num_experts_per_tok")
"""Config values that are sizes: when present (and not None) each must be a whole number >= 1."""
_EXPERT_COUNT_FIELDS = ("num_experts", "n_routed_experts", "num_local_experts")


def check_config_sizes(values, where: str = "the config") -> None:
    """Refuse size values a model cannot have (a negative or zero layer count, a fractional expert count, more experts
    per token than experts) with a message naming the value, before any model is built from them.

    Args:
        values: a ``transformers`` config or a dict of config values.
        where: how the values are named in the message (e.g. ``"--config_kwargs"``).

    Raises:
        ValueError: naming every bad value.
    """
    if not isinstance(values, dict):
        text = values.get_text_config() if hasattr(values, "get_text_config") else values
        values = {name: getattr(text, name) for name in SIZE_FIELDS if hasattr(text, name)}
    problems = []
    for name in SIZE_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or value < 1:
            problems.append(f"{name}={value!r} (a size: give a whole number >= 1)")
    experts = next((values[n] for n in _EXPERT_COUNT_FIELDS if isinstance(values.get(n), int)), None)
    top_k = values.get("num_experts_per_tok")
    if not problems and isinstance(experts, int) and isinstance(top_k, int) and top_k > experts:
        problems.append(f"num_experts_per_tok={top_k} is more than the {experts} experts of a layer")
    if problems:
        raise ValueError(f"{where}: impossible model values: {'; '.join(problems)}")


def meta_model(config) -> torch.nn.Module:
    """The model of ``config`` on the meta device (shapes and parameter counts only, no memory)."""
    from transformers import AutoModelForCausalLM

    check_config_sizes(config, f"the {type(config).__name__}")
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            raise ValueError(f"{type(config).__name__} has no causal-LM class in transformers: {err}") from None


def _model_or_preset(model_id: str):
    try:
        return _resolve_model(model_id)
    except ValueError:

        name = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
        for preset, (model_type, values) in PRESETS.items():
            if preset.lower() == name:
                from transformers import AutoConfig

                return meta_model(AutoConfig.for_model(model_type, **values))
        raise
