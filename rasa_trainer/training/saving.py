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

The checkpoint files and manifest live in ``checkpoints.py``, the run's identity in ``run_identity.py``, the output
folder's lock and link checks in ``output_folder.py``; this module is the trainer side that uses them. The private APIs
of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..moe.discovery import unwrap_model
from ..repairs.layer import merged_for_saving, repair_modules, unload_repairs
from ..moe.replay_cache import RoutingCache
from ..utils import _umask, atomic_save_safetensors, atomic_write_json
from .checkpoints import (
    ADAPTER_DIR, INITIAL_ROUTING_FILE, MANIFEST_FILE, ROUTING_CACHE_FILE, SELECTION_FILE, STATE_FILE, TRAINABLE_FILE,
    TRAINING_ARGS_FILE, checkpoint_folders, checkpoint_problem, read_fingerprint, rotate, write_manifest,
)
from .output_folder import RunLock, earlier_checkpoints, hold_run_lock, refuse_links, remove_earlier_checkpoints
from .run_identity import FINGERPRINT_PARTS, fingerprint_differences, model_identity, run_fingerprint

logger = logging.getLogger(__name__)


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

