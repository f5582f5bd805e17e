"""The pair contract (``contract``: validation of pairs, evaluation sets and retain rows, message normalisation, the chat renderer) and builders of pairs from public jailbreak data (``pairs``)."""

from .contract import DEFAULT_REFUSAL, DatasetContractError, as_messages, completion_text, render_chat, retain_conflicts, validate_eval_sets, validate_pairs
from .pairs import AttackTemplate, load_goals, load_template, load_templates, pairs_from_columns, pairs_from_templates, read_table, write_pairs_jsonl

__all__ = ['DEFAULT_REFUSAL', 'DatasetContractError', 'as_messages', 'completion_text', 'render_chat', 'retain_conflicts', 'validate_eval_sets', 'validate_pairs', 'AttackTemplate', 'load_goals', 'load_template', 'load_templates', 'pairs_from_columns', 'pairs_from_templates', 'read_table', 'write_pairs_jsonl']
