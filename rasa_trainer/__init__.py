"""rasa-trainer: Routing-Aware Safety Alignment (RASA, arXiv 2602.04448) for Mixture-of-Experts models.

Public API (everything else is private):

- training: :class:`RASATrainer` (a drop-in ``trl.SFTTrainer``), :class:`RASAConfig`
- detection: :func:`detect_safety_critical_experts`, :class:`SafetyCriticalExperts`
- evaluation: :func:`evaluate_safety` (returns a :class:`SafetyReport`)
- discovery and routing: :func:`moe_layers`, :func:`record_routing`, :func:`replay_routing`
- judges: :class:`RefusalKeywordJudge`, :class:`ClassifierJudge`, :class:`GuardModelJudge`
- planning: :func:`estimate_memory`
"""

__version__ = "0.1.0"

from .config import RASAConfig
from .detection import detect_safety_critical_experts
from .evaluation import SafetyReport, evaluate_safety
from .judges import ClassifierJudge, GuardModelJudge, Judge, JudgeError, RefusalKeywordJudge
from .memory import MemoryEstimate, estimate_memory
from .moe import MoELayer, moe_layers
from .routing import Routing, real_tokens, record_routing, replay_routing
from .selection import SafetyCriticalExperts
from .trainer import RASATrainer

__all__ = [
    "ClassifierJudge",
    "GuardModelJudge",
    "Judge",
    "JudgeError",
    "MemoryEstimate",
    "MoELayer",
    "RASAConfig",
    "RASATrainer",
    "RefusalKeywordJudge",
    "Routing",
    "SafetyCriticalExperts",
    "SafetyReport",
    "evaluate_safety",
    "detect_safety_critical_experts",
    "estimate_memory",
    "moe_layers",
    "real_tokens",
    "record_routing",
    "replay_routing",
]
