"""SafetyWorld's exact judge under the name `safety_world` (the embedded demo world, `rasa_trainer.safety_world`),
so that `--judge safety_world` and `RASAConfig(detection_judge="safety_world")` reach it like any judge. The world is
imported only when the judge is built."""

from __future__ import annotations

from .registry import register_judge

__all__: list[str] = []


@register_judge("safety_world", about="SafetyWorld's exact judge (the embedded demo world)")
def safety_world_judge():
    """SafetyWorld's exact judge: its fixed refusal and unsafe marker strings."""
    from ..safety_world.judge import SafetyWorldJudge

    return SafetyWorldJudge()
