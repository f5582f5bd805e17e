"""Step 1-2 of RASA: generation with routing capture (``generation``), activation statistics and risk difference (``statistics``), selection policies and the ``SafetyCriticalExperts`` artefact (``selection``), the detection driver (``detect``)."""

from .detect import detect_safety_critical_experts
from .selection import EmptySelectionError, POLICIES, SafetyCriticalExperts, SelectedExpert, SelectionConfig, select_experts

__all__ = ['detect_safety_critical_experts', 'EmptySelectionError', 'POLICIES', 'SafetyCriticalExperts', 'SelectedExpert', 'SelectionConfig', 'select_experts']
