"""A checkpoint folder of a RASA run: the files RASA writes beside Trainer's, the manifest written last (every file's
size, the SHA-256 of the small ones, the run fingerprint) that makes a folder complete, and rotation that never
deletes the newest complete checkpoint."""

from __future__ import annotations

import logging
import contextlib
import hashlib
import json
import os
import re
import shutil
from typing import Any
from ..utils import atomic_write_json

logger = logging.getLogger(__name__)


SELECTION_FILE = "safety_critical_experts.json"
TRAINABLE_FILE = "rasa_trainable.safetensors"
ROUTING_CACHE_FILE = "rasa_routing_cache.safetensors"
INITIAL_ROUTING_FILE = "rasa_initial_routing.safetensors"
STATE_FILE = "rasa_state.json"
MANIFEST_FILE = "rasa_checkpoint.json"
TRAINING_ARGS_FILE = "training_args.json"
ADAPTER_DIR = "adapter"
_HASHED_UP_TO = 64 * 2**20  # files up to this size are hashed in the manifest; larger ones are checked by size
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# one file per data-parallel process in a ZeRO checkpoint (bf16_ prefixed under ZeRO-1/2 in bf16)
_ZERO_OPTIM_STATE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def _file_entry(path: str) -> dict[str, Any]:
    # opened without following a link: a link planted in a checkpoint is an error here, never read through
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        entry: dict[str, Any] = {"size": size}
        if size <= _HASHED_UP_TO:
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
            entry["sha256"] = digest.hexdigest()
    return entry


def write_manifest(folder: str, fingerprint: dict[str, Any], global_step: int) -> None:
    """List every file of a finished checkpoint, then write the manifest atomically: its presence marks the
    checkpoint complete."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST_FILE and not name.startswith("."):
                files[rel] = _file_entry(path)
    atomic_write_json({"format": 1, "global_step": global_step, "fingerprint": fingerprint, "files": files},
                      os.path.join(folder, MANIFEST_FILE))


def checkpoint_problem(folder: str) -> str | None:
    """Why ``folder`` is not a complete RASA checkpoint, or None when it is."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return f"it has no {MANIFEST_FILE} (the save was interrupted, or it was not written by RASATrainer)"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        return f"its {MANIFEST_FILE} cannot be read ({err})"
    for rel, entry in manifest.get("files", {}).items():
        file = os.path.join(folder, rel)
        if os.path.islink(file):
            return f"{rel} is a symbolic link (a checkpoint holds none)"
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != entry["size"]:
            return f"{rel} has {os.path.getsize(file)} bytes, the manifest says {entry['size']} (truncated?)"
        if "sha256" in entry and _file_entry(file).get("sha256") != entry["sha256"]:
            return f"{rel} does not match its checksum in the manifest (corrupt)"
    return None


def read_fingerprint(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
        return json.load(f)["fingerprint"]


def engine_problem(folder: str, deepspeed: bool, world_size: int) -> str | None:
    """Why a run under DeepSpeed (or without it) with ``world_size`` processes cannot resume ``folder`` exactly, or
    None. Under DeepSpeed, Trainer restores the weights and the optimiser from the engine's own state
    (``global_step*/``, one partition per process) and never reads ``optimizer.pt``; without it, Trainer reads only
    ``optimizer.pt`` and would start the moments afresh from a DeepSpeed checkpoint, without a word."""
    state = _deepspeed_state(folder)
    if deepspeed and state is None:
        return ("it holds no DeepSpeed state (global_step*/): it was written without DeepSpeed (or with "
                "save_only_model), and under DeepSpeed the weights and the optimiser resume from that state only. "
                "Resume it without DeepSpeed, as it was written, or start over")
    if not deepspeed and state is not None:
        return ("it was written under DeepSpeed: its optimiser state is in "
                f"{os.path.basename(state)}/, partitioned per process, which a run without DeepSpeed cannot read "
                "(the moments would start afresh). Resume it under the same DeepSpeed config and number of processes")
    if state is not None:
        ranks = {m.group(1) for name in os.listdir(state) if (m := _ZERO_OPTIM_STATE.match(name))}
        if ranks and len(ranks) != world_size:
            return (f"its DeepSpeed state was written by {len(ranks)} processes and this run has {world_size}: "
                    "DeepSpeed cannot re-partition ZeRO optimiser states. Resume with "
                    f"{len(ranks)} processes, or start over")
    return None


def _deepspeed_state(folder: str) -> str | None:
    """The DeepSpeed checkpoint a resume would load (the tag in ``latest``, as ``engine.load_checkpoint`` reads it,
    else the only ``global_step*`` folder), or None when the folder holds none."""
    tags = sorted(name for name in os.listdir(folder)
                  if name.startswith("global_step") and os.path.isdir(os.path.join(folder, name)))
    if not tags:
        return None
    with contextlib.suppress(OSError):
        with open(os.path.join(folder, "latest"), encoding="utf-8") as f:
            latest = f.read().strip()
        if latest in tags:
            return os.path.join(folder, latest)
    return os.path.join(folder, tags[-1])


def checkpoint_folders(run_dir: str) -> list[str]:
    """``checkpoint-N`` folders of a run, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(run_dir, name) for _, name in sorted(found)
            if os.path.isdir(os.path.join(run_dir, name)) and not os.path.islink(os.path.join(run_dir, name))]


def rotate(run_dir: str, limit: int | None, protected: set[str]) -> None:
    """Keep the newest ``limit`` complete checkpoints (and the protected ones). A folder loses its manifest before it
    is deleted, so a deletion cut short leaves an incomplete folder, never a wrong complete one."""
    if not limit or limit <= 0:
        return
    complete = [c for c in checkpoint_folders(run_dir) if checkpoint_problem(c) is None]
    keep = {os.path.normpath(p) for p in complete[-limit:]} | {os.path.normpath(p) for p in protected if p}
    for folder in checkpoint_folders(run_dir):  # incomplete folders (left by a crash) can never be resumed: they go
        if os.path.normpath(folder) in keep:
            continue
        logger.info("Deleting older checkpoint %s due to save_total_limit=%d", folder, limit)
        _delete_checkpoint(folder)


def _delete_checkpoint(folder: str) -> None:
    """Remove a checkpoint folder, its manifest first; a link is removed itself, never what it points to."""
    if os.path.islink(folder):
        os.unlink(folder)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, MANIFEST_FILE))
    shutil.rmtree(folder, ignore_errors=True)
