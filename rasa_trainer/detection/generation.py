"""Batched chat generation that also returns the routing of the generated tokens.

Shared by detection and evaluation. Prompts are rendered with the tokenizer's chat template and left-padded; the
routing that produced each generated token is kept for the real generated tokens only: nothing after the first
end-of-sequence token and no padding.

The routing that produced new token ``t`` of a sequence is the routing of the last position of forward call ``t`` of
``generate``: the last prompt position in the prefill for the first token, then the previous new token at each decode
step. Generation uses its own lean capture (:class:`_GenerationCapture`) that keeps only those positions: memory
does not grow with the prompt length, and records stay on the model's device until the batch ends (no device sync per
decode step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.contract import check_chat_template_kwargs, render_chat
from ..moe.discovery import MoELayer, moe_layers
from ..moe.routing import Routing, compact_index_dtype


@dataclass
class GenerationBatch:
    """Replies to one batch of conversations.

    Attributes:
        rows: indices of the conversations in the input sequence.
        replies: decoded replies (special tokens removed).
        reply_token_ids: generated token ids per reply, up to and including the first end-of-sequence token.
        routing: routing that produced each kept generated token (``None`` unless asked for), on the CPU; its rows are
            the replies' tokens concatenated in batch order.
        token_rows: for each routing row, the position of its reply in this batch (0-based).
    """

    rows: list[int]
    replies: list[str]
    reply_token_ids: list[list[int]]
    routing: Routing | None = None
    token_rows: torch.Tensor | None = None

    def routing_of(self, keep: Sequence[bool] | torch.Tensor) -> Routing:
        """The routing of the generated tokens of the replies where ``keep`` is true (one flag per reply)."""
        if self.routing is None or self.token_rows is None:
            raise ValueError("this batch was generated without routing; pass with_routing=True")
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if keep.numel() != len(self.replies):
            raise ValueError(f"got {keep.numel()} flags for {len(self.replies)} replies")
        return self.routing.select(keep[self.token_rows])


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _reply_lengths(new_tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """Per row, the number of generated tokens up to and including the first end-of-sequence token."""
    num_new = new_tokens.shape[1]
    if not eos or num_new == 0:
        return torch.full((new_tokens.shape[0],), num_new, dtype=torch.long)
    is_eos = torch.isin(new_tokens, torch.tensor(sorted(eos), dtype=new_tokens.dtype))
    first = is_eos.int().argmax(dim=1) + 1  # argmax returns the first maximum
    return torch.where(is_eos.any(dim=1), first, torch.full_like(first, num_new))


def _trim(new_tokens: torch.Tensor, eos: set[int]) -> list[list[int]]:
    """Generated ids per row up to and including the first end-of-sequence token."""
    lengths = _reply_lengths(new_tokens, eos).tolist()
    return [row[:n] for row, n in zip(new_tokens.tolist(), lengths)]


class _GenerationCapture:
    """Router hooks that keep, for each forward call of ``generate``, the routing of the last position of every
    sequence (the position that produces the next token), with the router's probabilities for those rows only."""

    def __init__(self, layers: list[MoELayer], batch_size: int):
        self.layers = layers
        self.batch_size = batch_size
        self._steps: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in layers]

    def hook(self, layer: MoELayer):
        def hook(module: nn.Module, args, output):
            first, weights, indices = output
            n = indices.shape[0]
            if n % self.batch_size:
                raise ValueError(f"a forward call routed {n} positions, not a multiple of batch size {self.batch_size}")
            per_seq = n // self.batch_size
            # flat rows are batch-major: the last position of sequence b is row b * per_seq + per_seq - 1
            last = slice(per_seq - 1, None, per_seq)
            with torch.no_grad():
                probs = layer.router_probabilities(first[last])
            idx = indices[last].to(compact_index_dtype(layer.num_experts))
            self._steps[layer.index].append((idx, weights[last].detach(), probs))
            return None

        return hook

    @property
    def num_calls(self) -> int:
        counts = {len(s) for s in self._steps}
        if len(counts) != 1:
            raise RuntimeError(f"MoE layers recorded different numbers of forward calls: {sorted(counts)}")
        return counts.pop()

    def routing(self) -> Routing:
        """``N = batch * calls`` rows, row ``b * T + t`` is new token ``t`` of sequence ``b``; moved to the CPU once."""
        stack = lambda rows: torch.stack(rows, dim=1).flatten(0, 1).cpu()  # [B, T, ...] -> [B*T, ...]  # noqa: E731
        return Routing(
            [stack([s[0] for s in steps]) for steps in self._steps],
            [stack([s[1] for s in steps]) for steps in self._steps],
            [stack([s[2] for s in steps]) for steps in self._steps],
        )


@contextlib.contextmanager
def _capture_generation(model: nn.Module, batch_size: int) -> Iterator[_GenerationCapture]:
    layers = moe_layers(model)
    capture = _GenerationCapture(layers, batch_size)
    handles = [layer.router.register_forward_hook(capture.hook(layer)) for layer in layers]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the RNGs used by sampling without disturbing the caller's RNG state."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _generation_mode(model: nn.Module, tokenizer) -> Iterator[None]:
    """Eval mode, left padding and no router logits for the duration of generation; all restored afterwards.

    A model loaded (or left by training) with ``output_router_logits=True`` computes its load-balancing loss in every
    forward, which fails on left-padded batches in transformers; inference needs no router logits."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token) first")
    was_training, padding_side = model.training, tokenizer.padding_side
    configs = _router_logit_configs(model)
    saved = [c.output_router_logits for c in configs]
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position: pad on the left
    try:
        for config in configs:
            config.output_router_logits = False
        yield
    finally:
        for config, value in zip(configs, saved):
            config.output_router_logits = value
        model.train(was_training)
        tokenizer.padding_side = padding_side


def _router_logit_configs(model: nn.Module) -> list:
    """The model's configs that carry ``output_router_logits`` (the config and its text config, once each)."""
    from ..moe.discovery import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return []
    candidates = [config, config.get_text_config() if hasattr(config, "get_text_config") else config]
    unique = {id(c): c for c in candidates if hasattr(c, "output_router_logits")}
    return list(unique.values())


def _check_settings(batch_size: int, max_new_tokens: int, min_new_tokens: int) -> None:
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in 0..max_new_tokens, got {min_new_tokens}")


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    with_routing: bool = False,
    rows: Sequence[int] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> GenerationBatch:
    """Generate replies to one batch of chat conversations in a single ``generate`` call.

    Greedy by default; with ``do_sample=True`` sampling uses ``temperature`` and ``top_p`` only (a checkpoint's own
    ``top_k`` is switched off, so settings mean the same on every model) and is seeded with ``seed`` (the caller's RNG
    state is restored afterwards). ``rows`` labels the conversations in the returned batch (default ``0..len-1``).
    ``chat_template_kwargs`` are extra chat-template variables (e.g. ``{"enable_thinking": False}``).
    """
    if not conversations:
        raise ValueError("no conversations to generate replies to")
    _check_settings(len(conversations), max_new_tokens, min_new_tokens)
    check_chat_template_kwargs(chat_template_kwargs)
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    with _generation_mode(model, tokenizer):
        texts = [render_chat(tokenizer, c, chat_template_kwargs=chat_template_kwargs) for c in conversations]
        # the chat template already holds the special tokens (BOS, ...): do not add them twice
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kwargs = _generate_kwargs(tokenizer, eos, max_new_tokens, min_new_tokens, do_sample, temperature, top_p)
        with _seeded(seed, device) if do_sample else contextlib.nullcontext():
            if with_routing:
                with _capture_generation(model, len(texts)) as capture:
                    output = model.generate(**inputs, **kwargs)
            else:
                output = model.generate(**inputs, **kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()
    kept = _trim(new_tokens, eos)
    batch = GenerationBatch(
        rows=list(rows) if rows is not None else list(range(len(texts))),
        replies=tokenizer.batch_decode(kept, skip_special_tokens=True),
        reply_token_ids=kept,
    )
    if with_routing:
        batch.routing, batch.token_rows = _kept_routing(capture, kept)
    return batch


def _generate_kwargs(tokenizer, eos, max_new_tokens, min_new_tokens, do_sample, temperature, top_p) -> dict:
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos) or None,
    )
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=None)
    else:
        # unset the sampling knobs a checkpoint's generation_config may carry, so greedy means greedy
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_replies(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    with_routing: bool = False,
    progress: bool = True,
    desc: str = "generating",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[GenerationBatch]:
    """Generate replies to chat conversations in batches, optionally with the routing of the generated tokens.

    Greedy by default; with ``do_sample=True`` batch ``i`` is seeded with ``seed + i`` so runs repeat.
    Yields one :class:`GenerationBatch` per batch, so callers can accumulate statistics with constant memory.
    """
    _check_settings(batch_size, max_new_tokens, min_new_tokens)
    starts = range(0, len(conversations), batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc=desc, disable=not progress, unit="batch")):
        rows = list(range(start, min(start + batch_size, len(conversations))))
        yield generate_batch(
            model,
            tokenizer,
            [conversations[i] for i in rows],
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed + batch_index,
            with_routing=with_routing,
            rows=rows,
            chat_template_kwargs=chat_template_kwargs,
        )


def _kept_routing(capture: _GenerationCapture, kept: list[list[int]]) -> tuple[Routing, torch.Tensor]:
    """Routing of the kept generated tokens (rows concatenated in batch order) and each token's batch position."""
    batch_size = len(kept)
    routing = capture.routing()
    # generate stops early when all sequences finished: the capture saw one call per produced token
    produced = capture.num_calls
    lengths = torch.tensor([len(k) for k in kept])
    keep = torch.arange(produced).unsqueeze(0) < lengths.unsqueeze(1)  # [B, produced]
    token_rows = torch.arange(batch_size).unsqueeze(1).expand(-1, produced)[keep]
    return routing.select(keep.reshape(-1)), token_rows
