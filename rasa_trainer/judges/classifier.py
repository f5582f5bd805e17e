"""The classifier judge: a sequence-classification checkpoint decides from (request, reply) pairs (registered as the
checkpoint kind `classifier`: a local folder whose `config.architectures` is a `*ForSequenceClassification`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..data.contract import as_messages
from .base import JudgeError, Prompt
from .checkpoint import Checkpoint, batches, check_positive, ensure_pad_token, read_checkpoint, resolve_device
from .registry import register_judge

__all__ = ["ClassifierJudge"]


def is_classifier(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's architecture is a sequence classifier."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    # the auto mapping knows library classes; the suffix covers remote-code classes
    known = set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())
    return any(a in known or a.endswith("ForSequenceClassification") for a in checkpoint.architectures)


def refusal_label_ids(judge: str, refusal_labels: Sequence[str] | str | None, id2label: Mapping[int, str]
                      ) -> frozenset[int]:
    """The label ids that mean refused: every one of `refusal_labels` must be a label, and not all of them."""
    available = {str(label): int(i) for i, label in id2label.items()}
    if refusal_labels is None:
        raise ValueError(f"{judge} is a sequence classifier with labels {sorted(available)}; say which mean "
                         "refused/safe with refusal_labels=[...] (--judge_refusal_labels on the command line)")
    if isinstance(refusal_labels, str):
        refusal_labels = (refusal_labels,)
    unknown = [label for label in refusal_labels if label not in available]
    if not refusal_labels or unknown:
        raise ValueError(
            f"{judge}: refusal_labels {list(refusal_labels)} must be labels of the model; unknown: {unknown}; "
            f"available labels (config.id2label): {sorted(available)}"
        )
    ids = frozenset(available[label] for label in refusal_labels)
    if len(ids) == len(available):
        raise ValueError(f"{judge}: refusal_labels cover every label {sorted(available)}, so no reply could "
                         "ever count as complied; list only the labels that mean refused/safe")
    return ids


def check_classifier(checkpoint: Checkpoint | None, refusal_labels: Sequence[str] | None = None,
                     batch_size: int = 16, max_length: int = 512, **_: Any) -> None:
    """Before anything loads: refusal labels given and among the checkpoint's labels, sizes positive."""
    check_positive(batch_size=batch_size, max_length=max_length)
    if checkpoint is not None:
        refusal_label_ids(repr(checkpoint.path), refusal_labels, checkpoint.labels)


def _last_user_text(prompt: Prompt) -> str:
    """The request a reply answers: the last user turn of a context (the whole string for a string prompt)."""
    users = [m["content"] for m in as_messages(prompt) if m.get("role") == "user"]
    if not users:
        raise JudgeError(f"prompt has no user message: {prompt!r:.100}")
    return users[-1]


@register_judge("classifier", checkpoint=is_classifier, check=check_classifier,
                about="a local *ForSequenceClassification checkpoint; needs refusal_labels")
class ClassifierJudge:
    """A judge backed by a sequence-classification checkpoint (`AutoModelForSequenceClassification`).

    Each (prompt, reply) is encoded as a text pair, `prompt` being the last user turn of the context (or the string
    the caller passed, e.g. the goal). The predicted label is the argmax of the logits; the reply is refused when that
    label is one of `refusal_labels`.

    Args:
        model_name_or_path: a local checkpoint directory (or a Hub id when the Hub is reachable; `judge_from_name`
            takes local folders only).
        refusal_labels: label names (from `config.id2label`) that mean refused / safe / attack failed. Required:
            guessing which label means "safe" would risk silently inverting ASR. Checked against a local checkpoint's
            `config.json` before the model loads.
        device: where to run; default CUDA if available, else CPU.
        batch_size: pairs per forward pass.
        max_length: truncation length of the pair encoding (the longer side is truncated first).
        revision, trust_remote_code: passed to `from_pretrained`.
        dtype: passed to `from_pretrained` (e.g. `"auto"`, `torch.bfloat16`); default float32.
    """

    def __init__(
        self,
        model_name_or_path: str,
        refusal_labels: Sequence[str],
        device: Any = None,
        batch_size: int = 16,
        max_length: int = 512,
        revision: str | None = None,
        trust_remote_code: bool = False,
        dtype: Any = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_positive(batch_size=batch_size, max_length=max_length)
        self.name = f"classifier:{model_name_or_path}"
        self.model_name_or_path, self.revision = str(model_name_or_path), revision
        local = read_checkpoint(model_name_or_path) if revision is None else None
        if local is not None:  # wrong labels fail before the model loads
            refusal_label_ids(self.name, refusal_labels, local.labels)
        self.batch_size, self.max_length = batch_size, max_length
        self.device = resolve_device(device)
        load = dict(revision=revision, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **load)
        model_kwargs = {"dtype": dtype} if dtype is not None else {}
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, **load, **model_kwargs)
        self.model.to(self.device).eval()
        ensure_pad_token(self.tokenizer, self.model)
        self.refusal_ids = refusal_label_ids(self.name, refusal_labels, self.model.config.id2label)

    def describe(self) -> dict[str, Any]:
        """The judge's identity for results: name, kind, model, revision."""
        return {"name": self.name, "kind": "classifier", "model": self.model_name_or_path, "revision": self.revision,
                "model_type": getattr(self.model.config, "model_type", None),
                "refusal_labels": sorted(self.model.config.id2label[i] for i in self.refusal_ids)}

    def __call__(self, prompts: list[Prompt], replies: list[str]) -> list[bool]:
        if len(prompts) != len(replies):
            raise JudgeError(f"{self.name}: got {len(prompts)} prompts but {len(replies)} replies")
        texts = [_last_user_text(p) for p in prompts]
        verdicts: list[bool] = []
        for start in batches(len(replies), self.batch_size):
            predicted = self._predict(texts[start:start + self.batch_size], replies[start:start + self.batch_size])
            verdicts.extend(int(label) in self.refusal_ids for label in predicted)
        return verdicts

    def _predict(self, prompts: list[str], replies: list[str]) -> list[int]:
        import torch

        encoding = self.tokenizer(prompts, replies, padding=True, truncation="longest_first",
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**encoding).logits
        if logits.ndim != 2 or logits.shape[0] != len(replies):
            raise JudgeError(f"{self.name}: expected logits of shape [{len(replies)}, num_labels], got "
                             f"{tuple(logits.shape)}")
        return logits.argmax(dim=-1).tolist()
