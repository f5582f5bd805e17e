"""How RASATrainer writes and reads what it trains.

- **One save path.** Every route that writes model weights (``save_model``, periodic checkpoints, ``push_to_hub``,
  hub checkpoint pushes) goes through Trainer's ``_save``, which here writes the standard checkpoint with the repairs
  merged (plain ``AutoModelForCausalLM.from_pretrained``, per-expert keys as transformers writes them), routers in the
  precision they trained in, and in LoRA mode a PEFT adapter in ``adapter/``. ``load_best_model_at_end`` restores the
  trained parameters of the best checkpoint exactly.
- **A checkpoint is complete or it is not a checkpoint.** RASA's resume state is written with the weights, before
  Trainer's optimiser and ``trainer_state.json``; a manifest (``rasa_checkpoint.json``: every file's size, the
  SHA-256 of the small ones, the run fingerprint) is written last, atomically. Rotation runs after the manifest and
  removes a folder's manifest before deleting it, so the newest complete checkpoint is never deleted and a
  half-deleted folder is recognisably incomplete.
- **Resume refuses what it cannot honour.** ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint;
  a checkpoint whose run fingerprint (the arguments that shape the result, the training data, the selection, the
  package version) differs from the current run's is refused with the differences listed, unless
  ``ignore_checkpoint_mismatch=True``. The fingerprint holds the model's identity too (:func:`model_identity`: its
  config's type and shapes, a sampled content hash of the base weights taken before training changes them, the load
  dtype, the tokenizer and its chat template), so a checkpoint is never resumed on another model.
- **One run per output folder.** ``train()`` holds ``output_dir/.rasa-run.lock`` (process 0; pid, host, start time)
  for the run: a second run on the folder is refused naming the holder, a lock left by a dead process on this host
  is taken over with a warning. A new run in a folder that holds ``checkpoint-*`` folders is refused (they belong to
  another run: rotation would delete them, a later resume would pick them) unless ``overwrite_output_dir=True``,
  which removes them with a log line.
- **Nothing we write opens anything to others.** A save refuses a folder that holds symbolic links (transformers'
  writers would write through them), and the permission fix of transformers' private temporary files never follows
  a link.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import sys
import weakref
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..moe.discovery import unwrap_model
from ..repairs.layer import merged_for_saving, repair_modules, unload_repairs
from ..moe.replay_cache import RoutingCache
from ..utils import _umask, atomic_save_safetensors, atomic_write_json, plain_value

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
# Manifest and fingerprint
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# The output folder: no links written through, no other run's checkpoints touched, one run at a time
# --------------------------------------------------------------------------------------------------------------------

LOCK_FILE = ".rasa-run.lock"


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked: another run holds it, it holds another run's checkpoints, or it
    holds symbolic links a save would write through. The message says what to change."""


def links_in(folder: str) -> list[str]:
    """Symbolic links a save into ``folder`` would write through, as paths relative to it (never followed): the
    links among its files, a link named ``adapter`` and any link inside ``adapter/`` (the subfolder RASATrainer
    writes), and ``"."`` when ``folder`` itself is a link. Links to other folders are left alone: nothing writes into
    them."""
    if os.path.islink(folder):
        return ["."]
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.scandir(folder):
        if entry.is_symlink():
            if entry.name == ADAPTER_DIR or not os.path.isdir(entry.path):
                found.append(entry.name)
        elif entry.name == ADAPTER_DIR and entry.is_dir(follow_symlinks=False):
            for root, dirs, files in os.walk(entry.path):  # os.walk does not descend into linked folders
                found += [os.path.relpath(os.path.join(root, name), folder) for name in dirs + files
                          if os.path.islink(os.path.join(root, name))]
    return sorted(found)


def refuse_links(folder: str, *, allow_self: bool = True) -> None:
    """Raise :class:`OutputFolderError` when ``folder`` holds symbolic links (or is one, unless ``allow_self``):
    transformers' writers open files by name, so a planted ``config.json -> ~/.ssh/id_rsa`` would be overwritten."""
    links = [rel for rel in links_in(folder) if not (allow_self and rel == ".")]
    if not links:
        return
    shown = ", ".join(f"{rel} -> {os.readlink(folder if rel == '.' else os.path.join(folder, rel))}"
                      for rel in links[:5])
    what = "is a symbolic link" if links == ["."] else "holds symbolic links"
    raise OutputFolderError(
        f"{folder} {what} ({shown}{', ...' if len(links) > 5 else ''}); RASATrainer never writes through a link in a "
        f"folder it saves into (the write would land in, or open up, the file it points to). Remove the links, or "
        f"save to another folder"
    )


def earlier_checkpoints(output_dir: str, overwrite: bool) -> list[str]:
    """Before a new (not resumed) run: the ``checkpoint-*`` entries ``output_dir`` already holds. They belong to
    another run, which this one would rotate or overwrite and whose checkpoints a later resume would pick, so they
    are refused with :class:`OutputFolderError` unless ``overwrite`` (``overwrite_output_dir``); then they are
    returned, for :func:`remove_earlier_checkpoints`."""
    if not os.path.isdir(output_dir):
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name)))
    if not found or overwrite:
        return [os.path.join(output_dir, name) for _, name in found]
    names = [name for _, name in found]
    raise OutputFolderError(
        f"output_dir {output_dir} already holds checkpoints of another run ({', '.join(names[:4])}"
        f"{', ...' if len(names) > 4 else ''}); a new run there would rotate or overwrite them, and a later resume "
        f"would pick theirs. Pass overwrite_output_dir=True (--overwrite_output_dir on the command line) to replace "
        f"them, use a new output_dir, or resume that run (resume_from_checkpoint=True, --resume_from_checkpoint true)"
    )


def remove_earlier_checkpoints(output_dir: str, folders: list[str]) -> None:
    if not folders:
        return
    logger.warning("RASA: overwrite_output_dir=True: removing %d checkpoint folders of an earlier run in %s: %s",
                   len(folders), output_dir, ", ".join(os.path.basename(f) for f in folders))
    for folder in folders:
        if os.path.isdir(folder) or os.path.islink(folder):
            _delete_checkpoint(folder)
        else:
            os.remove(folder)


class _Held:
    """The lock file this process holds for an output folder, and how many holds share it."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd, self.holders = path, fd, 0


_HELD: dict[str, _Held] = {}  # lock path -> lock held by this process


class RunLock:
    """A hold on an output folder's run lock (see :func:`hold_run_lock`); ``release()`` is idempotent and runs when
    the hold is garbage-collected or the interpreter exits."""

    def __init__(self, path: str):
        self.path = path
        _HELD[path].holders += 1
        self._finalizer = weakref.finalize(self, _drop_hold, path)

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        self._finalizer()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _drop_hold(path: str) -> None:
    held = _HELD.get(path)
    if held is None:
        return
    held.holders -= 1
    if held.holders > 0:
        return
    del _HELD[path]
    try:
        with contextlib.suppress(OSError):  # remove the file only while it is still the one this process locked
            if os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(held.fd)):
                os.unlink(path)
    finally:
        os.close(held.fd)


def _lock_record(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe_holder(record: dict[str, Any]) -> str:
    if not record:
        return "a run that wrote no details"
    command = f": {record['command']}" if record.get("command") else ""
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}{command}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    except (TypeError, ValueError):
        return False
    return True


def hold_run_lock(output_dir: str) -> RunLock:
    """Hold ``output_dir/.rasa-run.lock`` for a run: one run per output folder.

    The file is created without following links and locked with ``flock`` (released by the kernel when the process
    dies, however it dies); it records the holder's pid, host, start time and command. Another process holding it is
    refused with :class:`OutputFolderError` naming the holder; a lock file left by a process that is gone is taken
    over with a warning (one of another host is refused, since this host cannot tell whether that run still goes).
    Holds within one process share the lock (``rasa-trainer train`` holds it for the whole command and the trainer
    inside joins), and the file is removed when the last hold is released."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.path.realpath(output_dir), LOCK_FILE)
    if path in _HELD:
        return RunLock(path)
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise OutputFolderError(f"{path} is a symbolic link; remove it (RASATrainer creates its run lock "
                                        f"there and never writes through a link)") from None
            raise
        locked = _flock(fd)
        if locked is False:
            record = _lock_record(fd)
            os.close(fd)
            raise OutputFolderError(
                f"output_dir {output_dir} is in use by another run ({_describe_holder(record)}). One run per output "
                f"folder: wait for that run to finish, or use another output_dir")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file between our open and our lock: try the new one
            os.close(fd)
            continue
        record = _lock_record(fd)
        if record and record.get("pid") != pid:
            stale = locked is True or not _pid_alive(record.get("pid"))
            if record.get("host") != host or not stale:
                os.close(fd)
                raise OutputFolderError(
                    f"output_dir {output_dir} is locked by another run ({_describe_holder(record)}), which this host "
                    f"cannot check. One run per output folder: if that run has ended, delete {path}; otherwise wait "
                    f"for it, or use another output_dir")
            logger.warning("RASA: taking over the lock of output_dir %s from a run that is no longer running (%s)",
                           output_dir, _describe_holder(record))
        mine = {"pid": pid, "host": host, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode("utf-8"), 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        _HELD[path] = _Held(path, fd)
        return RunLock(path)
    raise OutputFolderError(f"could not take the run lock {path}: it keeps being replaced by another process")


def run_lock_holder(output_dir: str) -> str | None:
    """Who holds ``output_dir``'s run lock in another process (a description), or None: a check that takes nothing,
    for refusing early; :func:`hold_run_lock` is what holds the folder."""
    path = os.path.join(os.path.realpath(output_dir), LOCK_FILE)
    if path in _HELD or not os.path.lexists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # a link or unreadable: hold_run_lock says what is wrong
    try:
        record = _lock_record(fd)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except (ImportError, OSError) as err:
            if isinstance(err, BlockingIOError) or getattr(err, "errno", None) in (errno.EAGAIN, errno.EACCES):
                return _describe_holder(record)
            live = record.get("host") == socket.gethostname() and _pid_alive(record.get("pid"))
            return _describe_holder(record) if live and record.get("pid") != os.getpid() else None
        return None
    finally:
        os.close(fd)  # (closing gives back the shared lock taken to look)


def _flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no locks (the pid decides)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL: no flock here
    return True


# --------------------------------------------------------------------------------------------------------------------
# The trainer side
# --------------------------------------------------------------------------------------------------------------------


class CheckpointingMixin:
    """RASATrainer's saving, checkpointing and resuming (mixed in before ``SFTTrainer``)."""

    _pending_checkpoint: str | None = None
    _merged_repairs: list | None = None
    _fingerprint_cache: dict[str, Any] | None = None
    _base_identity: dict[str, Any] | None = None  # model_identity() of the model as train() began
    _run_lock: RunLock | None = None

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        # the output folder's lock is taken where a run begins (_resolve_resume_checkpoint) and given back here, also
        # when training stops with an error
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self._release_run_lock()

    def _hold_run_lock(self) -> None:
        """Process 0 holds ``output_dir/.rasa-run.lock`` for the run (other processes never refuse themselves)."""
        if (self._run_lock is not None and self._run_lock.held) or not self.is_world_process_zero():
            return
        self._run_lock = hold_run_lock(self.args.output_dir)

    def _release_run_lock(self) -> None:
        lock, self._run_lock = self._run_lock, None
        if lock is not None:
            lock.release()

    # ------------------------------------------------------------------------------------------ the one save path
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        from transformers.trainer import _is_peft_model

        if _is_peft_model(self.model):  # only with rasa_schedule="full" and a peft_config: PEFT's own adapter save
            if self.args.should_save:
                refuse_links(output_dir)
            super()._save(output_dir, state_dict)
            self._after_weights(output_dir)
            return
        should_save = self.args.should_save
        if not should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if should_save:
            refuse_links(output_dir)  # before anything is written: transformers' writers follow links
        model = unwrap_model(self.model)
        if should_save:
            os.makedirs(output_dir, exist_ok=True)
            logger.info("Saving the merged RASA checkpoint to %s", output_dir)
        # the repairs merged in place for the write and the original slices restored after it: a mid-training save
        # no longer clones every repaired layer's fused experts (benchmarks/bench_save_peak.py)
        with self._user_router_logits_setting(), merged_for_saving(model, state_dict) as merged:
            model.save_pretrained(output_dir, state_dict=merged, is_main_process=should_save)
        if should_save:
            _respect_umask(output_dir)
            self._after_weights(output_dir, state_dict)

    def _after_weights(self, output_dir: str, state_dict: dict | None = None) -> None:
        """Everything beside the weights: tokenizer, arguments (JSON), selection, adapter, card, resume state."""
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        atomic_write_json(json.loads(self.args.to_json_string()), os.path.join(output_dir, TRAINING_ARGS_FILE))
        if self.selection is not None:
            atomic_write_json(self.selection.to_dict(), os.path.join(output_dir, SELECTION_FILE))
        pairs = self._merged_repairs if self._merged_repairs is not None else repair_modules(unwrap_model(self.model))
        if self.args.expert_tuning == "lora" and pairs:
            from ..repairs.adapter import save_peft_adapter

            save_peft_adapter(unwrap_model(self.model), os.path.join(output_dir, ADAPTER_DIR), state=state_dict,
                              routers="routers" in self._groups, repairs=pairs)
        self.create_model_card(model_name=os.path.basename(os.path.abspath(output_dir)), output_dir=output_dir)
        if self._pending_checkpoint is not None and os.path.abspath(output_dir) == os.path.abspath(self._pending_checkpoint):
            self._save_rasa_state(output_dir)

    @contextlib.contextmanager
    def _user_router_logits_setting(self):
        """The saved config carries the user's ``output_router_logits``, not the value training switched off."""
        text_config = unwrap_model(self.model).config.get_text_config()
        if not hasattr(text_config, "output_router_logits"):
            yield
            return
        during = text_config.output_router_logits
        text_config.output_router_logits = self._router_logits_setting
        try:
            yield
        finally:
            text_config.output_router_logits = during

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            refuse_links(folder, allow_self=False)  # Trainer writes optimizer.pt, trainer_state.json, ... by name too
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, MANIFEST_FILE))  # re-saving a step: incomplete until rewritten
        limit = self.args.save_total_limit
        self._pending_checkpoint = folder
        self.args.save_total_limit = None  # rotation waits until this checkpoint is complete (below)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
            self._pending_checkpoint = None
        if not self.args.should_save:
            return
        write_manifest(folder, self._run_fingerprint(), self.state.global_step)
        rotate(run_dir, limit, {folder, self.state.best_model_checkpoint})

    def _save_rasa_state(self, folder: str) -> None:
        """Everything a resumed run needs that the Trainer's own checkpoint does not restore exactly."""
        named = {id(p): n for n, p in unwrap_model(self.model).named_parameters()}
        trainable = {named[id(p)]: p for params in self._groups.values() for p in params}
        atomic_save_safetensors(trainable, os.path.join(folder, TRAINABLE_FILE))
        if self._routing_cache is not None and self._phase == "expert":
            self._routing_cache.save(os.path.join(folder, ROUTING_CACHE_FILE), {"epoch": str(self._phase_epoch)})
        if self._initial_routing is not None:
            self._initial_routing.save(os.path.join(folder, INITIAL_ROUTING_FILE))
        atomic_write_json({"phase": self._phase, "epoch": self._phase_epoch, "schedule": self.args.rasa_schedule},
                          os.path.join(folder, STATE_FILE))

    def _run_fingerprint(self) -> dict[str, Any]:
        if self._fingerprint_cache is None:
            self._fingerprint_cache = run_fingerprint(self.args, self._pairs, self.selection,
                                                      retain=getattr(self, "_retain", None), model=self._base_model())
        return self._fingerprint_cache

    def _base_model(self) -> dict[str, Any]:
        """The identity of the model this run started from (taken once, before training changes any weight)."""
        if self._base_identity is None:
            self._base_identity = model_identity(self.model, self.processing_class)
        return self._base_identity

    # ------------------------------------------------------------------------------------------ resuming
    def _resolve_resume_checkpoint(self, resume_from_checkpoint):
        """Where a run begins, before any work: hold the output folder's lock, record the base model's identity, then
        ``True`` -> the newest complete checkpoint of ``output_dir``, a path -> itself once checked complete and
        trained from this model; no resume -> a folder without another run's checkpoints (or, with
        ``overwrite_output_dir``, with them removed)."""
        self._hold_run_lock()
        try:
            self._base_model()
            folder = self._resume_folder(resume_from_checkpoint)
            if folder is None:
                old = earlier_checkpoints(self.args.output_dir, getattr(self.args, "overwrite_output_dir", False))
                if self.is_world_process_zero():
                    remove_earlier_checkpoints(self.args.output_dir, old)
            elif not getattr(self.args, "ignore_checkpoint_mismatch", False):  # (that flag warns in _check_fingerprint)
                # what is known before detection and retain generation; all of it again when the checkpoint loads
                self._check_fingerprint(folder, ("model", "args", "data", "version"))
        except BaseException:
            self._release_run_lock()
            raise
        return folder

    def _resume_folder(self, resume_from_checkpoint):
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "false"):
            raise ValueError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} is a string; pass the boolean True (resume the "
                f"latest checkpoint) or a checkpoint folder"
            )
        if resume_from_checkpoint is True:
            return self._latest_complete_checkpoint()
        folder = str(resume_from_checkpoint)
        if not os.path.isdir(folder):
            raise ValueError(f"resume_from_checkpoint={folder!r}: no such folder")
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise ValueError(f"cannot resume from {folder}: {problem}. Resume from another checkpoint, or start over")
        return folder

    def _latest_complete_checkpoint(self) -> str:
        folders = checkpoint_folders(self.args.output_dir)
        for folder in reversed(folders):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            logger.warning("RASA: skipping incomplete checkpoint %s: %s", folder, problem)
        raise ValueError(
            f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete RASA checkpoint "
            f"({len(folders)} incomplete). Start without resume_from_checkpoint, or point it at a checkpoint folder"
        )

    def _check_fingerprint(self, folder: str, parts: tuple[str, ...] = FINGERPRINT_PARTS) -> None:
        """Refuse a checkpoint of another run (compared in ``parts`` of the fingerprint, default all)."""
        current = self._run_fingerprint() if "selection" in parts else run_fingerprint(
            self.args, self._pairs, None, model=self._base_model())  # before the selection is known
        differences = fingerprint_differences(read_fingerprint(folder), current, parts)
        if not differences:
            return
        listed = "; ".join(differences)
        if getattr(self.args, "ignore_checkpoint_mismatch", False):
            logger.warning("RASA: resuming from %s although it belongs to another run (%s)", folder, listed)
            return
        raise ValueError(
            f"the checkpoint {folder} belongs to another run: {listed}. Resume with the same model (weights, dtype, "
            f"tokenizer and chat template), arguments, data and selection, use another output_dir, or set "
            f"ignore_checkpoint_mismatch=True to resume anyway"
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Trainer's own weight loading is skipped on purpose: the checkpoint's weights are merged (base + repairs), so
        # loading them under the live repairs would apply the repairs twice, and transformers cannot map the
        # per-expert keys back onto fused tensors anyway (huggingface/transformers#48805). Everything training
        # changed is restored exactly from RASA's own file.
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem is not None:
            raise ValueError(f"cannot resume from {resume_from_checkpoint}: {problem}")
        self._check_fingerprint(resume_from_checkpoint)
        self._restore_trainable(resume_from_checkpoint, model)
        cache_path = os.path.join(resume_from_checkpoint, ROUTING_CACHE_FILE)
        if os.path.isfile(cache_path):
            with safe_open(cache_path, "pt") as f:
                epoch = int(f.metadata()["epoch"])
            self._resumed["routing_cache"] = (epoch, RoutingCache.load(cache_path))
        initial = os.path.join(resume_from_checkpoint, INITIAL_ROUTING_FILE)
        if os.path.isfile(initial):
            self._resumed["initial_routing"] = RoutingCache.load(initial)

    def _restore_trainable(self, folder: str, model=None) -> None:
        path = os.path.join(folder, TRAINABLE_FILE)
        saved = _load_tensors(path)
        params = dict(unwrap_model(model or self.model).named_parameters())
        ids = {id(p) for group in self._groups.values() for p in group}
        missing = sorted(n for n, p in params.items() if id(p) in ids and n not in saved)
        if missing:
            raise ValueError(f"{path} lacks trainable parameters {missing[:5]}; it was written by another run")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
        self._restore_trainable(self.state.best_model_checkpoint)

    # ------------------------------------------------------------------------------------------ end of training
    def _check_not_merged(self) -> None:
        if self._merged_repairs is not None:
            raise RuntimeError(
                "this trainer has finished training and merged its repairs into the model, so another train() would "
                "update parameters the model no longer uses. Build a new RASATrainer on trainer.model to train further"
            )

    def _merge_after_training(self) -> None:
        """After training the repairs are merged into the expert weights and removed (PEFT's merge_and_unload), so
        ``trainer.model`` *is* the published model: ``trainer.model.save_pretrained()`` and evaluation see exactly
        what the checkpoint holds. Routers stay fp32 master weights, as saved. Sharded engines keep the repairs
        attached (their parameters cannot be merged in place); ``save_model`` merges them on the way out."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return
        model = unwrap_model(self.model)
        pairs = repair_modules(model)
        if not pairs:
            return
        unload_repairs(model, merge=True, restore_router_dtype=False)
        # the adapter export still needs LoRA factors; delta repairs are fully merged and can go
        self._merged_repairs = pairs if self.args.expert_tuning == "lora" else []


def _respect_umask(folder: str) -> None:
    """transformers writes weight shards through private temporary files (mode 0600); give them the permissions of
    any new file, as the tokenizer and config files beside them have. Only regular files this user owns are touched,
    each through a descriptor opened without following links, so a planted link never opens up its target."""
    mode = 0o666 & ~_umask()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # a link (ELOOP), gone, or not ours to open: left alone
            continue
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o600:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a complete RASATrainer checkpoint") from None
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ValueError(f"cannot read {path} ({err}); the checkpoint is corrupt: resume from another one") from err
