"""Memory plan for a RASA run: how many bytes each phase needs, from a config alone (no weights, no downloads).

- :mod:`.plan`: :func:`estimate_memory` and what it returns: weights, gradients, optimiser state, replay cache, peak
- :mod:`.activations`: the activation formulas (the tensors autograd saves per phase, the backward transient)
- :mod:`.models`: a model, config, path, cached Hub id or preset (:data:`PRESETS`) as a model on the meta device
- :mod:`.from_config`: :func:`estimate_memory_from_config`, the plan of a training config file
"""

from .from_config import estimate_memory_from_config
from .models import PRESETS
from .plan import MemoryEstimate, PhaseMemory, estimate_memory

__all__ = ["MemoryEstimate", "PRESETS", "PhaseMemory", "estimate_memory", "estimate_memory_from_config"]
