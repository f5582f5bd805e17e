"""The pair rows RASATrainer trains on, built from the pair contract: TRL's conversational prompt-completion rows with
the anchor and the row index alongside, the tokenised anchors and the prompt lengths the router loss reads (the two
steps around TRL's own ``_prepare_dataset``), the length checks, and the collator that pads them next to TRL's batch.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset

from .config import RASAConfig
from ..data.contract import as_messages, completion_text, render_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class _PairCollator:
    """Wraps TRL's collator: pads the tokenised anchors alongside and passes the dataset row of each example."""

    def __init__(self, base, pad_token_id: int):
        self.base, self.pad_token_id = base, pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        anchors = [ex.pop("anchor_input_ids") for ex in examples] if "anchor_input_ids" in examples[0] else None
        rows = [ex.pop("rasa_index") for ex in examples] if "rasa_index" in examples[0] else None
        prompt_lengths = [ex.pop("rasa_prompt_length") for ex in examples] if "rasa_prompt_length" in examples[0] else None
        batch = self.base(examples)
        if anchors is not None:
            width = max(len(a) for a in anchors)
            ids = torch.full((len(anchors), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(anchors), width), dtype=torch.long)
            for i, a in enumerate(anchors):
                ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
                mask[i, : len(a)] = 1
            batch["anchor_input_ids"], batch["anchor_attention_mask"] = ids, mask
        if rows is not None:
            batch["rasa_index"] = torch.tensor(rows, dtype=torch.long)
        if prompt_lengths is not None:
            # the context the router loss averages over: the prompt tokens (TRL's completion mask is 0 there; TRL pads
            # on the right), independent of how `labels` are masked
            positions = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
            lengths = torch.tensor(prompt_lengths, dtype=torch.long).unsqueeze(1)
            batch["rasa_context_mask"] = (positions < lengths) & batch["attention_mask"].bool()
        return batch


def _training_rows(dataset, args: RASAConfig) -> Dataset:
    """The pair contract as TRL's conversational prompt-completion rows, plus the anchor and the row index."""
    rows = dataset if isinstance(dataset, list) else dataset.to_list()
    # TRL renders each row with its own `chat_template_kwargs` column; the anchors and prompt lengths read it too
    template = {"chat_template_kwargs": args.chat_template_kwargs} if args.chat_template_kwargs else {}
    return Dataset.from_list(
        [
            {
                "prompt": as_messages(row["prompt"]),
                "completion": [{"role": "assistant", "content": completion_text(row.get("completion"), args.default_refusal)}],
                "rasa_anchor": as_messages(row[args.anchor_column]),
                "rasa_index": i,
                **template,
            }
            for i, row in enumerate(rows)
        ]
    )


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool, chat_template: str | None = None,
              chat_template_kwargs: dict | None = None) -> list[int]:
    return render_chat(tokenizer, messages, add_generation_prompt=generation_prompt, tokenize=True,
                       chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)


# the columns of the prepared rows that Trainer's column pruning must keep
RASA_COLUMNS = ("anchor_input_ids", "rasa_index", "rasa_prompt_length")


def tokenize_anchors(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, dataset_name: str) -> Dataset:
    """Pair rows (with ``rasa_anchor``) with their anchors tokenised (``anchor_input_ids``), after refusing rows that
    truncation would cut; other datasets as they are."""
    if "rasa_anchor" not in dataset.column_names:
        return dataset
    check_pair_lengths(dataset, tokenizer, max_length, dataset_name)
    return dataset.map(
        lambda ex: {"anchor_input_ids": _chat_ids(tokenizer, ex["rasa_anchor"], generation_prompt=True,
                                                  chat_template_kwargs=ex.get("chat_template_kwargs"))},
        remove_columns=["rasa_anchor"],
        desc=f"Tokenizing anchors of {dataset_name}",
    )


def locate_prompts(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, chat_template: str | None, dataset_name: str) -> Dataset:
    """Tokenised pair rows with ``rasa_prompt_length``: where the completion starts, exactly as TRL computes its
    completion mask (which it folds into ``labels`` and drops). The router loss reads its context from here, not from
    ``labels``, so ``assistant_only_loss`` and multi-turn prompts do not change what the routers are trained on."""
    if "anchor_input_ids" not in dataset.column_names or "prompt" not in dataset.column_names:
        return dataset
    from trl.data_utils import common_prefix_length

    return dataset.map(
        lambda ex: {"rasa_prompt_length": common_prefix_length(
            _chat_ids(tokenizer, ex["prompt"], generation_prompt=True, chat_template=chat_template,
                      chat_template_kwargs=ex.get("chat_template_kwargs")), ex["input_ids"])},
        desc=f"Locating the prompts of {dataset_name}",
    )


def check_pair_lengths(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, dataset_name: str) -> None:
    """Refuse rows whose refusal target would be cut off by truncation (a pitfall of the reference code)."""
    if max_length is None:
        return
    too_long = []
    for i, row in enumerate(dataset):
        kwargs = row.get("chat_template_kwargs")
        n = len(_chat_ids(tokenizer, row["prompt"] + row["completion"], generation_prompt=False,
                          chat_template_kwargs=kwargs))
        if n > max_length:
            too_long.append(f"row {i} ({n} tokens)")
        n = len(_chat_ids(tokenizer, row["rasa_anchor"], generation_prompt=True, chat_template_kwargs=kwargs))
        if n > max_length:
            too_long.append(f"row {i} (anchor: {n} tokens)")
    if too_long:
        raise ValueError(
            f"{len(too_long)} row(s) of {dataset_name} exceed max_length={max_length} with their completion "
            f"or their anchor, so truncation would cut the refusal target or the anchor context: "
            f"{', '.join(too_long[:5])}. Raise max_length or shorten those rows."
        )
