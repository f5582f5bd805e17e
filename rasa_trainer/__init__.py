"""rasa-trainer: Routing-Aware Safety Alignment (RASA, arXiv 2602.04448) for Mixture-of-Experts models.

The top level holds what a TRL user needs (pinned by ``tests/test_public_api.py``), imported on first use so that
``import rasa_trainer`` and ``rasa-trainer --help`` stay cheap (as in TRL and transformers):

- training: :class:`RASATrainer` (a drop-in ``trl.SFTTrainer``), :class:`RASAConfig`
- detection: :func:`detect_safety_critical_experts`, :class:`SafetyCriticalExperts`
- evaluation: :func:`evaluate_safety` (returns a :class:`SafetyReport`), :func:`load_eval_sets`
- data: :func:`pairs_from_columns`, :func:`pairs_from_templates`

The package is built in rooms by the method's steps (``docs/architecture.md``): ``moe`` (discovery, routing capture
and replay), ``repairs`` (the repair lifecycle; ``repairs.adapter``: PEFT adapters), ``data`` (the pair contract;
``data.pairs``: pair builders), ``detection`` (``detection.selection``: selection policies), ``judges``,
``training``, ``evaluation`` (``evaluation.eval_sets``, ``evaluation.steering``), ``memory`` (memory plan), ``cli``,
``safety_world`` (the demo), ``utils`` (atomic writes). The documented ones have their own ``__all__``; everything
else is private. Old module paths (``rasa_trainer.routing``, ``.pairs``, ...) still import until 0.3, with a warning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _deprecated

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it
    "RASAConfig": "training.config",
    "RASATrainer": "training.trainer",
    "SafetyCriticalExperts": "detection.selection",
    "SafetyReport": "evaluation.evaluate",
    "detect_safety_critical_experts": "detection.detect",
    "evaluate_safety": "evaluation.evaluate",
    "load_eval_sets": "evaluation.eval_sets",
    "pairs_from_columns": "data.pairs",
    "pairs_from_templates": "data.pairs",
}

__all__ = sorted(_LAZY)

_deprecated.install()

if TYPE_CHECKING:
    from .data.pairs import pairs_from_columns, pairs_from_templates
    from .detection.detect import detect_safety_critical_experts
    from .detection.selection import SafetyCriticalExperts
    from .evaluation.eval_sets import load_eval_sets
    from .evaluation.evaluate import SafetyReport, evaluate_safety
    from .training.config import RASAConfig
    from .training.trainer import RASATrainer


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'rasa_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
