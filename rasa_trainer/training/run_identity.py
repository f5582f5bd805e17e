"""What makes a resumed run the same run: the model's identity (config shapes, a sampled hash of the base weights, the
load dtype, the tokenizer and its chat template), the arguments that shape the result, the data, the selection and
the package version, and the differences between a checkpoint's fingerprint and the current run's. The model's
identity lives in ``rasa_trainer/model_identity.py`` (below the rooms: detection's progress uses it too)."""

from __future__ import annotations

from typing import Any

from ..model_identity import model_differences, model_identity, rows_sha256
from ..utils import plain_value
from .checkpoints import read_fingerprint


# The arguments that shape the trained result; a resumed run must agree on all of them.
FINGERPRINT_ARGS = (
    "rasa_rounds", "rasa_schedule", "router_loss", "expert_learning_rate", "router_learning_rate", "learning_rate",
    "kl_direction", "expert_tuning", "expert_lora_rank", "expert_lora_alpha", "replay_weights", "default_refusal",
    "anchor_column", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed", "data_seed",
    "max_length", "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "num_train_epochs", "completion_only_loss",
    "assistant_only_loss", "bf16", "fp16", "chat_template_kwargs",
)


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
    data = rows_sha256(rows)
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
