"""What makes a resumed run the same run: the model's identity (config shapes, a sampled hash of the base weights, the
load dtype, the tokenizer and its chat template), the arguments that shape the result, the data, the selection and
the package version, and the differences between a checkpoint's fingerprint and the current run's."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..moe.discovery import unwrap_model
from ..utils import plain_value
from .checkpoints import read_fingerprint


# The arguments that shape the trained result; a resumed run must agree on all of them.
FINGERPRINT_ARGS = (
    "rasa_rounds", "rasa_schedule", "router_loss", "expert_learning_rate", "router_learning_rate", "learning_rate",
    "kl_direction", "expert_tuning", "expert_lora_rank", "expert_lora_alpha", "replay_weights", "default_refusal",
    "anchor_column", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed", "data_seed",
    "max_length", "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "num_train_epochs", "completion_only_loss",
    "assistant_only_loss", "bf16", "fp16",
)


# --------------------------------------------------------------------------------------------------------------------
# The model a run trains: config shapes, sampled weights, dtype, tokenizer
# --------------------------------------------------------------------------------------------------------------------

# integer config fields that give the model its shapes (with the model type, what "the same architecture" means here)
_SHAPE_FIELD = re.compile(r"(_size|_dim|_rank|_group|_dense_replace|_sparse_step|_per_tok|_only_layers)$|^(num|n)_|experts")
_SAMPLED_ELEMENTS = 64  # per tensor, at fixed evenly spaced positions
_NOT_BASE_WEIGHTS = (".rasa_repairs.", ".lora_", "modules_to_save.")  # RASA's repairs, a PEFT wrapper's adapters


def model_identity(model, processing_class=None) -> dict[str, Any]:
    """What makes a base model the same model, cheaply: its config's model type and shape fields, a content hash of
    its weights (every tensor's name and shape, plus ``_SAMPLED_ELEMENTS`` elements of every tensor at fixed
    positions, as float32 so that routers upcast to fp32 master weights hash the same), the dtype it was loaded in
    (that of the input embeddings), and the tokenizer (size, vocabulary, special tokens, chat template).

    Taken before training changes the weights: at the start of ``train()``, and by ``rasa-trainer train`` right after
    the model is loaded. ``weights`` is None where the weights are not all on this process (meta-device or ZeRO-3
    partitioned parameters); the comparison then skips them."""
    import torch

    base = unwrap_model(model)
    if hasattr(base, "get_base_model"):  # a PEFT model (rasa_schedule="full" with a peft_config)
        base = base.get_base_model()
    config = base.config
    text = config.get_text_config()
    shapes = {"model_type": config.model_type}
    if getattr(text, "model_type", config.model_type) != config.model_type:
        shapes["text_model_type"] = text.model_type
    for key, value in sorted(text.to_dict().items()):
        plain = isinstance(value, int) and not isinstance(value, bool)
        listed = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if (plain or listed) and _SHAPE_FIELD.search(key):
            shapes[key] = value
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else getattr(base, "dtype", None)
    return {"config": shapes, "dtype": str(dtype).removeprefix("torch."), "weights": _weights_digest(base),
            "tokenizer": _tokenizer_identity(processing_class)}


def _weights_digest(model) -> dict[str, Any] | None:
    import torch

    names, samples, elements = hashlib.sha256(), hashlib.sha256(), 0
    count = 0
    for name, tensor in sorted(model.named_parameters(), key=lambda item: item[0]):
        if any(part in name for part in _NOT_BASE_WEIGHTS):
            continue
        name = name.replace(".base_layer.", ".")
        if tensor.is_meta or (tensor.numel() == 0 and hasattr(tensor, "ds_shape")):
            return None  # not on this process: nothing to compare
        count += 1
        elements += tensor.numel()
        names.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        if tensor.numel() == 0:
            continue
        with torch.no_grad():
            flat = torch.linspace(0, tensor.numel() - 1, min(_SAMPLED_ELEMENTS, tensor.numel()), dtype=torch.float64)
            index = torch.unravel_index(flat.round().long().to(tensor.device), tuple(tensor.shape))
            sample = tensor.data[index].float().cpu()  # .data: a plain tensor also for quantized parameter types
        samples.update(sample.numpy().tobytes())
    return {"num_tensors": count, "num_elements": elements, "names_and_shapes_sha256": names.hexdigest(),
            "sample_sha256": samples.hexdigest()}


def _tokenizer_identity(processing_class) -> dict[str, Any] | None:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None:
        return None
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        template = getattr(processing_class, "chat_template", None)
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        vocab = {}
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    return {
        "size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "special_tokens": {k: v if isinstance(v, str) else sorted(map(str, v)) if isinstance(v, list) else str(v)
                           for k, v in sorted(special.items())},
        "chat_template_sha256": None if template is None else
        hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest(),
    }


def model_differences(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`model_identity` records (``saved`` from a checkpoint)."""
    if not saved:
        return ["model: the checkpoint records no model identity (written by an older rasa-trainer), so it cannot be "
                "checked that it was trained from this model"]
    diffs = []
    old, new = saved.get("config", {}), current["config"]
    for key in sorted(set(old) | set(new), key=lambda k: (k != "model_type", k)):
        if old.get(key) != new.get(key):
            label = "model type" if key == "model_type" else f"model config {key}"
            diffs.append(f"{label}: checkpoint {old.get(key)!r}, now {new.get(key)!r}")
    if saved.get("dtype") != current["dtype"]:
        diffs.append(f"model dtype: checkpoint {saved.get('dtype')}, now {current['dtype']} (load the model in "
                     f"{saved.get('dtype')}, as the run that wrote the checkpoint did)")
    elif saved.get("weights") and current["weights"] and saved["weights"] != current["weights"]:
        shapes_differ = saved["weights"]["names_and_shapes_sha256"] != current["weights"]["names_and_shapes_sha256"]
        diffs.append("model weights: " + (
            f"other tensors or shapes (checkpoint {saved['weights']['num_tensors']} tensors, now "
            f"{current['weights']['num_tensors']})" if shapes_differ else
            "same tensors and shapes, different content: the checkpoint was trained from another base model"))
    old_tok, new_tok = saved.get("tokenizer"), current.get("tokenizer")
    if (old_tok is None) != (new_tok is None):
        diffs.append(f"tokenizer: checkpoint {'none' if old_tok is None else 'one'}, now "
                     f"{'none' if new_tok is None else 'one'}")
    elif old_tok is not None:
        if old_tok.get("size") != new_tok["size"]:
            diffs.append(f"tokenizer size: checkpoint {old_tok.get('size')} tokens, now {new_tok['size']}")
        elif old_tok.get("vocab_sha256") != new_tok["vocab_sha256"]:
            diffs.append("tokenizer vocabulary: same size, different tokens")
        if old_tok.get("special_tokens") != new_tok["special_tokens"]:
            diffs.append(f"tokenizer special tokens: checkpoint {old_tok.get('special_tokens')}, now "
                         f"{new_tok['special_tokens']}")
        if old_tok.get("chat_template_sha256") != new_tok["chat_template_sha256"]:
            diffs.append("chat template: " + ("the checkpoint's run had none" if old_tok.get("chat_template_sha256")
                                              is None else "none now" if new_tok["chat_template_sha256"] is None else
                                              "differs from the one the checkpoint was trained with"))
    return diffs


def checkpoint_model_differences(folder: str, model, processing_class=None) -> list[str]:
    """How ``model`` (freshly loaded, not yet trained) and its tokenizer differ from the base model the checkpoint
    ``folder`` was trained from; empty when they are the same."""
    return model_differences(read_fingerprint(folder).get("model"), model_identity(model, processing_class))


def run_fingerprint(args, pairs, selection, retain: list[dict] | None = None,
                    model: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (``retain``: the retain rows as given,
    when the run uses them; ``model``: the base model's :func:`model_identity`)."""
    from .. import __version__

    rows = pairs if isinstance(pairs, list) else pairs.to_list()
    data = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    extra = {}
    if retain is not None:
        from .retain import retain_sha256

        extra["retain"] = {"sha256": retain_sha256(retain), "num_rows": len(retain),
                           "ratio": plain_value(getattr(args, "retain_ratio", None)),
                           "loss_weight": plain_value(getattr(args, "retain_loss_weight", None)),
                           "max_new_tokens": plain_value(getattr(args, "retain_max_new_tokens", None))}
    return {**extra,
        "args": {name: plain_value(getattr(args, name, None)) for name in FINGERPRINT_ARGS},
        "dataset_sha256": data,
        "num_pairs": len(rows),
        "selection": {str(k): v for k, v in selection.by_moe_layer().items()} if selection is not None else None,
        "rasa_trainer_version": __version__,
        "model": model,
    }


FINGERPRINT_PARTS = ("model", "args", "data", "retain", "selection", "version")


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any],
                            parts: tuple[str, ...] = FINGERPRINT_PARTS) -> list[str]:
    """Human-readable differences between two run fingerprints, in the ``parts`` given (default all): ``model``
    (:func:`model_differences`), ``args``, ``data`` (the pairs), ``retain``, ``selection``, ``version``."""
    diffs = model_differences(saved.get("model"), current["model"]) if "model" in parts else []
    if "args" in parts:
        diffs += [
            f"{name}: checkpoint {saved.get('args', {}).get(name)!r}, now {value!r}"
            for name, value in current["args"].items() if saved.get("args", {}).get(name) != value
        ]
    if "data" in parts and saved.get("dataset_sha256") != current["dataset_sha256"]:
        diffs.append(f"training data: checkpoint {saved.get('num_pairs')} pairs, now {current['num_pairs']} pairs, "
                     f"different content")
    if "retain" in parts and saved.get("retain") != current.get("retain"):
        def described(value):
            return "none" if value is None else (f"{value['num_rows']} rows at retain_ratio={value['ratio']}, "
                                                 f"retain_loss_weight={value.get('loss_weight')}")

        diffs.append(f"retain data: checkpoint {described(saved.get('retain'))}, now "
                     f"{described(current.get('retain'))}" + (", different content" if saved.get("retain") and
                     current.get("retain") and saved["retain"]["sha256"] != current["retain"]["sha256"] else ""))
    for part, key in (("selection", "selection"), ("version", "rasa_trainer_version")):
        if part in parts and saved.get(key) != current[key]:
            diffs.append(f"{key}: checkpoint {saved.get(key)}, now {current[key]}")
    return diffs


def run_differences(folder: str, args, pairs, selection=None, *,
                    parts: tuple[str, ...] = ("args", "data", "selection", "version")) -> list[str]:
    """How a run of ``args`` on ``pairs`` (and ``selection``) differs from the run that wrote the checkpoint
    ``folder``, in ``parts`` of the fingerprint: a check that needs no model, for refusing a resume early."""
    return fingerprint_differences(read_fingerprint(folder), run_fingerprint(args, pairs, selection), parts)
