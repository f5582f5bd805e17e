"""What the model-backed judges share: a local checkpoint folder read without loading anything (its `config.json`,
for the judge registry to tell which kind of judge it holds), the device, a pad token for batching, argument checks."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Checkpoint", "read_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint folder and its `config.json` as a dict (nothing imported, nothing loaded)."""

    path: str
    config: Mapping[str, Any] = field(repr=False)

    @property
    def architectures(self) -> list[str]:
        return [str(a) for a in (self.config.get("architectures") or [])]

    @property
    def labels(self) -> dict[int, str]:
        """`id2label` as saved; transformers' default (`LABEL_0`, `LABEL_1`, ...) when the file holds none."""
        id2label = self.config.get("id2label")
        if isinstance(id2label, Mapping) and id2label:
            return {int(i): str(label) for i, label in id2label.items()}
        return {i: f"LABEL_{i}" for i in range(int(self.config.get("num_labels", 2)))}


def read_checkpoint(path: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint in folder `path`, or None when there is no such folder.

    Raises:
        ValueError: `path` is a file, or a folder without a readable `config.json`.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if folder.exists():
            raise ValueError(f"{os.fspath(path)!r} is a file; a model-backed judge is the folder of a checkpoint "
                             "(the folder holding config.json)")
        return None
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{os.fspath(path)!r} has no config.json, so it is not a saved model; give the folder written "
                         "by save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_file} cannot be read as JSON: {err}") from err
    if not isinstance(config, Mapping):
        raise ValueError(f"{config_file} holds a {type(config).__name__}, not a model configuration")
    return Checkpoint(os.path.expanduser(os.fspath(path)), config)


def resolve_device(device: Any) -> Any:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensure_pad_token(tokenizer: Any, model: Any) -> None:
    """Batching needs a pad token; decoder checkpoints (Llama Guard, Llama-based classifiers) often ship none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the judge's tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        # decoder classifiers locate the last real token through config.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id


def batches(n: int, size: int) -> range:
    return range(0, n, size)


def check_positive(**values: int | None) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def greedy_generate(model, tokenizer, texts: list[str], *, max_new_tokens: int, device: Any,
                    add_special_tokens: bool) -> list[str]:
    """A judge model's greedy replies to ``texts`` (already rendered prompts), one padded batch; the end tokens of its
    generation config are preferred to the tokenizer's (Llama 3 lists ``<|eot_id|>`` among several)."""
    import torch
    from transformers import GenerationConfig

    encoding = tokenizer(texts, padding=True, add_special_tokens=add_special_tokens, return_tensors="pt").to(device)
    eos_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos_id)
    with torch.inference_mode():
        output = model.generate(**encoding, generation_config=config)
    return tokenizer.batch_decode(output[:, encoding["input_ids"].shape[1]:], skip_special_tokens=True)
