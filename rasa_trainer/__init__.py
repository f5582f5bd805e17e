"""rasa-trainer: Routing-Aware Safety Alignment (RASA, arXiv 2602.04448) for Mixture-of-Experts models.

The top level holds what a TRL user needs (pinned by ``tests/test_public_api.py``):

- training: :class:`RASATrainer` (a drop-in ``trl.SFTTrainer``), :class:`RASAConfig`
- detection: :func:`detect_safety_critical_experts`, :class:`SafetyCriticalExperts`
- evaluation: :func:`evaluate_safety` (returns a :class:`SafetyReport`), :func:`load_eval_sets`
- data: :func:`pairs_from_columns`, :func:`pairs_from_templates`

Documented submodules, each with its own ``__all__``: ``rasa_trainer.moe`` and ``rasa_trainer.routing`` (discovery,
routing capture and replay), ``rasa_trainer.repairs`` (the repair lifecycle), ``rasa_trainer.adapter`` (PEFT
adapters), ``rasa_trainer.judges``, ``rasa_trainer.steering``, ``rasa_trainer.memory`` (memory plan),
``rasa_trainer.pairs``, ``rasa_trainer.eval_sets``, ``rasa_trainer.selection``, ``rasa_trainer.data``,
``rasa_trainer.utils`` (atomic writes). Everything
else is private. See ``docs/architecture.md``.
"""

__version__ = "0.1.0"

from .config import RASAConfig
from .detection import detect_safety_critical_experts
from .eval_sets import load_eval_sets
from .evaluation import SafetyReport, evaluate_safety
from .pairs import pairs_from_columns, pairs_from_templates
from .selection import SafetyCriticalExperts
from .trainer import RASATrainer

__all__ = [
    "RASAConfig",
    "RASATrainer",
    "SafetyCriticalExperts",
    "SafetyReport",
    "detect_safety_critical_experts",
    "evaluate_safety",
    "load_eval_sets",
    "pairs_from_columns",
    "pairs_from_templates",
]
