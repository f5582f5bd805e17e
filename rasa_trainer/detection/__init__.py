"""Step 1-2 of RASA: generation with routing capture (``generation``), activation statistics and risk difference (``statistics``), the selection-policy registry (``policies``), selection and the ``SafetyCriticalExperts`` artefact (``selection``), the detection driver (``detect``)."""

from .detect import detect_safety_critical_experts
from .policies import POLICY_NAMES, SelectionPolicy, get_policy, policy_names, register_policy
from .selection import EmptySelectionError, SafetyCriticalExperts, SelectedExpert, SelectionConfig, select_experts

__all__ = ['detect_safety_critical_experts', 'EmptySelectionError', 'POLICIES', 'POLICY_NAMES', 'SafetyCriticalExperts', 'SelectedExpert', 'SelectionConfig', 'SelectionPolicy', 'get_policy', 'policy_names', 'register_policy', 'select_experts']


def __getattr__(name: str):
    if name == "POLICIES":  # the tuple of registered policy names, read now
        return policy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
