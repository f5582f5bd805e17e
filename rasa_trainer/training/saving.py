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
  ``ignore_checkpoint_mismatch=True``.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..moe.discovery import unwrap_model
from ..repairs.layer import merged_state_dict, repair_modules, unload_repairs
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


_FAULT_COUNTS: dict[str, int] = {}


def _fault_point(name: str) -> None:
    """Test-only: die here (SIGKILL, as an OOM killer or a preempted node would) the ``RASA_FAULT_OCCURRENCE``-th time
    (default 1) this point is reached when ``RASA_FAULT_POINT`` names it, so the fault-injection tests can interrupt a
    checkpoint save at every write."""
    if os.environ.get("RASA_FAULT_POINT") != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(os.environ.get("RASA_FAULT_OCCURRENCE", "1")):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------------------
# Manifest and fingerprint
# --------------------------------------------------------------------------------------------------------------------


def _file_entry(path: str) -> dict[str, Any]:
    size = os.path.getsize(path)
    entry: dict[str, Any] = {"size": size}
    if size <= _HASHED_UP_TO:
        with open(path, "rb") as f:
            entry["sha256"] = hashlib.sha256(f.read()).hexdigest()
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


def run_fingerprint(args, pairs, selection, retain: list[dict] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (``retain``: the retain rows as given,
    when the run uses them)."""
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
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two run fingerprints."""
    diffs = [
        f"{name}: checkpoint {saved.get('args', {}).get(name)!r}, now {value!r}"
        for name, value in current["args"].items() if saved.get("args", {}).get(name) != value
    ]
    if saved.get("dataset_sha256") != current["dataset_sha256"]:
        diffs.append(f"training data: checkpoint {saved.get('num_pairs')} pairs, now {current['num_pairs']} pairs, "
                     f"different content")
    if saved.get("retain") != current.get("retain"):
        def described(value):
            return "none" if value is None else (f"{value['num_rows']} rows at retain_ratio={value['ratio']}, "
                                                 f"retain_loss_weight={value.get('loss_weight')}")

        diffs.append(f"retain data: checkpoint {described(saved.get('retain'))}, now "
                     f"{described(current.get('retain'))}" + (", different content" if saved.get("retain") and
                     current.get("retain") and saved["retain"]["sha256"] != current["retain"]["sha256"] else ""))
    for key in ("selection", "rasa_trainer_version"):
        if saved.get(key) != current[key]:
            diffs.append(f"{key}: checkpoint {saved.get(key)}, now {current[key]}")
    return diffs


def checkpoint_folders(run_dir: str) -> list[str]:
    """``checkpoint-N`` folders of a run, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(run_dir, name) for _, name in sorted(found) if os.path.isdir(os.path.join(run_dir, name))]


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
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, MANIFEST_FILE))
        _fault_point("rotation")
        logger.info("Deleting older checkpoint %s due to save_total_limit=%d", folder, limit)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# The trainer side
# --------------------------------------------------------------------------------------------------------------------


class CheckpointingMixin:
    """RASATrainer's saving, checkpointing and resuming (mixed in before ``SFTTrainer``)."""

    _pending_checkpoint: str | None = None
    _merged_repairs: list | None = None
    _fingerprint_cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ the one save path
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        from transformers.trainer import _is_peft_model

        if _is_peft_model(self.model):  # only with rasa_schedule="full" and a peft_config: PEFT's own adapter save
            super()._save(output_dir, state_dict)
            self._after_weights(output_dir)
            return
        should_save = self.args.should_save
        if not should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        model = unwrap_model(self.model)
        merged = merged_state_dict(model, state_dict)
        if should_save:
            os.makedirs(output_dir, exist_ok=True)
            logger.info("Saving the merged RASA checkpoint to %s", output_dir)
        with self._user_router_logits_setting():
            model.save_pretrained(output_dir, state_dict=merged, is_main_process=should_save)
        if should_save:
            _respect_umask(output_dir)
            self._after_weights(output_dir, state_dict)

    def _after_weights(self, output_dir: str, state_dict: dict | None = None) -> None:
        """Everything beside the weights: tokenizer, arguments (JSON), selection, adapter, card, resume state."""
        _fault_point("after_weights")
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
        _fault_point("before_manifest")
        write_manifest(folder, self._run_fingerprint(), self.state.global_step)
        _fault_point("after_manifest")
        rotate(run_dir, limit, {folder, self.state.best_model_checkpoint})

    def _save_rasa_state(self, folder: str) -> None:
        """Everything a resumed run needs that the Trainer's own checkpoint does not restore exactly."""
        named = {id(p): n for n, p in unwrap_model(self.model).named_parameters()}
        trainable = {named[id(p)]: p for params in self._groups.values() for p in params}
        atomic_save_safetensors(trainable, os.path.join(folder, TRAINABLE_FILE))
        _fault_point("after_trainable")
        if self._routing_cache is not None and self._phase == "expert":
            self._routing_cache.save(os.path.join(folder, ROUTING_CACHE_FILE), {"epoch": str(self._phase_epoch)})
            _fault_point("after_routing_cache")
        if self._initial_routing is not None:
            self._initial_routing.save(os.path.join(folder, INITIAL_ROUTING_FILE))
        atomic_write_json({"phase": self._phase, "epoch": self._phase_epoch, "schedule": self.args.rasa_schedule},
                          os.path.join(folder, STATE_FILE))

    def _run_fingerprint(self) -> dict[str, Any]:
        if self._fingerprint_cache is None:
            self._fingerprint_cache = run_fingerprint(self.args, self._pairs, self.selection,
                                                      retain=getattr(self, "_retain", None))
        return self._fingerprint_cache

    # ------------------------------------------------------------------------------------------ resuming
    def _resolve_resume_checkpoint(self, resume_from_checkpoint):
        """``True`` -> the newest complete checkpoint of ``output_dir``; a path -> itself, once checked complete."""
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

    def _check_fingerprint(self, folder: str) -> None:
        differences = fingerprint_differences(read_fingerprint(folder), self._run_fingerprint())
        if not differences:
            return
        listed = "; ".join(differences)
        if getattr(self.args, "ignore_checkpoint_mismatch", False):
            logger.warning("RASA: resuming from %s although it belongs to another run (%s)", folder, listed)
            return
        raise ValueError(
            f"the checkpoint {folder} belongs to another run: {listed}. Resume with the same arguments, data and "
            f"selection, use another output_dir, or set ignore_checkpoint_mismatch=True to resume anyway"
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
    any new file, as the tokenizer and config files beside them have."""
    mask = _umask()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600:
            os.chmod(path, 0o666 & ~mask)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a complete RASATrainer checkpoint") from None
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ValueError(f"cannot read {path} ({err}); the checkpoint is corrupt: resume from another one") from err
