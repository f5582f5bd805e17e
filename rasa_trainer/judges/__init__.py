"""Refusal judges shared by detection and evaluation, one concept per file: the ``Judge`` protocol, ``JudgeError`` and
``run_judge`` (``base``), the registry of judge kinds and ``judge_from_name`` (``registry``), the built-in judges
(``keyword``, ``classifier``, ``guard``, ``safety_world``), the judges in their published formats (``formats``: prompt
and parser; ``harmbench``, ``llama_guard``, ``wildguard``, ``qwen3guard``, ``strongreject``, ``refusal_llm``, run on a
local checkpoint by ``generative`` or behind an OpenAI-compatible endpoint by ``openai_http``) and what model-backed
judges share (``checkpoint``)."""

from .base import Judge, JudgeError, describe_judge, run_judge
from .registry import JUDGE_KINDS, JudgeKind, check_judge_name, judge_from_name, judge_kind, judge_names, register_judge
from .keyword import DEFAULT_REFUSAL_PHRASES, DEFAULT_REFUSAL_PREFIXES, RefusalKeywordJudge
from .classifier import ClassifierJudge
from .guard import GuardModelJudge
from . import safety_world as _safety_world  # registers the `safety_world` judge
from .formats import JUDGE_FORMATS, JudgeFormat, Verdict, judge_format, register_format
from .generative import GenerativeJudge
from .harmbench import HarmBenchJudge
from .llama_guard import LlamaGuardJudge
from .wildguard import WildGuardJudge
from .qwen3guard import Qwen3GuardJudge
from .strongreject import StrongRejectJudge
from .refusal_llm import RefusalLLMJudge
from .openai_http import OpenAIJudge

__all__ = ['DEFAULT_REFUSAL_PHRASES', 'DEFAULT_REFUSAL_PREFIXES', 'ClassifierJudge', 'GenerativeJudge',
           'GuardModelJudge', 'HarmBenchJudge', 'JUDGE_FORMATS', 'JUDGE_KINDS', 'Judge', 'JudgeError', 'JudgeFormat', 'JudgeKind',
           'LlamaGuardJudge', 'OpenAIJudge', 'Qwen3GuardJudge', 'RefusalKeywordJudge', 'RefusalLLMJudge',
           'StrongRejectJudge', 'Verdict', 'WildGuardJudge', 'check_judge_name', 'describe_judge', 'judge_format',
           'judge_from_name', 'judge_kind', 'judge_names', 'register_format', 'register_judge', 'run_judge']
