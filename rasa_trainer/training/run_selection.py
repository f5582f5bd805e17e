"""The selection a run trains: the Safety-Critical Experts given to the trainer (or a path to their JSON), the ones a
checkpoint was trained with (resuming never re-runs detection), or none yet (detected at train start, which sharded
engines cannot do). Functions of the selection, the model and the run's folders; the trainer calls them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from torch import nn

from .checkpoints import SELECTION_FILE
from .schedule import uses_selection

if TYPE_CHECKING:
    from ..detection.selection import SafetyCriticalExperts

logger = logging.getLogger(__name__)


def resolve_selection(selection: SafetyCriticalExperts | str | os.PathLike | None, schedule: str,
                      model: nn.Module) -> SafetyCriticalExperts | None:
    """The selection given to the constructor (a ``SafetyCriticalExperts`` or a path to its JSON), validated against
    ``model``; ``None`` when it is to be detected (at train start) or when ``schedule`` repairs no experts."""
    if not uses_selection(schedule):
        if selection is not None:
            logger.warning("safety_critical_experts is ignored with rasa_schedule=%r", schedule)
        return None
    from ..detection.selection import SafetyCriticalExperts

    if selection is None:
        return None
    if isinstance(selection, (str, os.PathLike)):
        selection = SafetyCriticalExperts.load(selection)
    return validated_selection(selection, model)


def validated_selection(selection: SafetyCriticalExperts, model: nn.Module) -> SafetyCriticalExperts:
    """``selection``, checked to be a non-empty ``SafetyCriticalExperts`` that fits ``model``."""
    from ..detection.selection import SafetyCriticalExperts

    if not isinstance(selection, SafetyCriticalExperts):
        raise TypeError(
            f"safety_critical_experts must be a SafetyCriticalExperts or a path to its JSON, got {type(selection).__name__}"
        )
    if len(selection) == 0:
        raise ValueError(
            "safety_critical_experts holds no experts, so the expert phase would train nothing; pass a selection "
            "with at least one expert (or use rasa_schedule='router_only')"
        )
    selection.validate(model)
    logger.info("RASA: repairing %d Safety-Critical Experts: %s", len(selection), selection.by_moe_layer())
    return selection


def check_detection_supported(fsdp: bool, zero3: bool) -> None:
    """Detection cannot run on weights FSDP or ZeRO-3 shard: the repairs must be attached before the engine shards
    the model, while detection needs the whole model to generate."""
    if not (fsdp or zero3):
        return
    engine = "FSDP" if fsdp else "DeepSpeed ZeRO-3"
    raise ValueError(
        f"no safety_critical_experts were given, and under {engine} the trainer cannot detect them itself: "
        f"the expert repairs must be attached before {engine} shards the model, while detection needs the "
        f"whole model to generate. Detect first (`rasa-trainer detect`, examples/detect_experts.py or "
        f"rasa_trainer.detect_safety_critical_experts, e.g. with device_map='auto'), then pass "
        f"safety_critical_experts='<dir>/safety_critical_experts.json'."
    )


def selection_of_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str
                            ) -> SafetyCriticalExperts | None:
    """The selection a checkpoint was trained with (``True``: the last checkpoint of ``output_dir``), or ``None``."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume_from_checkpoint = get_last_checkpoint(output_dir)
        if resume_from_checkpoint is None:
            raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
    path = os.path.join(str(resume_from_checkpoint), SELECTION_FILE)
    if not os.path.isfile(path):
        return None
    from ..detection.selection import SafetyCriticalExperts

    logger.info("RASA: resuming with the Safety-Critical Experts of %s", path)
    return SafetyCriticalExperts.load(path)
