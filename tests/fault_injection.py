"""Test-only fault injection: kill this process (SIGKILL, as an OOM killer or a preempted node would) at a write point
of a checkpoint save, by wrapping the functions ``rasa_trainer.training.saving`` calls. The library itself holds no
kill code and reads no environment variable for it; a process is armed only by calling :func:`install`, which the
jobs in ``tests/jobs/`` do from their command line (``--fault POINT --occurrence N``).

Write points (in the order a checkpoint save reaches them):

- ``after_weights``: the model weights are written, nothing beside them yet (the start of ``_after_weights``);
- ``after_trainable``: RASA's trainable parameters (``rasa_trainable.safetensors``) are written;
- ``after_routing_cache``: the routing replay cache is written (expert-phase saves only);
- ``before_manifest`` / ``after_manifest``: around the manifest that marks the checkpoint complete;
- ``rotation``: an older checkpoint lost its manifest and its deletion is about to begin.

Detection's points (``rasa_trainer.detection``, resumable through its progress folder):

- ``after_detection_batch``: a generation batch of pairs is judged (mid-shard: that shard's work is lost);
- ``detection_shard_rename``: a shard's statistics are written to their temporary file, about to be renamed into place
  (the temporary file is left behind);
- ``after_detection_shard``: a shard's statistics file is in place.

``occurrence`` counts how often the point is reached in this process (1: the first time).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal

POINTS = ("after_weights", "after_trainable", "after_routing_cache", "before_manifest", "after_manifest", "rotation",
          "after_detection_batch", "detection_shard_rename", "after_detection_shard")
_CHECKPOINT = re.compile(r"checkpoint-\d+$")
_SHARD = re.compile(r"shard-rank\d+-\d+\.safetensors$")


def install(point: str, occurrence: int = 1) -> None:
    """Arm ``point``: the ``occurrence``-th time this process reaches it, it is killed with SIGKILL."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; one of {', '.join(POINTS)}")
    if "detection" in point:  # a detection job need not import the trainer (TRL) for this
        from rasa_trainer.detection import detect, progress
    else:
        from rasa_trainer.moe.replay_cache import RoutingCache
        from rasa_trainer.training import saving
    reached = 0

    def tick() -> None:
        nonlocal reached
        reached += 1
        if reached == occurrence:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, *, before=None, after=None):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if before is not None and before(*args, **kwargs):
                tick()
            result = original(*args, **kwargs)
            if after is not None and after(*args, **kwargs):
                tick()
            return result

        setattr(owner, name, wrapper)

    def path_ends_with(file):
        return lambda *args, **kwargs: str(kwargs.get("path", args[1] if len(args) > 1 else "")).endswith(file)

    def always(*args, **kwargs):
        return True

    if point == "after_weights":
        wrap(saving.CheckpointingMixin, "_after_weights", before=always)
    elif point == "after_trainable":
        # saving's own reference (``from ..utils import atomic_save_safetensors``); args: (tensors, path)
        wrap(saving, "atomic_save_safetensors", after=path_ends_with(saving.TRAINABLE_FILE))
    elif point == "after_routing_cache":
        wrap(RoutingCache, "save", after=path_ends_with(saving.ROUTING_CACHE_FILE))  # args: (self, path, ...)
    elif point == "before_manifest":
        wrap(saving, "write_manifest", before=always)
    elif point == "after_manifest":
        wrap(saving, "write_manifest", after=always)
    elif point == "after_detection_batch":
        wrap(detect, "run_judge", after=always)  # one judge call per generation batch (detect's own reference)
    elif point == "detection_shard_rename":
        # utils.atomic_write renames the finished temporary file over the shard's name: args (tmp, path)
        wrap(os, "replace", before=lambda src, dst, *a, **k: bool(_SHARD.search(os.fspath(dst))))
    elif point == "after_detection_shard":
        wrap(progress, "atomic_save_safetensors", after=path_ends_with(".safetensors"))  # args: (tensors, path)
    elif point == "rotation":
        # the library removes a checkpoint's manifest, then the folder: killed as the folder's removal begins
        wrap(shutil, "rmtree", before=lambda path, *a, **k: bool(_CHECKPOINT.search(os.fspath(path).rstrip("/"))))
