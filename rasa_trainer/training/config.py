"""RASAConfig: every SFTConfig field plus the RASA fields, validated at construction."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch

from trl import SFTConfig

from ..data.contract import DEFAULT_REFUSAL, check_chat_template_kwargs
from ..detection.backends import BACKENDS
from ..detection.policies import POLICY_NAMES
from ..repairs.layer import REPAIR_MODES
from ..moe.routing import REPLAY_WEIGHT_MODES
from .routing_augmentation import AUGMENTATION_FAMILIES, AUGMENTATION_POSITIONS, check_augmentation_options

logger = logging.getLogger(__name__)

SCHEDULES = ("alternate", "expert_only", "router_only", "full")
KL_DIRECTIONS = ("forward", "reverse", "symmetric")
SELECTION_POLICIES = POLICY_NAMES  # the selection-policy registry's names, live (rasa_trainer.detection.policies)
ROUTER_LOSSES = ("pooled", "per_pair")


@dataclass
class RASAConfig(SFTConfig):
    r"""Configuration of [`RASATrainer`]: every [`~trl.SFTConfig`] field plus the RASA fields below.

    The number of epochs follows from `rasa_rounds` and `rasa_schedule` (one epoch per phase), so
    `num_train_epochs` is derived; setting it to a different value is an error. Defaults follow the authors:
    3 rounds, expert lr 5e-5, router lr 1e-6, forward KL, constant learning rate.
    """

    rasa_rounds: int = field(
        default=3,
        metadata={"help": "Number of rounds. A round is one expert-repair epoch then one router-consistency epoch "
                          "(alternate), or one epoch of the single phase of the other schedules."},
    )
    rasa_schedule: str = field(
        default="alternate",
        metadata={"help": "Which phases run: 'alternate' (RASA), 'expert_only', 'router_only', or 'full' (plain SFT of "
                          "all parameters through the same code path; the baseline).", "choices": list(SCHEDULES)},
    )
    expert_learning_rate: float = field(
        default=5e-5, metadata={"help": "Learning rate of the selected experts' repairs (and of all weights in 'full')."}
    )
    router_learning_rate: float = field(
        default=1e-6, metadata={"help": "Learning rate of the router weights in the router phase (kept in fp32)."}
    )
    kl_direction: str = field(
        default="forward",
        metadata={"help": "Router-consistency KL: 'forward' = KL(anchor || adversarial), 'reverse' = "
                          "KL(adversarial || anchor), 'symmetric' = their mean.", "choices": list(KL_DIRECTIONS)},
    )
    router_loss: str = field(
        default="per_pair",
        metadata={"help": "Router-consistency loss: 'pooled' (the authors') compares the token-mean router "
                          "probabilities pooled over all anchors and all adversarial contexts of a micro-batch (per "
                          "process); 'per_pair' compares each adversarial context with its own anchor and averages the "
                          "KL over the pairs of the whole optimiser step (every micro-batch and process), so it does not "
                          "depend on batch size, gradient accumulation or the number of processes (the default: "
                          "as good as 'pooled' on the validation worlds, see the README).",
                  "choices": list(ROUTER_LOSSES)},
    )
    expert_tuning: str = field(
        default="delta",
        metadata={"help": "How selected experts learn: 'delta' (full-rank deltas of their slices) or 'lora'.",
                  "choices": list(REPAIR_MODES)},
    )
    expert_lora_rank: int = field(default=8, metadata={"help": "LoRA rank per selected expert (expert_tuning='lora')."})
    expert_lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha/rank)."})
    replay_weights: str = field(
        default="cached",
        metadata={"help": "Expert phase routing replay: 'cached' replays the recorded top-k weights exactly; "
                          "'recompute' keeps the recorded experts and recomputes weights from live router scores.",
                  "choices": list(REPLAY_WEIGHT_MODES)},
    )
    replay_cache_device: str = field(
        default="cpu", metadata={"help": "Where the expert-phase routing cache lives ('cpu' keeps it off the accelerator)."}
    )
    routing_augmentation: str = field(
        default="none",
        metadata={"help": "Routing-robust repair: a share of the expert phase's pair rows trains under routing an "
                          "attacker could impose instead of the replayed routing. 'force': the selected experts forced "
                          "into the top-k with the routing attack's weights (SteerMoE's activation); 'force_equal': "
                          "forced, then all top-k weights equal; 'equal': the replayed experts with equal weights; "
                          "'none' (the default): exact replay. Needs replay_weights='cached' and routers that "
                          "renormalise a softmax top-k. See docs/protocols/routing_augmentation.md.",
                  "choices": list(AUGMENTATION_FAMILIES)},
    )
    routing_augmentation_rate: float = field(
        default=0.5,
        metadata={"help": "With routing_augmentation: the probability that a pair row of an expert-phase batch is "
                          "trained under the perturbed routing (drawn per row, seeded by the run seed, the epoch and "
                          "the batch's rows); 0 is exact replay."},
    )
    routing_augmentation_margin: float = field(
        default=0.01,
        metadata={"help": "With routing_augmentation='force' or 'force_equal': the margin over the row's maximum "
                          "log-probability given to the forced experts (the routing attack's; SteerMoE uses 0.01)."},
    )
    routing_augmentation_positions: str = field(
        default="reply",
        metadata={"help": "Positions of a perturbed row that change: 'reply' (the decision position and every reply "
                          "position, where the routing attack acts while generating), 'decision' (the prompt's last "
                          "position only, where the attack on the reply's first token acts), 'mixed' (one of the two "
                          "per perturbed row, even odds) or 'all' (every real position).",
                  "choices": list(AUGMENTATION_POSITIONS)},
    )
    anchor_column: str = field(
        default="anchor_prompt", metadata={"help": "Column holding the plain harmful request paired with each prompt."}
    )
    default_refusal: str = field(
        default=DEFAULT_REFUSAL, metadata={"help": "Completion used for rows without a `completion`."}
    )
    retain_ratio: float = field(
        default=0.25,
        metadata={"help": "Retain rows (RASATrainer's `retain_dataset`) per pair row in each expert-phase batch, e.g. "
                          "0.25: 4 retain rows next to 16 pairs; 0 disables. Only used with a retain_dataset; the "
                          "router phase never sees retain rows."},
    )
    retain_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the retain rows in the expert-phase loss. The loss is the pairs' mean cross-entropy "
                          "over their completion tokens plus retain_loss_weight times the retain rows' mean over theirs "
                          "(each mean over its own tokens of the optimiser step), so retain rows never dilute the refusal "
                          "objective however many tokens they bring."},
    )
    retain_max_new_tokens: int = field(
        default=64, metadata={"help": "New tokens of the base model's greedy reply to retain prompts without a completion."}
    )
    retain_batch_size: int = field(
        default=16, metadata={"help": "Generation batch size for retain prompts without a completion."}
    )
    sce_policy: str = field(
        default="global_topk",
        metadata={"help": "Safety-Critical Expert selection policy when the trainer runs detection itself ('random', "
                          "an ablation, draws experts with `seed`).",
                  "choices": SELECTION_POLICIES},
    )
    sce_num_experts: float = field(
        default=0.125,
        metadata={"help": "Experts to select: a count (>= 1) or a fraction of all routed experts (< 1)."},
    )
    sce_threshold: float = field(default=0.0, metadata={"help": "Select only experts with risk difference above this."})
    sce_top_p: float = field(default=0.5, metadata={"help": "Cumulative score per layer for the 'per_layer_top_p' policy."})
    detection_judge: str = field(
        default="keyword", metadata={"help": "Judge for detection: 'keyword' or a local classifier/guard checkpoint."}
    )
    detection_batch_size: int = field(default=8, metadata={"help": "Generation batch size of detection."})
    detection_max_new_tokens: int = field(default=64, metadata={"help": "New tokens generated per reply in detection."})
    detection_do_sample: bool = field(
        default=False, metadata={"help": "Sample replies in detection (seeded with `seed`) instead of greedy decoding."}
    )
    detection_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of detection."})
    detection_backend: str = field(
        default="hf",
        metadata={"help": "Generation engine of detection at train start: 'hf' (transformers generate on the model "
                          "being trained) or 'vllm' (vLLM on the model's folder, several times faster; needs `pip "
                          "install vllm`; one process only). Both feed the same statistics and selection.",
                  "choices": list(BACKENDS)},
    )
    detection_vllm_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra arguments of vLLM's `LLM(...)` for detection_backend='vllm', as a dict or JSON, e.g. "
                          "'{\"gpu_memory_utilization\": 0.3}' to leave room for the model being trained."},
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra variables of the chat template, as a dict or JSON, used wherever a conversation is "
                          "rendered (detection, the training rows, anchors, retain rows), e.g. "
                          "'{\"enable_thinking\": false}' for Qwen3. The name and meaning of TRL's GRPOConfig field."},
    )
    ignore_checkpoint_mismatch: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint even when its run fingerprint (the arguments that shape the result, "
                          "the training data, the selection, the package version) differs from this run's. Off by "
                          "default: such a resume is refused with the differences listed."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Let a new (not resumed) run use an output_dir that holds checkpoint-* folders of another "
                          "run: they are removed when training starts. Off by default: such a run is refused, so no "
                          "run's checkpoints are rotated, overwritten or resumed by another."},
    )
    num_train_epochs: float | None = field(
        default=None, metadata={"help": "Derived from rasa_rounds and rasa_schedule; leave unset."}
    )
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Learning-rate schedule (the authors used a constant rate)."}
    )
    # TRL turns activation checkpointing on by default through the deprecated `gradient_checkpointing` name, which
    # makes transformers warn on every construction; RASAConfig keeps TRL's default under the current name.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Activation (gradient) checkpointing; on unless set (as in SFTConfig). Reentrant "
                          "checkpointing is not supported."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`, will be removed in v6."}
    )

    def __post_init__(self):
        self._check_choices()
        derived = float(self.rasa_rounds * self.phases_per_round)
        if self.num_train_epochs is not None and float(self.num_train_epochs) != derived:
            raise ValueError(
                f"num_train_epochs={self.num_train_epochs} conflicts with rasa_rounds={self.rasa_rounds} and "
                f"rasa_schedule={self.rasa_schedule!r}, which need {derived:g} epochs (one per phase); set rasa_rounds "
                f"instead and leave num_train_epochs unset"
            )
        self.num_train_epochs = derived
        if self.max_steps is not None and self.max_steps > 0:
            raise ValueError(
                f"max_steps={self.max_steps}: RASA phases are whole epochs, so training length is set by rasa_rounds; "
                f"leave max_steps at -1"
            )
        if self.packing or self.padding_free:
            raise ValueError(
                "packing and padding_free are not supported by RASATrainer: the anchor/adversarial pairs and the "
                "routing replay cache need whole, unpacked rows. Set packing=False and padding_free=False."
            )
        if self.rasa_schedule in ("alternate", "expert_only") and self.completion_only_loss is False:
            raise ValueError(
                "completion_only_loss=False would train the Safety-Critical Experts to reproduce the jailbreak prompts "
                "(the expert phase learns the refusal only). Leave completion_only_loss unset (or True); "
                "the schedules without an expert phase ('router_only', 'full') accept it."
            )
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # SFTConfig's default, under the current name
        self._warn_unused_learning_rate()
        if not self.use_cpu and not _accelerator_available():
            # Without an accelerator the run is on the CPU anyway, but only use_cpu=True makes accelerate form a gloo
            # process group: launched with several processes, each would otherwise train alone.
            logger.info("RASAConfig: no accelerator found; setting use_cpu=True")
            self.use_cpu = True
        if self.ddp_find_unused_parameters is None:
            # the phases train disjoint parameter sets, and a batch may route no token to some selected expert
            self.ddp_find_unused_parameters = True
        super().__post_init__()  # parses the JSON of the dict fields
        self._check_dict_fields()
        # after transformers has mapped the deprecated gradient_checkpointing* names onto activation_checkpointing*
        self._configure_checkpointing()

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["chat_template_kwargs", "detection_vllm_kwargs"]

    @property
    def phases_per_round(self) -> int:
        return 2 if self.rasa_schedule == "alternate" else 1

    def _check_choices(self) -> None:
        for name, choices in (
            ("rasa_schedule", SCHEDULES),
            ("kl_direction", KL_DIRECTIONS),
            ("expert_tuning", REPAIR_MODES),
            ("replay_weights", REPLAY_WEIGHT_MODES),
            ("sce_policy", SELECTION_POLICIES),
            ("router_loss", ROUTER_LOSSES),
            ("detection_backend", BACKENDS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(choices)}")
        check_augmentation_options(self.routing_augmentation, self.routing_augmentation_rate,
                                   self.routing_augmentation_margin, self.routing_augmentation_positions)
        if self.routing_augmentation != "none":
            if self.rasa_schedule not in ("alternate", "expert_only"):
                raise ValueError(f"routing_augmentation={self.routing_augmentation!r} changes the expert phase's "
                                 f"routing, but rasa_schedule={self.rasa_schedule!r} has no expert phase; use "
                                 f"'alternate' or 'expert_only', or routing_augmentation='none'")
            if self.replay_weights != "cached":
                raise ValueError(f"routing_augmentation={self.routing_augmentation!r} sets the top-k weights, but "
                                 f"replay_weights={self.replay_weights!r} would recompute them from the live routers; "
                                 f"set replay_weights='cached' or routing_augmentation='none'")
        if isinstance(self.rasa_rounds, float) and self.rasa_rounds.is_integer():
            self.rasa_rounds = int(self.rasa_rounds)
        if isinstance(self.rasa_rounds, bool) or not isinstance(self.rasa_rounds, int) or self.rasa_rounds < 1:
            raise ValueError(f"rasa_rounds={self.rasa_rounds!r}; it must be an integer >= 1 (a round is one epoch per phase)")
        for name in ("expert_learning_rate", "router_learning_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if isinstance(self.retain_ratio, bool) or not isinstance(self.retain_ratio, (int, float)) or not (
                math.isfinite(self.retain_ratio) and self.retain_ratio >= 0):
            raise ValueError(f"retain_ratio={self.retain_ratio!r}; it must be a finite number >= 0 (retain rows per pair "
                             f"row in expert-phase batches; 0 disables the retain data)")
        if isinstance(self.retain_loss_weight, bool) or not isinstance(self.retain_loss_weight, (int, float)) or not (
                math.isfinite(self.retain_loss_weight) and self.retain_loss_weight >= 0):
            raise ValueError(f"retain_loss_weight={self.retain_loss_weight!r}; it must be a finite number >= 0 (the "
                             f"weight of the retain rows' mean cross-entropy beside the pairs')")
        for name in ("expert_lora_rank", "detection_batch_size", "detection_max_new_tokens", "retain_max_new_tokens",
                     "retain_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; it must be an integer >= 1")
        if self.sce_num_experts <= 0 or (self.sce_num_experts >= 1 and not float(self.sce_num_experts).is_integer()):
            raise ValueError(
                f"sce_num_experts={self.sce_num_experts}: give a count (an integer >= 1) or a fraction in (0, 1)"
            )
        if not -1.0 <= self.sce_threshold <= 1.0:
            raise ValueError(
                f"sce_threshold={self.sce_threshold}: risk differences lie in [-1, 1], so the threshold must too"
            )
        if not 0.0 < self.sce_top_p <= 1.0:
            raise ValueError(f"sce_top_p={self.sce_top_p}: it must be in (0, 1]")
        if self.detection_do_sample and not self.detection_temperature > 0:
            raise ValueError(f"detection_temperature={self.detection_temperature}: sampling needs a temperature > 0")
        if not isinstance(self.default_refusal, str) or not self.default_refusal.strip():
            raise ValueError(
                "default_refusal is empty: rows without a completion would be trained toward an empty reply; give the "
                "refusal text to train toward"
            )

    def _check_dict_fields(self) -> None:
        self.chat_template_kwargs = check_chat_template_kwargs(self.chat_template_kwargs) or None
        kwargs = self.detection_vllm_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"detection_vllm_kwargs={kwargs!r}; give a dict or its JSON, e.g. "
                             f"'{{\"gpu_memory_utilization\": 0.3}}'")
        if kwargs and self.detection_backend != "vllm":
            raise ValueError(f"detection_vllm_kwargs={kwargs} is set but detection_backend={self.detection_backend!r}; "
                             f"set detection_backend='vllm' or drop detection_vllm_kwargs")

    def _warn_unused_learning_rate(self) -> None:
        default = type(self).__dataclass_fields__["learning_rate"].default
        if self.learning_rate != default:
            warnings.warn(
                f"learning_rate={self.learning_rate} is not used by RASATrainer: the selected experts' repairs learn "
                f"at expert_learning_rate={self.expert_learning_rate} (every weight in rasa_schedule='full') and the "
                f"routers at router_learning_rate={self.router_learning_rate}. Set those instead.",
                UserWarning,
                stacklevel=3,
            )

    def _configure_checkpointing(self) -> None:
        """Reject reentrant checkpointing under either name (transformers has mapped the deprecated
        ``gradient_checkpointing*`` onto ``activation_checkpointing*`` by now) and pin ``use_reentrant=False``."""
        kwargs = dict(self.activation_checkpointing_kwargs or {})
        if self.activation_checkpointing and kwargs.get("use_reentrant"):
            raise ValueError(
                "activation_checkpointing_kwargs={'use_reentrant': True} (or the deprecated gradient_checkpointing_"
                "kwargs) is not supported: reentrant checkpointing runs the first forward without gradients, so the "
                "router phase could not read differentiable router scores. Use use_reentrant=False (the default here)."
            )
        if self.activation_checkpointing:
            kwargs["use_reentrant"] = False
            # one dict under both names, as transformers leaves them
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs = kwargs


def _accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    )
