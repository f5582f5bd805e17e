"""rasa-trainer: Routing-Aware Safety Alignment (RASA, arXiv 2602.04448) for Mixture-of-Experts models.

Public API (everything else is private):

- discovery and routing: :func:`moe_layers`, :func:`record_routing`, :func:`replay_routing`
"""

__version__ = "0.1.0"

from .moe import MoELayer, moe_layers
from .routing import Routing, record_routing, replay_routing

__all__ = [
    "MoELayer",
    "Routing",
    "moe_layers",
    "record_routing",
    "replay_routing",
]
