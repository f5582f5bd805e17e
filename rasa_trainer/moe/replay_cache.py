"""The expert phase's routing cache: the routing every training example received at the start of the phase.

Stored flat, one row per real token of every example (``indices [T, L, k]`` as int16 and, when they are replayed,
``weights [T, L, k]``), with per-example offsets, so it can live off the accelerator and be saved in a checkpoint as
safetensors. Per token it takes ``L * k * (2 + weight bytes)`` bytes, or ``L * k * 2`` without weights (replay with
recomputed weights, and the run-start routing kept for the routing-shift metric): in bf16, 768 + 768 B for
Qwen3-30B-A3B (48 layers, top-8) and 256 + 256 B for OLMoE-1B-7B (16 layers, top-8).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from safetensors.torch import load_file

from .routing import Routing, real_tokens, record_routing
from ..utils import atomic_save_safetensors


class RoutingCache:
    """Per-example routing of real tokens, addressed by dataset row."""

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor | None, offsets: torch.Tensor):
        self.indices, self.weights, self.offsets = indices, weights, offsets

    @property
    def num_examples(self) -> int:
        return int(self.offsets.numel() - 1)

    def nbytes_per_token(self) -> int:
        per_token = self.indices[0].numel() * self.indices.element_size()
        if self.weights is not None:
            per_token += self.weights[0].numel() * self.weights.element_size()
        return int(per_token)

    @classmethod
    @torch.no_grad()
    def record(cls, model, batches: Iterable[dict], device: str | torch.device = "cpu",
               forward: Callable | None = None, keep_weights: bool = True) -> "RoutingCache":
        """Run ``model`` over batches (in dataset order, each with ``input_ids`` and ``attention_mask``) and keep the
        routing of every real token (indices only with ``keep_weights=False``)."""
        indices, weights, lengths = [], [], []
        for batch in batches:
            with record_routing(model, probabilities=False, device=device) as recorder:
                (forward or _plain_forward)(model, batch)
            routing = real_tokens(recorder.routing(), batch["attention_mask"].cpu())
            indices.append(routing.stacked_indices())
            if keep_weights:
                weights.append(routing.stacked_weights())
            lengths.extend(batch["attention_mask"].sum(dim=1).tolist())
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        return cls(torch.cat(indices), torch.cat(weights) if keep_weights else None, offsets)

    def batch_routing(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> Routing:
        """A :class:`Routing` for a padded batch of the given dataset rows (padding gets weight 0; all weights are 0
        when the cache holds no weights)."""
        rows = rows.tolist()
        mask = attention_mask.bool().cpu()
        lengths = mask.sum(dim=1).tolist()
        pieces = []
        for b, row in enumerate(rows):
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            if end - start != lengths[b]:
                raise RuntimeError(
                    f"dataset row {row} has {lengths[b]} real tokens in the batch but {end - start} in the routing "
                    f"cache; the training data changed after the cache was recorded"
                )
            pieces.append(slice(start, end))
        num_tokens, (num_layers, k) = mask.numel(), self.indices.shape[1:]
        flat_idx = torch.arange(k, dtype=self.indices.dtype).expand(num_tokens, num_layers, k).clone()
        flat_w = torch.zeros(num_tokens, num_layers, k, dtype=self.weights.dtype if self.weights is not None else torch.float32)
        flat = mask.reshape(-1)
        flat_idx[flat] = torch.cat([self.indices[p] for p in pieces])
        if self.weights is not None:
            flat_w[flat] = torch.cat([self.weights[p] for p in pieces])
        return Routing([flat_idx[:, l] for l in range(num_layers)], [flat_w[:, l] for l in range(num_layers)])

    def save(self, path: str, metadata: dict[str, str] | None = None) -> None:
        tensors = {"indices": self.indices.contiguous(), "offsets": self.offsets}
        if self.weights is not None:
            tensors["weights"] = self.weights.contiguous()
        atomic_save_safetensors(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str) -> "RoutingCache":
        tensors = load_file(path)
        return cls(tensors["indices"], tensors.get("weights"), tensors["offsets"])


def _plain_forward(model, batch: dict) -> None:
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=1)


def assignment_shift(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Share of top-k assignments in ``current [N, L, k]`` whose expert is not in the ``reference`` top-k set of the
    same token and layer."""
    return shift_from_counts(kept_assignments(current, reference), current.numel())


def kept_assignments(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """How many top-k assignments of ``current [N, L, k]`` keep their expert in the ``reference`` top-k set of the same
    token and layer (an int64 count on the CPU: counts of token shares add up exactly across processes)."""
    # token chunks bound the [chunk, L, k, k] comparison (all tokens at once: ~9 KB per token at L=48, k=8)
    kept = torch.zeros((), dtype=torch.long)
    for start in range(0, current.shape[0], _SHIFT_CHUNK_TOKENS):
        now = current[start:start + _SHIFT_CHUNK_TOKENS].long()
        then = reference[start:start + _SHIFT_CHUNK_TOKENS].long().to(now.device)
        kept += (now.unsqueeze(-1) == then.unsqueeze(-2)).any(dim=-1).sum().cpu()
    return kept


def shift_from_counts(kept: torch.Tensor, total: int) -> torch.Tensor:
    """The routing shift ``1 - kept / total`` of ``kept`` assignments out of ``total`` (0 without any)."""
    if total == 0:
        return torch.tensor(0.0)
    # the share in fp32, as the mean of the kept flags was (exact while the count is below 2**24)
    return 1.0 - kept.float() / total


_SHIFT_CHUNK_TOKENS = 4096
