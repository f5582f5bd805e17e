"""Judge prompt formats: how a published judge is asked about one (request, reply) and how its answer is read.

A format is two pure functions and its identity:

- the prompt: `text(prompt, reply)` (the exact string a completion model is fed, e.g. HarmBench's classifier prompt)
  and/or `messages(prompt, reply)` (chat messages, rendered by the judge model's own chat template or sent to a chat
  endpoint, e.g. the conversation a Llama Guard template wraps);
- the parser: `parse(answer) -> Verdict`; an answer it cannot read raises [`JudgeError`] (never "safe").

Formats are registered by name (`register_format`), one module per published judge (`harmbench.py`,
`llama_guard.py`, `wildguard.py`, `qwen3guard.py`, `strongreject.py`, `refusal_llm.py`); the local model-backed
judges (`generative.py`) and the OpenAI-compatible HTTP judge (`openai_http.py`) run any of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data.contract import as_messages
from .base import JudgeError, Prompt

__all__ = ["JUDGE_FORMATS", "JudgeFormat", "Verdict", "judge_format", "register_format"]


@dataclass(frozen=True)
class Verdict:
    """One parsed judge answer.

    Attributes:
        refused: True when the reply is safe / a refusal (the attack failed), False when it complied.
        categories: the harm categories the judge named (Llama Guard's `S1`..., Qwen3Guard's names), if any.
        score: a graded score when the format has one (StrongREJECT: 0..1, higher = more harmful).
        details: the other fields the format reports (e.g. WildGuard's `harmful_request`).
    """

    refused: bool
    categories: tuple[str, ...] = ()
    score: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeFormat:
    """A published judge's prompt format and parser (see the module docstring).

    Attributes:
        name: the registered name (`--judge_format`).
        source: where the prompt and the answer format come from (written into results for provenance).
        parse: the answer's text -> [`Verdict`]; raises [`JudgeError`] on anything it cannot read.
        text: the raw prompt for a completion model, or None when the format is a chat template's.
        messages: chat messages for a chat template or a chat endpoint.
        template: the prompt template text (hashed into `version`); empty when the model's own template is the prompt.
        add_special_tokens: whether a tokenizer adds its special tokens (BOS) to `text`.
        add_generation_prompt: passed to `apply_chat_template` when `messages` are rendered locally.
        max_new_tokens: the answer budget the format needs.
    """

    name: str
    source: str
    parse: Callable[[str], Verdict]
    messages: Callable[[Prompt, str], list[dict[str, Any]]]
    text: Callable[[Prompt, str], str] | None = None
    template: str = ""
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    max_new_tokens: int = 16

    @property
    def version(self) -> str:
        """A short identity of the prompt: the name and a hash of the template text (the model's own chat template
        when the format has none)."""
        digest = hashlib.sha256(self.template.encode("utf-8")).hexdigest()[:12] if self.template else "chat-template"
        return f"{self.name}/{digest}"

    def describe(self) -> dict[str, str]:
        return {"format": self.name, "format_version": self.version, "format_source": self.source}


JUDGE_FORMATS: dict[str, JudgeFormat] = {}


def register_format(fmt: JudgeFormat) -> JudgeFormat:
    """Register `fmt` under its name; a name already taken is a ValueError."""
    if fmt.name in JUDGE_FORMATS:
        raise ValueError(f"judge format {fmt.name!r} is already registered")
    JUDGE_FORMATS[fmt.name] = fmt
    return fmt


def judge_format(name: str) -> JudgeFormat:
    """The registered format `name`; a ValueError listing the formats otherwise."""
    fmt = JUDGE_FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown judge format {name!r}; the formats are {', '.join(sorted(JUDGE_FORMATS))}")
    return fmt


# ------------------------------------------------------------------------------------------ shared by the formats


def request_text(prompt: Prompt) -> str:
    """The request a reply answers: the last user turn of a context (the whole string for a string prompt)."""
    users = [m["content"] for m in as_messages(prompt) if m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise JudgeError(f"prompt has no user message with text: {prompt!r:.100}")
    return users[-1]


def conversation(prompt: Prompt, reply: str) -> list[dict[str, Any]]:
    """The context and the reply as alternating user/assistant turns, for a guard's chat template: a leading system
    message is merged into the first user turn (guard templates take no system turn, and it often carries the
    attack)."""
    messages = [dict(m) for m in as_messages(prompt)]
    if messages and messages[0].get("role") == "system":
        system = messages.pop(0)
        if messages:
            messages[0]["content"] = f"{system['content']}\n\n{messages[0]['content']}"
        else:
            messages = [{"role": "user", "content": system["content"]}]
    return messages + [{"role": "assistant", "content": reply}]


def user_message(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def answer_lines(answer: Any, fmt: str) -> list[str]:
    """The non-empty stripped lines of an answer; a JudgeError for a non-string or empty answer."""
    if not isinstance(answer, str):
        raise JudgeError(f"{fmt}: the judge's answer is a {type(answer).__name__}, not text")
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if not lines:
        raise JudgeError(f"{fmt}: the judge's answer is empty")
    return lines


def bare_word(text: str) -> str:
    """A word without surrounding punctuation or markdown, case-folded (`**Yes.**` -> `yes`)."""
    return text.strip().strip(".,:;!\"'`*()[] ").casefold()
