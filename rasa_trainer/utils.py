"""Small shared helpers: atomic writes of text, JSON, PNG and safetensors (nothing a user produced is lost
half-written, and a symbolic link at the destination is replaced, never written through), and the plain JSON value
of a setting."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

__all__ = ["atomic_save_safetensors", "atomic_write", "atomic_write_json"]


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync, then ``os.replace``, so
    readers never see a half-written file and an interrupted write leaves the old file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            # mkstemp creates 0600; the result gets the permissions of any new file (through the descriptor: the
            # name is never followed, whatever replaced it)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never writes through it
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors to ``path`` atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def plain_value(value: Any) -> Any:
    """A setting as a JSON-plain value: an enum (e.g. ``SchedulerType``) as its value, other non-primitive values as
    their string."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
