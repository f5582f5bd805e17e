"""Routing diagnostics of an aligned model against its base model: the routing shift of prompts, and greedy
generation under the base model's routing (the aligned model's replies when every router is forced to route as the
base model routes, step by step, in lockstep). Used by :func:`rasa_trainer.evaluation.evaluate.evaluate_safety`."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..data.contract import as_messages
from ..detection.generation import GenerationBatch, _eos_ids, _generation_mode, _trim, render_chat
from ..moe.discovery import moe_layers
from ..moe.routing import REPLAY_WEIGHT_MODES, Routing, record_routing, replay_routing

__all__ = ["RoutingShift", "generate_with_base_routing", "routing_shift"]

Conversation = list[dict[str, Any]]


def _check_same_moe_layout(model: nn.Module, base_model: nn.Module) -> None:
    """The base model must be this model before alignment: the same family and the same MoE layers. Another family
    of equal shapes would compare expert numbers that name different experts."""
    family = lambda m: getattr(getattr(m, "config", None), "model_type", None)  # noqa: E731
    if family(model) != family(base_model):
        raise ValueError(f"base_model is a {family(base_model)!r} model but the model is {family(model)!r}: the "
                         "routing comparison needs the same model before alignment (expert numbers of another family "
                         "name other experts); pass the checkpoint the aligned model was trained from")
    layout = lambda m: [(layer.num_experts, layer.top_k) for layer in moe_layers(m)]  # noqa: E731
    mine, base = layout(model), layout(base_model)
    if mine != base:
        raise ValueError(f"base_model has MoE layers (experts, top-k) {base} but the model has {mine}; pass the "
                         f"model before alignment, with the same architecture")


def _check_weight_mode(weights: str) -> None:
    if weights not in REPLAY_WEIGHT_MODES:
        raise ValueError(f"forced_routing_weights={weights!r}; expected one of {REPLAY_WEIGHT_MODES}")



# --------------------------------------------------------------------------------------------------------------------
# Shared forward-pass plumbing (mirrors what `generate` does, so the routing seen here is the routing of generation)
# --------------------------------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _inference(model: nn.Module, base_model: nn.Module, tokenizer) -> Iterator[None]:
    """Eval mode for both models and left padding, restored afterwards (also when ``base_model is model``)."""
    with _generation_mode(model, tokenizer), _generation_mode(base_model, tokenizer), torch.no_grad():
        yield


def _encode(tokenizer, conversations: Sequence[Conversation],
            chat_template_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded token ids of the rendered prompts (the chat template holds the special tokens already)."""
    texts = [render_chat(tokenizer, c, chat_template_kwargs=chat_template_kwargs) for c in conversations]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` computes them: left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    # only the last position's logits are needed; `generate` asks for the same
    accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if accepts else {}


def _cache_argument(model: nn.Module) -> str:
    """The name ``forward`` takes the KV cache by: ``cache`` from transformers 5.25 on (``past_key_values`` is
    deprecated there, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------------------------------------------------
# Routing shift
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingShift:
    """Routing shift of a model against a base model on a set of prompts.

    Attributes:
        shifted: per conversation, the number of the model's top-k assignments (token, layer, slot) whose expert is
            not in the base model's top-k set for that token and layer (``[num_conversations]``, int64).
        assignments: per conversation, the number of assignments compared (real prompt tokens x layers x k).
        shifted_by_layer: per MoE layer, shifted assignments over all conversations (``[num_layers]``).
        assignments_by_layer: per MoE layer, assignments compared.
    """

    shifted: torch.Tensor
    assignments: torch.Tensor
    shifted_by_layer: torch.Tensor
    assignments_by_layer: torch.Tensor

    @property
    def share(self) -> float | None:
        """Share of shifted assignments over everything compared."""
        total = int(self.assignments.sum())
        return int(self.shifted.sum()) / total if total else None

    @property
    def by_layer(self) -> list[float]:
        """Share of shifted assignments per MoE layer."""
        return (self.shifted_by_layer.double() / self.assignments_by_layer.clamp(min=1).double()).tolist()

    def share_by_group(self, groups: Sequence[str]) -> dict[str, float | None]:
        """Share of shifted assignments per group label (one label per conversation, e.g. the attack family);
        ``None`` for a group with nothing to compare."""
        out = {}
        for group in dict.fromkeys(groups):
            rows = torch.tensor([g == group for g in groups])
            total = int(self.assignments[rows].sum())
            out[group] = int(self.shifted[rows].sum()) / total if total else None
        return out


@torch.no_grad()
def routing_shift(
    model: nn.Module,
    base_model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]] | str],
    *,
    batch_size: int = 8,
    progress: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> RoutingShift:
    """Compare the routing of ``model`` with that of ``base_model`` on the prompt tokens of ``conversations``.

    Each batch is rendered with the chat template (generation prompt included), left-padded, and run once through
    each model with :func:`~rasa_trainer.moe.routing.record_routing` (teacher forcing: the prompt only, nothing generated).
    Padding positions are excluded. The comparison is a set comparison per (token, layer): an assignment counts as
    shifted when its expert is absent from the base model's top-k, whatever the slot order.
    """
    _check_same_moe_layout(model, base_model)
    conversations = [as_messages(c) for c in conversations]
    parts = []
    with _inference(model, base_model, tokenizer):
        starts = range(0, len(conversations), batch_size)
        for start in tqdm(starts, desc="routing shift", disable=not progress, unit="batch"):
            inputs = _encode(tokenizer, conversations[start:start + batch_size], chat_template_kwargs)
            parts.append(_batch_shift(model, base_model, inputs))
    if not parts:
        raise ValueError("no conversations to compare the routing on")
    return RoutingShift(
        shifted=torch.cat([p[0] for p in parts]),
        assignments=torch.cat([p[1] for p in parts]),
        shifted_by_layer=sum(p[2] for p in parts),
        assignments_by_layer=sum(p[3] for p in parts),
    )


def _prompt_routing(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Top-k indices ``[B, S, L, k]`` of every position of one teacher-forced forward pass, on the CPU."""
    device = _device(model)
    mask = inputs["attention_mask"].to(device)
    with record_routing(model, probabilities=False, device="cpu") as recorder:
        model(input_ids=inputs["input_ids"].to(device), attention_mask=mask, position_ids=_position_ids(mask),
              use_cache=False, **_forward_kwargs(model))
    routing = recorder.routing()
    batch, seq = inputs["input_ids"].shape
    return routing.stacked_indices().reshape(batch, seq, routing.num_layers, -1)


def _batch_shift(model, base_model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row shifted / compared assignments, and per layer shifted / compared, for one batch."""
    mine = _prompt_routing(model, inputs).long()
    base = _prompt_routing(base_model, inputs).long()
    in_base = (mine.unsqueeze(-1) == base.unsqueeze(-2)).any(-1)  # [B, S, L, k]: expert among the base's top-k
    real = inputs["attention_mask"].bool()[:, :, None, None].expand_as(in_base)
    shifted = ~in_base & real
    num_layers, top_k = mine.shape[2], mine.shape[3]
    per_row = real.sum(dim=(1, 2, 3))
    per_layer = inputs["attention_mask"].sum() * top_k * torch.ones(num_layers, dtype=torch.long)
    return shifted.sum(dim=(1, 2, 3)), per_row, shifted.sum(dim=(0, 1, 3)), per_layer


# --------------------------------------------------------------------------------------------------------------------
# Generation under the base model's routing (lockstep greedy decoding)
# --------------------------------------------------------------------------------------------------------------------


def generate_with_base_routing(
    model: nn.Module,
    base_model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, Any]] | str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    weights: str = "recompute",
    progress: bool = True,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[GenerationBatch]:
    """Greedy replies of ``model`` while every router is forced onto the expert choice of ``base_model``.

    Lockstep decoding, one batch at a time, each model with its own KV cache: at every step the base model runs on
    the current tokens with :func:`~rasa_trainer.moe.routing.record_routing`, then ``model`` runs on the same tokens under
    :func:`~rasa_trainer.moe.routing.replay_routing` with that routing, and the argmax of ``model``'s logits is the next
    token of both. Both models see identical input shapes at every step (replay maps routing per forward call).
    Left padding, attention masks and position ids follow ``generate`` exactly, so with ``base_model is model`` the
    replies equal those of :func:`~rasa_trainer.detection.generation.generate_replies` (greedy, no logits processors; on an
    accelerator kernels may round differently).

    Args:
        weights: ``"recompute"`` (default): the model's own router weighs the base model's expert choice, so only
            *which* experts run is the base model's, and the comparison isolates the routing shortcut from the model's
            learned weighting. ``"cached"``: the base model's top-k weights are used too.

    Yields :class:`~rasa_trainer.detection.generation.GenerationBatch` objects (no routing attached). The arguments
    are checked at the call, before the first batch is asked for.
    """
    _check_same_moe_layout(model, base_model)
    _check_weight_mode(weights)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    conversations = [as_messages(c) for c in conversations]
    return _batches_with_base_routing(model, base_model, tokenizer, conversations, batch_size, max_new_tokens,
                                      weights, progress, chat_template_kwargs)


def _batches_with_base_routing(model, base_model, tokenizer, conversations, batch_size, max_new_tokens, weights,
                               progress, chat_template_kwargs=None) -> Iterator[GenerationBatch]:
    eos = _eos_ids(model, tokenizer)
    starts = range(0, len(conversations), batch_size)
    for start in tqdm(starts, desc="forced routing", disable=not progress, unit="batch"):
        rows = list(range(start, min(start + batch_size, len(conversations))))
        with _inference(model, base_model, tokenizer):
            inputs = _encode(tokenizer, [conversations[i] for i in rows], chat_template_kwargs)
            new_tokens = _lockstep_greedy(model, base_model, inputs, max_new_tokens, weights, eos,
                                          tokenizer.pad_token_id)
        kept = _trim(new_tokens, eos)
        yield GenerationBatch(rows=rows, replies=tokenizer.batch_decode(kept, skip_special_tokens=True),
                              reply_token_ids=kept)


class _Decoder:
    """One model's side of lockstep decoding: its KV cache, attention mask and positions, kept as ``generate`` keeps
    them (an all-ones mask is dropped, as ``generate`` drops it; positions count real tokens only)."""

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor):
        self.model = model
        self.device = _device(model)
        mask = attention_mask.to(self.device)
        self.positions = _position_ids(mask)
        self.mask = None if bool(mask.all()) else mask
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.kwargs = _forward_kwargs(model)
        self.cache_argument = _cache_argument(model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run on the new tokens; return the last position's logits in fp32."""
        # the cache grows in place (DynamicCache.update), so the object passed in is the one to pass next time
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=self.mask, position_ids=self.positions,
                         use_cache=True, **{self.cache_argument: self.cache}, **self.kwargs)
        return out.logits[:, -1].float()

    def advance(self) -> None:
        """Account for one more token per row (finished rows included, as in ``generate``)."""
        self.positions = self.positions[:, -1:] + 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)


def _lockstep_greedy(model, base_model, inputs, max_new_tokens: int, weights: str, eos: set[int],
                     pad_token_id: int) -> torch.Tensor:
    """New tokens ``[B, T]`` of greedy decoding of ``model`` under ``base_model``'s routing; rows that finished are
    filled with the pad token, as ``generate`` does."""
    mine, base = _Decoder(model, inputs["attention_mask"]), _Decoder(base_model, inputs["attention_mask"])
    step_ids = inputs["input_ids"]
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long)
    unfinished = torch.ones(step_ids.shape[0], dtype=torch.bool)
    produced = []
    for step in range(max_new_tokens):
        routing = _base_step(base, step_ids)
        with replay_routing(model, routing, weights=weights):
            logits = mine.forward(step_ids)
        next_ids = torch.where(unfinished, logits.argmax(dim=-1).cpu(), torch.tensor(pad_token_id))
        produced.append(next_ids)
        unfinished &= ~torch.isin(next_ids, eos_ids)
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        step_ids = next_ids.unsqueeze(1)
        mine.advance()
        base.advance()
    return torch.stack(produced, dim=1)


def _base_step(base: _Decoder, step_ids: torch.Tensor) -> Routing:
    """Run the base model on the step's tokens and return its routing of every position (padding included, as replay
    needs one row per routed position)."""
    with record_routing(base.model, probabilities=False) as recorder:
        base.forward(step_ids)
    return recorder.routing()
