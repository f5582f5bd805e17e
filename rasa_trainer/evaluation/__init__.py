"""Step 4: safety evaluation (``evaluate``), evaluation sets from public shapes (``eval_sets``), SteerMoE-style steering and the routing attack (``steering``), routing diagnostics (``routing_diagnostics``), plots (``reporting``)."""

from .evaluate import EVAL_SET_NAMES, RoutingShift, SafetyReport, compare_reports, evaluate_safety, exact_match, format_comparison, generate_with_base_routing, routing_shift
from .eval_sets import flatten_lm_eval_results, load_attacks, load_eval_sets, load_xstest, run_lm_eval, write_eval_sets

__all__ = ['EVAL_SET_NAMES', 'RoutingShift', 'SafetyReport', 'compare_reports', 'evaluate_safety', 'exact_match', 'format_comparison', 'generate_with_base_routing', 'routing_shift', 'flatten_lm_eval_results', 'load_attacks', 'load_eval_sets', 'load_xstest', 'run_lm_eval', 'write_eval_sets']
