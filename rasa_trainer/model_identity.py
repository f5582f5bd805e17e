"""What makes a model the same model, cheaply (its config's shapes, a sampled hash of its weights, the load dtype, the
tokenizer and its chat template), the differences between two such records, and the content hash of a list of rows.
Below the rooms that use it: training's run fingerprint (``training/run_identity.py``) and detection's progress
(``detection/progress.py``) both compare runs with it."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from .moe.discovery import unwrap_model


def rows_sha256(rows) -> str:
    """A content hash of a list of rows (a ``datasets.Dataset`` is read as its list of rows): the pairs a run used."""
    rows = rows if isinstance(rows, list) else rows.to_list()
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


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


def model_differences(saved: dict[str, Any] | None, current: dict[str, Any], saved_label: str = "checkpoint"
                      ) -> list[str]:
    """Human-readable differences between two :func:`model_identity` records: ``saved`` from a checkpoint (or from
    what ``saved_label`` names, e.g. a partial detection), ``current`` of the model at hand."""
    was = saved_label  # the record's owner, in every message
    made = "trained" if saved_label == "checkpoint" else "made"
    if not saved:
        return [f"model: the {was} records no model identity (written by an older rasa-trainer), so it cannot be "
                f"checked that it was {made} from this model"]
    diffs = []
    old, new = saved.get("config", {}), current["config"]
    for key in sorted(set(old) | set(new), key=lambda k: (k != "model_type", k)):
        if old.get(key) != new.get(key):
            label = "model type" if key == "model_type" else f"model config {key}"
            diffs.append(f"{label}: {was} {old.get(key)!r}, now {new.get(key)!r}")
    if saved.get("dtype") != current["dtype"]:
        diffs.append(f"model dtype: {was} {saved.get('dtype')}, now {current['dtype']} (load the model in "
                     f"{saved.get('dtype')}, as the run that wrote the {was} did)")
    elif saved.get("weights") and current["weights"] and saved["weights"] != current["weights"]:
        shapes_differ = saved["weights"]["names_and_shapes_sha256"] != current["weights"]["names_and_shapes_sha256"]
        diffs.append("model weights: " + (
            f"other tensors or shapes ({was} {saved['weights']['num_tensors']} tensors, now "
            f"{current['weights']['num_tensors']})" if shapes_differ else
            f"same tensors and shapes, different content: the {was} was {made} from another base model"))
    old_tok, new_tok = saved.get("tokenizer"), current.get("tokenizer")
    if (old_tok is None) != (new_tok is None):
        diffs.append(f"tokenizer: {was} {'none' if old_tok is None else 'one'}, now "
                     f"{'none' if new_tok is None else 'one'}")
    elif old_tok is not None:
        if old_tok.get("size") != new_tok["size"]:
            diffs.append(f"tokenizer size: {was} {old_tok.get('size')} tokens, now {new_tok['size']}")
        elif old_tok.get("vocab_sha256") != new_tok["vocab_sha256"]:
            diffs.append("tokenizer vocabulary: same size, different tokens")
        if old_tok.get("special_tokens") != new_tok["special_tokens"]:
            diffs.append(f"tokenizer special tokens: {was} {old_tok.get('special_tokens')}, now "
                         f"{new_tok['special_tokens']}")
        if old_tok.get("chat_template_sha256") != new_tok["chat_template_sha256"]:
            diffs.append("chat template: " + (f"the {was}'s run had none" if old_tok.get("chat_template_sha256")
                                              is None else "none now" if new_tok["chat_template_sha256"] is None else
                                              f"differs from the one the {was} was {made} with"))
    return diffs
