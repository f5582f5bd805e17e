"""What the local judges in a published format share: a generative checkpoint (a causal LM, or an image-text-to-text
model such as Llama Guard 4) fed a [`JudgeFormat`]'s prompt, greedy generation, the format's parser.

Each published judge is one subclass in its own module (`harmbench.py`, `llama_guard.py`, ...) registered with
[`register_generative`]: a checkpoint kind named explicitly, `--judge harmbench:<folder>`, because a config.json
cannot tell a HarmBench classifier from any other Llama.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import JudgeError, Prompt
from .checkpoint import (Checkpoint, batches, check_positive, ensure_pad_token, greedy_generate, read_checkpoint,
                         resolve_device)
from .formats import JudgeFormat, Verdict
from .registry import register_judge

__all__ = ["GenerativeJudge", "register_generative"]


def _explicit_only(checkpoint: Checkpoint) -> bool:
    return False  # never guessed from a config: named as `kind:folder`


def _is_generative(checkpoint: Checkpoint) -> bool:
    from .guard import is_causal_lm

    return is_causal_lm(checkpoint)


def register_generative(name: str, *, about: str):
    """Register a [`GenerativeJudge`] subclass as the checkpoint kind `name` (reached as `name:<folder>`); its
    options are its constructor's keyword arguments, checked (with the checkpoint's architecture) before loading."""

    def decorator(cls):
        def check(checkpoint: Checkpoint | None, **options: Any) -> None:
            if checkpoint is not None and not _is_generative(checkpoint):
                raise ValueError(f"{name}:{checkpoint.path}: config.architectures = {checkpoint.architectures}; the "
                                 f"{name} judge is a generative checkpoint (*ForCausalLM or *ForConditionalGeneration)")
            check_positive(batch_size=options.get("batch_size"), max_new_tokens=options.get("max_new_tokens"))
            cls.check_options(**options)

        cls.kind = name
        return register_judge(name, checkpoint=_explicit_only, check=check, about=about)(cls)

    return decorator


class GenerativeJudge:
    """A local generative checkpoint asked in a published [`JudgeFormat`] (the subclass's `format`).

    The prompt is the format's raw text (HarmBench, WildGuard) or its messages rendered by the checkpoint's own chat
    template (Llama Guard, Qwen3Guard, the StrongREJECT rubric); the answer is generated greedily and read by the
    format's parser, which raises [`JudgeError`] on anything it cannot read.

    Args:
        model_name_or_path: a local checkpoint folder (or a Hub id when the Hub is reachable).
        device: where to run; default CUDA if available, else CPU.
        batch_size: prompts per `generate` call (left-padded).
        max_new_tokens: answer budget; default the format's.
        revision, trust_remote_code: passed to `from_pretrained` (remote code only when asked).
        dtype: passed to `from_pretrained`; default `"auto"` (the checkpoint's dtype).
    """

    format: ClassVar[JudgeFormat]
    kind: ClassVar[str] = ""

    def __init__(self, model_name_or_path: str, device: Any = None, batch_size: int = 8,
                 max_new_tokens: int | None = None, revision: str | None = None, trust_remote_code: bool = False,
                 dtype: Any = "auto"):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        check_positive(batch_size=batch_size, max_new_tokens=max_new_tokens)
        self.model_name_or_path, self.revision = str(model_name_or_path), revision
        self.name = f"{self.kind}:{model_name_or_path}"
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or self.format.max_new_tokens
        self.device = resolve_device(device)
        load = dict(revision=revision, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **load)
        if self.format.text is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name}: the tokenizer has no chat template; the {self.format.name} format is the "
                             "model's own chat template (set tokenizer.chat_template in the checkpoint)")
        self.tokenizer.padding_side = "left"  # generation continues from the last position of every row
        local = read_checkpoint(model_name_or_path) if revision is None else None
        architectures = local.architectures if local is not None else []
        # Llama Guard 4 is an image-text-to-text model; its checkpoint does not load as a plain causal LM
        auto = AutoModelForImageTextToText if any(a.endswith("ForConditionalGeneration") for a in architectures) \
            else AutoModelForCausalLM
        self.model = auto.from_pretrained(model_name_or_path, dtype=dtype, **load)
        self.model.to(self.device).eval()
        ensure_pad_token(self.tokenizer, self.model)

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """A subclass's own option checks, run before anything loads (ValueError)."""

    # ------------------------------------------------------------------------------------------------ the format

    def chat_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages as this checkpoint's chat template expects them (Llama Guard 4: typed content parts)."""
        return messages

    def render(self, prompt: Prompt, reply: str) -> str:
        """The exact text the judge model reads for one (prompt, reply)."""
        fmt = self.format
        if fmt.text is not None:
            return fmt.text(prompt, reply)
        messages = self.chat_messages(fmt.messages(prompt, reply))
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=fmt.add_generation_prompt)

    def parse(self, answer: str) -> Verdict:
        return self.format.parse(answer)

    # ------------------------------------------------------------------------------------------------ judging

    def verdicts(self, prompts: list[Prompt], replies: list[str]) -> list[Verdict]:
        """The parsed verdict of every reply (categories and scores included)."""
        if len(prompts) != len(replies):
            raise JudgeError(f"{self.name}: got {len(prompts)} prompts but {len(replies)} replies")
        texts = [self.render(p, r) for p, r in zip(prompts, replies)]
        verdicts: list[Verdict] = []
        for start in batches(len(texts), self.batch_size):
            for j, answer in enumerate(self._generate(texts[start:start + self.batch_size])):
                try:
                    verdicts.append(self.parse(answer))
                except JudgeError as err:
                    raise JudgeError(f"{self.name}: row {start + j}: {err}") from None
        return verdicts

    def __call__(self, prompts: list[Prompt], replies: list[str]) -> list[bool]:
        return [v.refused for v in self.verdicts(prompts, replies)]

    def describe(self) -> dict[str, Any]:
        """The judge's identity for results and model cards: name, kind, format (and its version), model."""
        return {"name": self.name, "kind": self.kind, **self.format.describe(), "model": self.model_name_or_path,
                "revision": self.revision, "model_type": getattr(self.model.config, "model_type", None),
                "max_new_tokens": self.max_new_tokens}

    def _generate(self, texts: list[str]) -> list[str]:
        add_special = self.format.add_special_tokens if self.format.text is not None else False
        return greedy_generate(self.model, self.tokenizer, texts, max_new_tokens=self.max_new_tokens,
                               device=self.device, add_special_tokens=add_special)
