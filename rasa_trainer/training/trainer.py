"""RASATrainer: a drop-in replacement for TRL's SFTTrainer that runs Routing-Aware Safety Alignment.

Epochs alternate between two phases (see ``docs/method.md``):

- **expert phase**: only the Safety-Critical Experts' repairs learn (full-rank deltas or LoRA), with the routing each
  example received at the start of the phase replayed, on the completion-only cross-entropy;
- **router phase**: only the routers learn (fp32 master weights), on the mean over MoE layers of
  KL(anchor || adversarial) between token-mean router probabilities of the anchor and adversarial contexts.

Every parameter any phase trains is trainable before the optimiser is built and before DDP wraps the model; a phase
switches the other group off (``requires_grad=False``, and its gradients are dropped before the optimiser step, so
it gets no update, no weight decay and no moment drift).

This module owns the constructor's contract (arguments checked before any work) and the Trainer / SFTTrainer hooks;
each hook hands its work to an object the trainer owns, built from explicit arguments:

- ``trainer.phases``: :class:`~.phases.PhaseController` (the ``TrainerCallback``: the schedule, group switching,
  routing records and replay),
- ``trainer.param_groups``: :class:`~.param_groups.ParameterGroups` (trainable groups, optimiser groups, per-group
  metrics),
- ``trainer.routing``: :class:`~.routing_replay.RoutingReplay` (the routing caches, cache rows of a batch),
- ``trainer.router_loss``: :class:`~.router_loss.RouterLoss` (the router phase's loss),
- ``trainer.retain``: :class:`~.retain.RetainData` (retain rows, their schedule, the split loss),

with the losses themselves pure functions in ``losses.py``, the pair rows in ``training_data.py``, the selection in
``run_selection.py`` and saving in ``saving.py`` (a mixin: it overrides Trainer's save and load hooks). See
``docs/architecture.md``; the private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from trl import SFTTrainer

from .config import RASAConfig
from ..data.contract import validate_pairs
from .losses import loss_scaled_for_accumulation
from .model_card import render_model_card
from ..moe.discovery import unwrap_model
from .param_groups import ParameterGroups, learning_rates
from .phases import PhaseController
from .retain import RetainData, _captured_outputs, _validated_retain, expert_micro_batch
from .router_loss import RouterLoss
from .routing_augmentation import RoutingAugmentation, check_augmentation_supported
from .routing_replay import RoutingReplay
from .run_selection import check_detection_supported, resolve_selection, selection_of_checkpoint, validated_selection
from .saving import CheckpointingMixin
from .schedule import uses_selection
from .training_data import RASA_COLUMNS, _PairCollator, _training_rows, locate_prompts, tokenize_anchors
from ..utils import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["RASATrainer"]


class RASATrainer(CheckpointingMixin, SFTTrainer):
    """Drop-in replacement for :class:`trl.SFTTrainer` that runs RASA.

    Same constructor as ``SFTTrainer`` plus ``safety_critical_experts`` (a
    :class:`~rasa_trainer.SafetyCriticalExperts` or a path to its JSON). Without it, the trainer detects the
    Safety-Critical Experts on the training pairs first. ``args`` must be a :class:`RASAConfig`.
    The training data follows the pair contract: ``prompt``, ``anchor_prompt`` and optionally ``completion``.
    """

    _tag_names = ["trl", "sft", "rasa", "moe-safety"]
    _name = "RASA"
    _paper = {
        "title": "Routing-Aware Safety Alignment for Mixture-of-Experts Models",
        "id": "2602.04448",
        "citation": "@article{liang2026rasa, title={Routing-Aware Safety Alignment for Mixture-of-Experts Models}, "
        "author={Liang, Jiacheng and Wang, Yuhui and Jiang, Tanqiu and Wang, Ting}, journal={arXiv preprint "
        "arXiv:2602.04448}, year={2026}}",
    }

    def __init__(self, model, args: RASAConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, safety_critical_experts=None, peft_config=None,
                 retain_dataset=None, **kwargs):
        args = _checked_args(model, args, train_dataset, eval_dataset, peft_config, kwargs)
        retain_rows = _validated_retain(retain_dataset, args, kwargs.get("compute_loss_func"),
                                       train_dataset=train_dataset)  # before any work
        self._pairs = train_dataset
        self._resumed: dict[str, Any] = {}  # what a checkpoint load restores (saving.py); the phases consume it
        self.selection = None
        # TRL switches output_router_logits on for its load-balancing loss; the config is restored after training
        # (left on, it is saved with the model and batched generation with it fails in transformers)
        self._router_logits_setting = _output_router_logits(model)
        with _repairs_count_as_adapters(model, args):
            super().__init__(
                model, args=args, data_collator=data_collator, train_dataset=_training_rows(train_dataset, args),
                eval_dataset=_training_rows(eval_dataset, args) if eval_dataset is not None else None,
                processing_class=processing_class, peft_config=peft_config, **kwargs,
            )
        self.data_collator = _PairCollator(self.data_collator, self._tokenizer.pad_token_id)
        self._build_components(retain_rows)
        self.retain.check_lengths(self._tokenizer)
        if args.rasa_schedule != "full":
            self._disable_aux_loss()
        if args.routing_augmentation != "none":
            check_augmentation_supported(unwrap_model(self.model))  # before detection or any training
        self.selection = resolve_selection(safety_critical_experts, args.rasa_schedule, unwrap_model(self.model))
        if self._needs_detection():
            # detection is deferred to the start of train(), on the model on the training device (TRL keeps
            # construction cheap); it cannot run on weights FSDP or ZeRO-3 have sharded
            self._check_detection_supported()
        else:
            self._setup_parameter_groups()
        self.add_callback(self.phases)

    def _build_components(self, retain_rows: list[dict] | None) -> None:
        """The objects the hooks delegate to, each from explicit arguments."""
        args, collate, pad_token_id = self.args, self.data_collator.base, self._tokenizer.pad_token_id
        self.retain = RetainData(
            retain_rows, ratio=args.retain_ratio, loss_weight=args.retain_loss_weight, seed=args.seed,
            pairs_per_batch=args.per_device_train_batch_size, collate=collate, pad_token_id=pad_token_id,
            loss_type=args.loss_type, max_length=args.max_length, generation_batch_size=args.retain_batch_size,
            max_new_tokens=args.retain_max_new_tokens, chat_template_kwargs=args.chat_template_kwargs)
        self.param_groups = ParameterGroups(learning_rates(args.expert_learning_rate, args.router_learning_rate))
        self.routing = RoutingReplay(
            self.train_dataset, collate, batch_size=args.per_device_train_batch_size,
            device=args.device, cache_device=args.replay_cache_device, replay_weights=args.replay_weights,
            process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes)
        self.router_loss = RouterLoss(args.router_loss, args.kl_direction)
        self.phases = PhaseController(
            args.rasa_schedule, self.param_groups, self.routing, model=lambda: self.model,
            metrics=self._metrics["train"], resumed=self._resumed, on_train_end=self._after_training,
            wrapped_model=lambda: self.model_wrapped)

    # ------------------------------------------------------------------------------------------ read by saving.py,
    # model_card.py and the test jobs: the state of the owned objects under the trainer's former attribute names
    @property
    def _phase(self) -> str | None:
        return self.phases.phase

    @property
    def _phase_epoch(self) -> int | None:
        return self.phases.epoch

    @property
    def _groups(self) -> dict:
        return self.param_groups.groups

    @property
    def _routing_cache(self):
        return self.routing.cache

    @property
    def _initial_routing(self):
        return self.routing.initial

    @property
    def _retain(self) -> list[dict] | None:
        return self.retain.rows

    def phase_of_epoch(self, epoch: int) -> str:
        """The phase an epoch (0-based) runs: expert, router or full."""
        return self.phases.phase_of_epoch(epoch)

    # ------------------------------------------------------------------------------------------ model settings
    def _disable_aux_loss(self) -> None:
        # The load-balancing loss recomputes top-k from live logits, which contradicts replayed routing, and the
        # router phase has its own loss.
        self.aux_loss_enabled = False
        _set_output_router_logits(self.model, False)

    def _restore_router_logits_setting(self) -> None:
        _set_output_router_logits(self.model, self._router_logits_setting)

    def _after_training(self) -> None:
        """At Trainer's ``on_train_end``: the user's ``output_router_logits`` back, the repairs merged (saving.py)."""
        self._restore_router_logits_setting()
        self._merge_after_training()

    def _place_model(self) -> None:
        """The model on the training device before training (for detection and generation), as Trainer places it."""
        if self.place_model_on_device and not getattr(self, "is_model_parallel", False):
            self._move_model_to_device(self.model, self.args.device)

    # ------------------------------------------------------------------------------------------ the selection
    def _needs_detection(self) -> bool:
        return uses_selection(self.args.rasa_schedule) and self.selection is None

    def _check_detection_supported(self) -> None:
        from transformers.integrations import is_deepspeed_zero3_enabled

        check_detection_supported(bool(self.is_fsdp_enabled), is_deepspeed_zero3_enabled())
        from ..detection.backends import check_backend

        # before any work: vLLM installed, one process, its settings sane (detection runs at train start)
        check_backend(self.args.detection_backend, self.args.world_size, self.args.detection_vllm_kwargs)

    def _ensure_selection(self, resume_from_checkpoint=None) -> None:
        """Detect the Safety-Critical Experts when none were given (on every rank, pairs sharded across ranks, on the
        model on the device training uses) and attach their repairs; a resumed run takes the checkpoint's selection.
        Runs before Trainer builds the optimiser and before DDP wraps the model."""
        if not self._needs_detection():
            return
        if self.optimizer is not None:
            raise RuntimeError(
                "the optimiser was built before the Safety-Critical Experts were detected, so it cannot hold their "
                "repairs; call trainer.train() first, or pass safety_critical_experts"
            )
        selection = selection_of_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if selection is None:
            self._place_model()
            selection = self._detect()
        self.selection = validated_selection(selection, unwrap_model(self.model))
        self._setup_parameter_groups()

    def _detect(self):
        from ..detection.detect import detect_safety_critical_experts
        from ..judges import judge_from_name

        args = self.args
        logger.info("RASA: no safety_critical_experts given; detecting them on the training pairs on %s", args.device)
        return detect_safety_critical_experts(
            unwrap_model(self.model), self._tokenizer, self._pairs,
            judge=judge_from_name(args.detection_judge), anchor_column=args.anchor_column,
            batch_size=args.detection_batch_size, max_new_tokens=args.detection_max_new_tokens, seed=args.seed,
            do_sample=args.detection_do_sample, temperature=args.detection_temperature,
            policy=args.sce_policy, num_experts=args.sce_num_experts, threshold=args.sce_threshold,
            top_p_experts=args.sce_top_p,
            output_dir=args.output_dir,  # every process keeps its share's progress; process 0 writes the artifacts
            chat_template_kwargs=args.chat_template_kwargs, backend=args.detection_backend,
            vllm_kwargs=args.detection_vllm_kwargs,
        )

    def _setup_parameter_groups(self) -> None:
        """The trainable groups of the schedule (the selection's repairs attached); the phases expect the selection."""
        args, selection = self.args, self.selection
        self.param_groups.setup(
            self.model, args.rasa_schedule, selection.by_moe_layer() if selection is not None else None,
            args.expert_tuning, args.expert_lora_rank, args.expert_lora_alpha)
        self.phases.expect_experts(selection.by_moe_layer() if selection is not None else None)
        if args.routing_augmentation != "none":
            self.phases.augmentation = RoutingAugmentation(
                args.routing_augmentation, args.routing_augmentation_rate, experts_by_layer=selection.by_moe_layer(),
                seed=args.seed, margin=args.routing_augmentation_margin, positions=args.routing_augmentation_positions)

    # ------------------------------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._check_not_merged()
        # True becomes the newest complete checkpoint; an incomplete or foreign one is refused before any work
        resume_from_checkpoint = self._resolve_resume_checkpoint(resume_from_checkpoint)  # takes the folder's lock
        try:
            self._ensure_selection(resume_from_checkpoint)
            self._prepare_retain()
        except BaseException:
            self._release_run_lock()  # CheckpointingMixin.train gives it back once training has begun
            raise
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _prepare_retain(self) -> None:
        """The retain rows completed (the model's own replies, generated once on the training device) and tokenised
        as TRL tokenises the pairs; the expert phase's routing records hold them after the pairs."""

        def generation_model():
            self._place_model()
            return unwrap_model(self.model)

        self.retain.prepare(
            self._tokenizer, generation_model=generation_model,
            tokenise=lambda dataset: self._prepare_dataset(dataset, self.processing_class, self.args, False, None,
                                                           "retain"))
        self.routing.add_retain_examples(self.retain.examples)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        phase = self.phases.phase
        if phase == "router" and self.router_loss.per_pair:
            # pairs in this optimiser step over every micro-batch and process (like num_items_in_batch for tokens)
            self.router_loss.count_step_pairs(batch_samples, device, self.accelerator.num_processes,
                                              self.accelerator.gather)
        if phase == "expert" and self.retain.active:
            batch_samples = [self._with_retain_rows(batch, j) for j, batch in enumerate(batch_samples)]
            num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
            self.retain.count_step_items(batch_samples, lambda parts: self._get_num_items_in_batch(parts, device))
        return batch_samples, num_items_in_batch

    def _with_retain_rows(self, batch: dict, micro_step: int) -> dict:
        """The expert-phase micro-batch ``micro_step`` of the current optimiser step with its retain rows, which follow
        from the seed and the micro-batch's place in the run's expert-phase stream (``retain.expert_micro_batch``)."""
        state, args = self.state, self.args
        micro_batch = expert_micro_batch(
            expert_epochs_before=self.phases.expert_epochs_before(), epoch=self.phases.epoch,
            global_step=state.global_step, steps_per_epoch=max(1, state.max_steps // max(1, int(args.num_train_epochs))),
            accumulation_steps=args.gradient_accumulation_steps, micro_step=micro_step,
            num_processes=self.accelerator.num_processes, process_index=self.accelerator.process_index)
        return self.retain.with_rows(batch, micro_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the expert phase's routing replay stays active through backward (see PhaseController.replay)
        with self.phases.replay(model, inputs):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor_ids = inputs.pop("anchor_input_ids", None)
        anchor_mask = inputs.pop("anchor_attention_mask", None)
        rows = inputs.pop("rasa_index", None)
        context = inputs.pop("rasa_context_mask", None)
        inputs.pop("rasa_retain_index", None)  # retain rows, if any, follow the pairs: rows len(rows) onwards
        phase = self.phases.phase
        if not model.training or phase is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # the phase of the last step of a logging window (a list of one value, which Trainer's averaging keeps as is)
        self._metrics["train"]["phase"] = [self.phases.phase_code]
        if phase == "router":
            if context is None:  # batches built without the RASA collator
                context = (inputs["labels"] == -100) & inputs["attention_mask"].bool()
            return self._router_loss(model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch, context=context)
        return self._completion_loss(model, inputs, rows, return_outputs, num_items_in_batch)

    def _completion_loss(self, model, inputs, rows, return_outputs, num_items_in_batch):
        """The expert (or full) phase's cross-entropy; with retain rows in the batch, the retain-weighted form."""
        metrics = self._metrics["train"]
        if self.retain.active and rows is not None:
            # a run with retain rows (they follow the pairs in some batches): each part's own mean, logged per part
            with _captured_outputs(model) as captured:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.retain.log_split_losses(captured, len(rows), metrics)
            return self.retain.weighted_loss(loss, captured, len(rows), num_items_in_batch,
                                             self._process_factor(num_items_in_batch))
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = (loss[0] if isinstance(loss, tuple) else loss).detach().item()
        # a loss normalised by the optimiser step's tokens is a micro-batch's share of the step's mean: logged as that
        # mean (as Trainer's own `loss` is), not divided by the accumulation steps and scaled by the processes
        if not self._loss_scaled_for_accumulation(num_items_in_batch):
            value /= self._process_factor(num_items_in_batch) or 1
        else:
            value *= getattr(self, "current_gradient_accumulation_steps", 1) / (self._process_factor(num_items_in_batch) or 1)
        metrics["completion_loss"].append(value)
        return loss

    def _process_factor(self, num_items_in_batch) -> int | None:
        """The factor TRL scales a token-normalised loss by when tokens are averaged across devices, else None."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes // self.get_tp_size()
        return None

    def _router_loss(self, model, inputs, anchor_ids, anchor_mask, rows, num_items_in_batch, context=None):
        """The router phase's loss of one micro-batch (:class:`~.router_loss.RouterLoss`), logged as ``router_kl``,
        and the prompt tokens' ``routing_shift_prompt`` from the run-start routing."""
        kl, routing, context = self.router_loss.kl(model, inputs, anchor_ids, anchor_mask, context)
        metrics = self._metrics["train"]
        metrics["router_kl"].append(kl.detach().mean().item())
        shift = self.routing.prompt_shift(rows, inputs["attention_mask"], context, routing)
        if shift is not None:
            metrics["routing_shift_prompt"].append(shift)
        # outside Trainer's loop there is no accumulation
        return self.router_loss.scale(
            kl, in_train=self.is_in_train, num_processes=self.accelerator.num_processes,
            accumulation_steps=getattr(self, "current_gradient_accumulation_steps", 1),
            trainer_divides=not self._loss_scaled_for_accumulation(num_items_in_batch))

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether Trainer.training_step takes the loss as already averaged over the accumulation steps."""
        return loss_scaled_for_accumulation(getattr(self, "loss_is_scaled_for_ga", None),
                                            self.model_accepts_loss_kwargs, num_items_in_batch, self.compute_loss_func)

    # ------------------------------------------------------------------------------------------ optimiser and metrics
    def create_optimizer(self, model=None):
        """Trainer's optimiser (``optim``, ``optim_args``, ``optimizer_cls_and_kwargs``, 8-bit and paged optimisers)
        over Trainer's decay / no-decay split (``get_decay_parameter_names``), each of those groups split further by
        RASA group (expert repairs, routers; ``full``: all weights) with the group's learning rate."""
        if self.optimizer is not None:
            return super().create_optimizer(model)
        self._ensure_selection()
        opt_model = self.model if model is None else model
        # the engine may have replaced the parameters (FSDP2): the groups follow the model the optimiser gets
        self.param_groups.follow(opt_model)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = self.param_groups.optimizer_cls_and_kwargs(
            optimizer_cls, optimizer_kwargs, self.args.optim)
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = saved

    def _get_learning_rate(self) -> float:
        """The learning rate of the group the current phase trains (Trainer logs it as ``learning_rate``); every
        group's rate is logged as ``learning_rate_<group>``."""
        value = super()._get_learning_rate()
        try:
            rates = [float(r) for r in self.lr_scheduler.get_last_lr()]
            names = [g.get("name") for g in self.optimizer.param_groups]
        except (AttributeError, TypeError, NotImplementedError):  # schedulers without per-group rates: Trainer's value
            return value
        if len(rates) != len(names):
            return value
        per_group = self.param_groups.log_learning_rates(names, rates, self._metrics["train"])
        return per_group.get(self.phases.active_group, value)

    def _clip_grad_norm(self, model):
        self._log_group_grad_norm()  # before Trainer clips
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # max_grad_norm <= 0: nothing was clipped, and _clip_grad_norm did not run
            self._log_group_grad_norm()
        return super()._get_grad_norm(model, grad_norm)

    def _log_group_grad_norm(self) -> None:
        """``grad_norm_<group>``: the gradient norm of the group the phase trains, before clipping (Trainer's
        ``grad_norm`` is the norm of all gradients, also before clipping). Not available under DeepSpeed, which keeps
        the gradients inside its engine."""
        if self.phases.phase is None or self.is_deepspeed_enabled:
            return
        self.param_groups.log_grad_norm(self.phases.active_group, self._metrics["train"])

    # ------------------------------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # anchors tokenised (lengths checked) before TRL's tokenisation, prompt lengths located after it
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        dataset = tokenize_anchors(dataset, tokenizer, args.max_length, dataset_name)
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        return locate_prompts(dataset, tokenizer, getattr(self, "chat_template", None), dataset_name)

    def _set_signature_columns_if_needed(self):
        # the RASA columns survive Trainer's removal of the columns the model does not take
        super()._set_signature_columns_if_needed()
        for column in RASA_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, output_dir: str | None = None,
                          evaluation_results: dict | None = None, **kwargs):
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        text = render_model_card(
            self, model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
            dataset_name=dataset_name, tags=tags, evaluation_results=evaluation_results or getattr(self, "evaluation_results", None),
        )
        atomic_write(os.path.join(output_dir, "README.md"), text)


# ---------------------------------------------------------------------------------------------- the constructor's contract


def _checked_args(model, args: RASAConfig | None, train_dataset, eval_dataset, peft_config, kwargs: dict) -> RASAConfig:
    """The run's RASAConfig (a default one named after the model when none is given), after refusing what RASA
    cannot honour and checking the pair contract of the datasets."""
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        args = RASAConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1] or 'model'}-RASA")
    if not isinstance(args, RASAConfig):
        raise TypeError(f"RASATrainer needs args=RASAConfig(...), got {type(args).__name__}")
    if peft_config is not None and args.rasa_schedule != "full":
        raise ValueError(
            "RASATrainer trains its own repairs of the selected experts; a peft_config would train other "
            "parameters. Use expert_tuning='lora' (with expert_lora_rank/alpha) instead, or use peft_config only "
            "with rasa_schedule='full'."
        )
    _reject_peft_model(model, args)
    if train_dataset is None:
        raise ValueError("`train_dataset` is required")
    if (kwargs.get("optimizers") or (None, None))[0] is not None and args.rasa_schedule != "full":
        raise ValueError(
            "optimizers=(optimizer, scheduler): an optimizer built before the trainer cannot hold the expert "
            "repairs RASATrainer attaches, nor give each group its learning rate. Pass the optimizer class "
            "instead, optimizer_cls_and_kwargs=(cls, kwargs), or choose it with `optim`/`optim_args`."
        )
    validate_pairs(train_dataset, anchor_column=args.anchor_column)
    if eval_dataset is not None:
        validate_pairs(eval_dataset, anchor_column=args.anchor_column)
    _check_a_batch_remains(args, len(train_dataset))
    return args


def _check_a_batch_remains(args: RASAConfig, num_pairs: int) -> None:
    """With ``dataloader_drop_last`` a data set smaller than one batch over all processes leaves no step at all
    (Trainer then fails on ``max_steps``, naming neither the data nor the batch)."""
    batch = args.per_device_train_batch_size * max(1, args.world_size)
    if args.dataloader_drop_last and num_pairs < batch:
        raise ValueError(f"dataloader_drop_last=True drops every batch: {num_pairs} training pairs are fewer than one "
                         f"batch of {batch} ({args.per_device_train_batch_size} per device x {args.world_size} "
                         "processes), so no step would run; lower per_device_train_batch_size, add pairs, or set "
                         "dataloader_drop_last=False")


def _reject_peft_model(model, args: RASAConfig) -> None:
    """A PeftModel would be saved as a plain checkpoint with its LoRA keys (lost on reload); RASA attaches its own
    repairs, so the user's adapter must be merged first."""
    if args.rasa_schedule == "full" or isinstance(model, str) or not hasattr(model, "peft_config"):
        return
    raise ValueError(
        f"model is a PEFT model ({type(model).__name__}). RASATrainer attaches its own repairs to the selected experts "
        f"and saves merged checkpoints, which a PEFT wrapper would break. Merge your adapter first "
        f"(model = model.merge_and_unload()) and pass the plain model; for LoRA repairs use expert_tuning='lora'."
    )


def _output_router_logits(model) -> bool:
    """The model's own output_router_logits setting (False for a model id: configs default to it)."""
    if isinstance(model, str):
        return False
    return bool(getattr(model.config.get_text_config(), "output_router_logits", False))


def _set_output_router_logits(model, value: bool) -> None:
    """Set the (unwrapped) model's ``output_router_logits``, where its config has one."""
    text_config = unwrap_model(model).config.get_text_config()
    if hasattr(text_config, "output_router_logits"):
        text_config.output_router_logits = value


@contextlib.contextmanager
def _repairs_count_as_adapters(model, args: RASAConfig):
    """Let a quantized base model (bitsandbytes) through the Trainer's "no training of purely quantized models" check:
    RASA trains its own adapters (expert repairs, fp32 routers), which it attaches right after construction."""
    quantized = not isinstance(model, str) and getattr(model, "is_quantized", False)
    if not quantized or args.rasa_schedule == "full":
        yield
        return
    had = "_hf_peft_config_loaded" in vars(model)
    previous = getattr(model, "_hf_peft_config_loaded", False)
    model._hf_peft_config_loaded = True
    for param in model.parameters():
        param.requires_grad_(False)  # else SFTTrainer casts every trainable weight of a quantized model to bf16
    try:
        yield
    finally:
        if had:
            model._hf_peft_config_loaded = previous
        else:
            del model._hf_peft_config_loaded
