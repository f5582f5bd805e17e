"""The training data RASATrainer builds from the pair contract: TRL's conversational prompt-completion rows with the
anchor and the row index alongside, the tokenised anchors and the prompt lengths the router loss reads, and the
collator that pads them next to TRL's batch.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset

from .config import RASAConfig
from ..data.contract import as_messages, completion_text, render_chat


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
    return Dataset.from_list(
        [
            {
                "prompt": as_messages(row["prompt"]),
                "completion": [{"role": "assistant", "content": completion_text(row.get("completion"), args.default_refusal)}],
                "rasa_anchor": as_messages(row[args.anchor_column]),
                "rasa_index": i,
            }
            for i, row in enumerate(rows)
        ]
    )


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool, chat_template: str | None = None) -> list[int]:
    return render_chat(tokenizer, messages, add_generation_prompt=generation_prompt, tokenize=True,
                       chat_template=chat_template)


class PairDataMixin:
    """RASATrainer's data hooks on SFTTrainer: anchors tokenised with the pairs, truncation refused where it would cut
    the refusal target or the anchor, and the RASA columns kept through Trainer's column pruning."""

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if "rasa_anchor" in dataset.column_names:
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            self._check_lengths(dataset, tokenizer, args, dataset_name)
            dataset = dataset.map(
                lambda ex: {"anchor_input_ids": _chat_ids(tokenizer, ex["rasa_anchor"], generation_prompt=True)},
                remove_columns=["rasa_anchor"],
                desc=f"Tokenizing anchors of {dataset_name}",
            )
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if "anchor_input_ids" in dataset.column_names and "prompt" in dataset.column_names:
            # Where the completion starts, exactly as TRL computes its completion mask (which it folds into `labels`
            # and drops): the router loss reads its context from here, not from `labels`, so assistant_only_loss
            # and multi-turn prompts do not change what the routers are trained on.
            from trl.data_utils import common_prefix_length

            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            template = getattr(self, "chat_template", None)
            dataset = dataset.map(
                lambda ex: {"rasa_prompt_length": common_prefix_length(
                    _chat_ids(tokenizer, ex["prompt"], generation_prompt=True, chat_template=template), ex["input_ids"])},
                desc=f"Locating the prompts of {dataset_name}",
            )
        return dataset

    @staticmethod
    def _check_lengths(dataset, tokenizer, args, dataset_name: str) -> None:
        """Refuse rows whose refusal target would be cut off by truncation (a pitfall of the reference code)."""
        if args.max_length is None:
            return
        too_long = []
        for i, row in enumerate(dataset):
            n = len(_chat_ids(tokenizer, row["prompt"] + row["completion"], generation_prompt=False))
            if n > args.max_length:
                too_long.append(f"row {i} ({n} tokens)")
            n = len(_chat_ids(tokenizer, row["rasa_anchor"], generation_prompt=True))
            if n > args.max_length:
                too_long.append(f"row {i} (anchor: {n} tokens)")
        if too_long:
            raise ValueError(
                f"{len(too_long)} row(s) of {dataset_name} exceed max_length={args.max_length} with their completion "
                f"or their anchor, so truncation would cut the refusal target or the anchor context: "
                f"{', '.join(too_long[:5])}. Raise max_length or shorten those rows."
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in ("anchor_input_ids", "rasa_index", "rasa_prompt_length"):
            if column not in self._signature_columns:
                self._signature_columns.append(column)
