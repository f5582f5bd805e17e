"""Refusal judges shared by detection and evaluation: the ``Judge`` protocol and the built-in judges."""

from .builtin import DEFAULT_REFUSAL_PHRASES, DEFAULT_REFUSAL_PREFIXES, ClassifierJudge, GuardModelJudge, Judge, JudgeError, RefusalKeywordJudge, judge_from_name, run_judge

__all__ = ['DEFAULT_REFUSAL_PHRASES', 'DEFAULT_REFUSAL_PREFIXES', 'ClassifierJudge', 'GuardModelJudge', 'Judge', 'JudgeError', 'RefusalKeywordJudge', 'judge_from_name', 'run_judge']
