"""Refusal judges shared by detection and evaluation, one concept per file: the ``Judge`` protocol, ``JudgeError`` and
``run_judge`` (``base``), the registry of judge kinds and ``judge_from_name`` (``registry``), the built-in judges
(``keyword``, ``classifier``, ``guard``, ``safety_world``) and what model-backed judges share (``checkpoint``)."""

from .base import Judge, JudgeError, run_judge
from .registry import JUDGE_KINDS, JudgeKind, check_judge_name, judge_from_name, judge_kind, judge_names, register_judge
from .keyword import DEFAULT_REFUSAL_PHRASES, DEFAULT_REFUSAL_PREFIXES, RefusalKeywordJudge
from .classifier import ClassifierJudge
from .guard import GuardModelJudge
from . import safety_world as _safety_world  # registers the `safety_world` judge

__all__ = ['DEFAULT_REFUSAL_PHRASES', 'DEFAULT_REFUSAL_PREFIXES', 'ClassifierJudge', 'GuardModelJudge', 'JUDGE_KINDS', 'Judge', 'JudgeError', 'JudgeKind', 'RefusalKeywordJudge', 'check_judge_name', 'judge_from_name', 'judge_kind', 'judge_names', 'register_judge', 'run_judge']
