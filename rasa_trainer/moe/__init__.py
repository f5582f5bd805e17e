"""Mixture-of-Experts mechanics: discovery of a model's MoE layers and their scoring rules (``discovery``), routing capture and replay (``routing``), the expert phase's routing cache (``replay_cache``)."""

from .discovery import MoELayer, ScoringRule, SUPPORTED_FAMILIES, moe_layers, unwrap_model
from .routing import Routing, RoutingRecorder, real_tokens, record_routing, replay_routing

__all__ = ['MoELayer', 'ScoringRule', 'SUPPORTED_FAMILIES', 'moe_layers', 'unwrap_model', 'Routing', 'RoutingRecorder', 'real_tokens', 'record_routing', 'replay_routing']
