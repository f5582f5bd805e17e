"""RASAConfig: every SFTConfig field plus the RASA fields, validated at construction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from trl import SFTConfig

from .data import DEFAULT_REFUSAL

logger = logging.getLogger(__name__)

SCHEDULES = ("alternate", "expert_only", "router_only", "full")
KL_DIRECTIONS = ("forward", "reverse", "symmetric")
EXPERT_TUNINGS = ("delta", "lora")
REPLAY_WEIGHTS = ("cached", "recompute")
SELECTION_POLICIES = ("global_topk", "per_layer_topk", "batch_union", "per_layer_top_p", "random")


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
    expert_tuning: str = field(
        default="delta",
        metadata={"help": "How selected experts learn: 'delta' (full-rank deltas of their slices) or 'lora'.",
                  "choices": list(EXPERT_TUNINGS)},
    )
    expert_lora_rank: int = field(default=8, metadata={"help": "LoRA rank per selected expert (expert_tuning='lora')."})
    expert_lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha/rank)."})
    replay_weights: str = field(
        default="cached",
        metadata={"help": "Expert phase routing replay: 'cached' replays the recorded top-k weights exactly; "
                          "'recompute' keeps the recorded experts and recomputes weights from live router scores.",
                  "choices": list(REPLAY_WEIGHTS)},
    )
    replay_cache_device: str = field(
        default="cpu", metadata={"help": "Where the expert-phase routing cache lives ('cpu' keeps it off the accelerator)."}
    )
    anchor_column: str = field(
        default="anchor_prompt", metadata={"help": "Column holding the plain harmful request paired with each prompt."}
    )
    default_refusal: str = field(
        default=DEFAULT_REFUSAL, metadata={"help": "Completion used for rows without a `completion`."}
    )
    sce_policy: str = field(
        default="global_topk",
        metadata={"help": "Safety-Critical Expert selection policy when the trainer runs detection itself ('random', "
                          "an ablation, draws experts with `seed`).",
                  "choices": list(SELECTION_POLICIES)},
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
    num_train_epochs: float | None = field(
        default=None, metadata={"help": "Derived from rasa_rounds and rasa_schedule; leave unset."}
    )
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Learning-rate schedule (the authors used a constant rate)."}
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
        self._configure_checkpointing()
        if not self.use_cpu and not _accelerator_available():
            # Without an accelerator the run is on the CPU anyway, but only use_cpu=True makes accelerate form a gloo
            # process group: launched with several processes, each would otherwise train alone.
            logger.info("RASAConfig: no accelerator found; setting use_cpu=True")
            self.use_cpu = True
        if self.ddp_find_unused_parameters is None:
            # the phases train disjoint parameter sets, and a batch may route no token to some selected expert
            self.ddp_find_unused_parameters = True
        super().__post_init__()

    @property
    def phases_per_round(self) -> int:
        return 2 if self.rasa_schedule == "alternate" else 1

    def _check_choices(self) -> None:
        for name, choices in (
            ("rasa_schedule", SCHEDULES),
            ("kl_direction", KL_DIRECTIONS),
            ("expert_tuning", EXPERT_TUNINGS),
            ("replay_weights", REPLAY_WEIGHTS),
            ("sce_policy", SELECTION_POLICIES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(choices)}")
        if self.rasa_rounds < 1:
            raise ValueError(f"rasa_rounds={self.rasa_rounds}; it must be >= 1")
        for name in ("expert_learning_rate", "router_learning_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.expert_lora_rank < 1:
            raise ValueError(f"expert_lora_rank={self.expert_lora_rank}; it must be >= 1")
        if self.sce_num_experts <= 0:
            raise ValueError(f"sce_num_experts={self.sce_num_experts}: give a count >= 1 or a fraction in (0, 1)")

    def _configure_checkpointing(self) -> None:
        kwargs = dict(self.gradient_checkpointing_kwargs or {})
        if self.gradient_checkpointing and kwargs.get("use_reentrant"):
            raise ValueError(
                "gradient_checkpointing_kwargs={'use_reentrant': True} is not supported: reentrant checkpointing runs "
                "the first forward without gradients, so the router phase could not read differentiable router "
                "scores. Use use_reentrant=False (the default here)."
            )
        if self.gradient_checkpointing:
            kwargs["use_reentrant"] = False
            self.gradient_checkpointing_kwargs = kwargs


def _accelerator_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    )
