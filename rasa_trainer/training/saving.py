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
- **Under DeepSpeed the engine's own state resumes.** A checkpoint holds the trained parameters in full also under
  ZeRO-3, where each process holds only its partition: they are taken from the full state dict the save gathers for
  the merge. Trainer resumes a DeepSpeed run through the engine (``global_step*/``: the parameters from its fp32
  masters, the optimiser's moments) and skips ``_load_from_checkpoint``, so RASA's part follows in
  ``_load_optimizer_and_scheduler``: the fingerprint, the routing records, and a check (one parameter gathered at a
  time) that the engine restored exactly the parameters of ``rasa_trainable.safetensors``. A resume across engines
  (a DeepSpeed checkpoint without DeepSpeed, whose moments would start afresh, or the reverse) or across process
  counts under DeepSpeed is refused before any work, and so is ZeRO-3 without the gather on save.
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
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..moe.discovery import unwrap_model
from ..repairs.layer import merged_for_saving, repair_modules, unload_repairs
from ..moe.replay_cache import RoutingCache
from ..utils import _umask, atomic_save_safetensors, atomic_write_json
from .checkpoints import (
    ADAPTER_DIR, INITIAL_ROUTING_FILE, MANIFEST_FILE, ROUTING_CACHE_FILE, SELECTION_FILE, STATE_FILE, TRAINABLE_FILE,
    TRAINING_ARGS_FILE, checkpoint_folders, checkpoint_problem, engine_problem, read_fingerprint, rotate,
    write_manifest,
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
            self._after_weights(output_dir, state_dict)
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
            self._save_rasa_state(output_dir, state_dict)

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
        if self.args.world_size > 1:
            # every process writes its own RNG state last, with no barrier after it in Trainer: the manifest, which
            # marks the folder complete, must list them all
            self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        write_manifest(folder, self._run_fingerprint(), self.state.global_step)
        rotate(run_dir, limit, {folder, self.state.best_model_checkpoint})

    def _save_rasa_state(self, folder: str, state_dict: dict | None = None) -> None:
        """Everything a resumed run needs that the Trainer's own checkpoint does not restore exactly. ``state_dict``:
        the full state dict the save gathered (under ZeRO-3 the only place the trained parameters are whole)."""
        trainable = _trainable_state(unwrap_model(self.model), self._groups, state_dict)
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
            self._check_deepspeed_config()
            self._base_model()
            folder = self._resume_folder(resume_from_checkpoint)
            if folder is None:
                old = earlier_checkpoints(self.args.output_dir, getattr(self.args, "overwrite_output_dir", False))
                if self.is_world_process_zero():
                    remove_earlier_checkpoints(self.args.output_dir, old)
                return folder
            problem = engine_problem(folder, bool(self.is_deepspeed_enabled), self.args.world_size)
            if problem is not None:
                raise ValueError(f"cannot resume from {folder}: {problem}")
            if not getattr(self.args, "ignore_checkpoint_mismatch", False):  # (that flag warns in _check_fingerprint)
                # what is known before detection and retain generation; all of it again when the checkpoint loads
                self._check_fingerprint(folder, ("model", "args", "data", "version"))
        except BaseException:
            self._release_run_lock()
            raise
        return folder

    def _check_deepspeed_config(self) -> None:
        """Under ZeRO-3 every save merges the repairs from the full weights DeepSpeed gathers for it, and a checkpoint
        takes the trained parameters from them too; without the gather, accelerate hands Trainer no weights at all."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        problem = _zero3_save_problem(plugin.deepspeed_config) if plugin is not None else None
        if problem is not None:
            raise ValueError(problem)

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
        self._load_rasa_state(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_deepspeed_enabled:
            # under DeepSpeed Trainer skips _load_from_checkpoint: the engine has just loaded its own state
            # (deepspeed_load_checkpoint: the trained parameters from its fp32 masters, the optimiser's moments), and
            # RASA's part (fingerprint, routing records) follows here, before the first phase begins
            self._load_rasa_state(checkpoint, engine_restored=True)

    def _load_rasa_state(self, folder: str, model=None, engine_restored: bool = False) -> None:
        """RASA's resume state: the run checked against the checkpoint's fingerprint, the trained parameters restored
        from ``rasa_trainable.safetensors`` (or, where DeepSpeed restored them, checked against it) and the routing
        records handed to the phases."""
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise ValueError(f"cannot resume from {folder}: {problem}")
        self._check_fingerprint(folder)
        if engine_restored:
            _check_engine_restored(unwrap_model(self.model), self._groups, folder)
        else:
            self._restore_trainable(folder, model)
        cache_path = os.path.join(folder, ROUTING_CACHE_FILE)
        if os.path.isfile(cache_path):
            with safe_open(cache_path, "pt") as f:
                epoch = int(f.metadata()["epoch"])
            self._resumed["routing_cache"] = (epoch, RoutingCache.load(cache_path))
        initial = os.path.join(folder, INITIAL_ROUTING_FILE)
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
        wrong = [f"{n} {list(t.shape)} (the model's: {list(params[n].shape)})" for n, t in saved.items()
                 if n in params and t.shape != params[n].shape]
        if wrong:
            raise ValueError(f"{path} holds parameters of other shapes: {'; '.join(wrong[:3])}. A shape [0] is an "
                             "empty ZeRO-3 partition, saved by rasa-trainer before checkpoints took the gathered "
                             "weights: resume such a checkpoint under the same ZeRO-3 config, or start over")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        if self.is_deepspeed_enabled:
            # the parameters are the engine's (partitioned under ZeRO-3, fp32 masters in its optimiser): restored
            # through DeepSpeed as Trainer does, then checked against RASA's file
            from transformers.integrations.deepspeed import deepspeed_load_checkpoint
            from transformers.trainer import _is_peft_model

            deepspeed_load_checkpoint(self.model_wrapped, best, load_module_strict=not _is_peft_model(self.model))
            _check_engine_restored(unwrap_model(self.model), self._groups, best)
            return
        self._restore_trainable(best)

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


def _trainable_state(model: torch.nn.Module, groups: dict[str, list], state_dict: dict | None = None
                     ) -> dict[str, torch.Tensor]:
    """Name -> the full value of every parameter a RASA group trains, for ``rasa_trainable.safetensors``.

    Under DeepSpeed ZeRO-3 a parameter holds only this process's partition (outside a gather its tensor is empty,
    shape ``[0]``), so its value is taken from ``state_dict``: the consolidated state dict the save gathered for the
    merge (``accelerator.get_state_dict``). A partitioned parameter it lacks is an error, never an empty tensor in a
    checkpoint."""
    named = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for params in groups.values():
        for p in params:
            name = named[id(p)]
            full_shape = getattr(p, "ds_shape", None)  # set by deepspeed.zero.Init on partitioned parameters
            if full_shape is None:
                out[name] = p
                continue
            value = state_dict.get(name) if state_dict is not None else None
            if value is None or tuple(value.shape) != tuple(full_shape):
                raise RuntimeError(
                    f"{name} is partitioned by DeepSpeed ZeRO-3 and the state dict the save gathered holds "
                    f"{'no value' if value is None else f'shape {list(value.shape)}'} for it (full shape "
                    f"{list(full_shape)}); a checkpoint would hold an empty partition. Save through Trainer with "
                    "stage3_gather_16bit_weights_on_model_save (accelerate: zero3_save_16bit_model: true)")
            out[name] = value
    return out


def _check_engine_restored(model: torch.nn.Module, groups: dict[str, list], folder: str) -> None:
    """After DeepSpeed restored a checkpoint through its own state (``global_step*/``): the trained parameters must
    equal ``rasa_trainable.safetensors`` written beside it (what the save gathered) exactly, or the resume is refused.
    Under ZeRO-3 each parameter is gathered in turn, a collective every process enters in the same order; every
    process reaches the same verdict."""
    path = os.path.join(folder, TRAINABLE_FILE)
    named = {id(p): n for n, p in model.named_parameters()}
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: not a complete RASATrainer checkpoint")
    with _named_corruption(path):
        saved = safe_open(path, "pt")
        keys = set(saved.keys())
    differences: list[str] = []
    for params in groups.values():
        for p in params:  # one parameter gathered at a time: never all repairs in full at once
            name = named[id(p)]
            with _gathered(p):
                if name not in keys:
                    differences.append(f"{name} is missing")
                    continue
                want, got = saved.get_tensor(name), p.detach().cpu()
                if want.shape != got.shape or want.dtype != got.dtype:
                    differences.append(f"{name}: {list(want.shape)} {want.dtype} saved, {list(got.shape)} "
                                       f"{got.dtype} restored")
                elif not torch.equal(want, got):
                    gap = (want.double() - got.double()).abs().max().item()
                    differences.append(f"{name}: values differ by up to {gap:.3g}")
    if differences:
        raise ValueError(
            f"DeepSpeed restored trained parameters from {folder} that differ from its {TRAINABLE_FILE}: "
            f"{'; '.join(differences[:5])}{' ...' if len(differences) > 5 else ''}. Its global_step* state belongs to "
            "another save (or the file was written by a rasa-trainer that saved empty ZeRO-3 partitions): resume "
            "from another checkpoint, or start over")


def _gathered(param: torch.Tensor):
    """The full value of one ZeRO-3 partitioned parameter for reading (a collective); other parameters as they are."""
    if getattr(param, "ds_id", None) is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def _zero3_save_problem(config: dict) -> str | None:
    """Why a DeepSpeed config cannot save RASA's result, or None: under ZeRO-3 the save needs the gathered weights
    (accelerate's ``get_state_dict`` refuses without them and Trainer then writes no weights at all)."""
    zero = config.get("zero_optimization") or {}
    if int(zero.get("stage", 0) or 0) != 3 or zero.get("stage3_gather_16bit_weights_on_model_save"):
        return None
    return ("DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: RASATrainer merges the repairs into "
            "the expert weights when it saves and writes the trained parameters into every checkpoint, both from the "
            "full weights DeepSpeed gathers for a save. Set zero3_save_16bit_model: true in the accelerate config "
            "(or stage3_gather_16bit_weights_on_model_save: true under zero_optimization in the DeepSpeed JSON)")


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: not a complete RASATrainer checkpoint")
    with _named_corruption(path):
        return load_file(path)


@contextlib.contextmanager
def _named_corruption(path: str) -> Iterator[None]:
    """A truncated or unreadable checkpoint file (safetensors' ``SafetensorError``, or the OS's) becomes an error
    naming the file and what to do."""
    try:
        yield
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path} ({err}); the checkpoint is corrupt: resume from another one") from err

