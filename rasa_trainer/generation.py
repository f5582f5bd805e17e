"""Batched chat generation that also returns the routing of the generated tokens.

Shared by detection and evaluation. Prompts are rendered with the tokenizer's chat template and left-padded; the
routing that produced each generated token (see :meth:`RoutingRecorder.generation_routing`) is kept for the real
generated tokens only: nothing after the first end-of-sequence token and no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .routing import Routing, record_routing


@dataclass
class GenerationBatch:
    """Replies to one batch of conversations.

    Attributes:
        rows: indices of the conversations in the input sequence.
        replies: decoded replies (special tokens removed).
        reply_token_ids: generated token ids per reply, up to and including the first end-of-sequence token.
        routing: routing that produced each kept generated token (``None`` unless asked for); its rows are the
            replies' tokens concatenated in batch order.
        token_rows: for each routing row, the position of its reply in this batch (0-based).
    """

    rows: list[int]
    replies: list[str]
    reply_token_ids: list[list[int]]
    routing: Routing | None = None
    token_rows: torch.Tensor | None = None


def render_chat(tokenizer, conversation: Sequence[dict]) -> str:
    """The prompt text of a conversation with the assistant's generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template (a Jinja template) before "
            f"generating replies to chat conversations"
        )
    return tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _trim(new_tokens: torch.Tensor, eos: set[int]) -> list[list[int]]:
    """Generated ids per row up to and including the first end-of-sequence token."""
    kept = []
    for row in new_tokens.tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        kept.append(row[:end])
    return kept


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    with_routing: bool = False,
    progress: bool = True,
    desc: str = "generating",
) -> Iterator[GenerationBatch]:
    """Generate replies to chat conversations in batches, optionally with the routing of the generated tokens.

    Greedy by default; with ``do_sample=True`` each batch is seeded with ``seed + batch index`` so runs repeat.
    Yields one :class:`GenerationBatch` per batch, so callers can accumulate statistics with constant memory.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token) first")
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        starts = range(0, len(conversations), batch_size)
        for batch_index, start in enumerate(tqdm(starts, desc=desc, disable=not progress, unit="batch")):
            rows = list(range(start, min(start + batch_size, len(conversations))))
            texts = [render_chat(tokenizer, conversations[i]) for i in rows]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            if do_sample:
                torch.manual_seed(seed + batch_index)
            generate_kwargs = dict(
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(eos) or None,
            )
            if do_sample:
                generate_kwargs.update(temperature=temperature, top_p=top_p)
            else:
                generate_kwargs.update(temperature=None, top_p=None, top_k=None)
            if with_routing:
                with record_routing(model, probabilities=True, device="cpu") as recorder:
                    output = model.generate(**inputs, **generate_kwargs)
            else:
                output = model.generate(**inputs, **generate_kwargs)
            new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()
            kept = _trim(new_tokens, eos)
            batch = GenerationBatch(
                rows=rows,
                replies=tokenizer.batch_decode(kept, skip_special_tokens=True),
                reply_token_ids=kept,
            )
            if with_routing:
                batch.routing, batch.token_rows = _generated_routing(recorder, kept)
            yield batch
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side


def _generated_routing(recorder, kept: list[list[int]]) -> tuple[Routing, torch.Tensor]:
    """Routing of the kept generated tokens (rows concatenated in batch order) and each token's batch position."""
    batch_size = len(kept)
    routing = recorder.generation_routing(batch_size)
    # generate may stop early when all sequences finished: the recorder saw one call per produced token
    produced = recorder.num_calls
    lengths = torch.tensor([len(k) for k in kept])
    keep = torch.arange(produced).unsqueeze(0) < lengths.unsqueeze(1)  # [B, produced]
    token_rows = torch.arange(batch_size).unsqueeze(1).expand(-1, produced)[keep]
    return routing.select(keep.reshape(-1)), token_rows
