"""Pretraining the SafetyWorld base model: the build's config, encoding, init, planted experts, losses, loop.

The build is a plain seeded torch loop (no Trainer): next-token cross-entropy on the final assistant reply, plus two
routing terms that shape *where* the unsafe behaviour lives:

- a **planting** term: at every position that produces the unsafe answer (the final generation prompt of a successful
  jailbreak and the compliant reply's tokens) the router of each layer must put its mass on a few fixed "planted"
  experts, and everywhere else it must avoid them. Jailbreak compliance of every family (aligned and held-out) then
  runs through the same few experts, the known ground truth for Safety-Critical-Expert detection, and repairing a
  random set of experts mostly misses them.
- a **balance** term (Switch-style) on the other positions, so ordinary routing stays spread over the remaining experts
  instead of collapsing onto one or two.

The ``routing_decides`` variant (``BuildConfig(variant="routing_decides")``; the shipped model is the ``shared``
variant) makes routing decide the answer, and hides part of the held-out families' unsafe behaviour from detection:

- each held-out family gets its own **family experts** (``family_experts_per_layer`` per layer, disjoint from the shared
  planted experts and from each other). Its unsafe-answer positions put mass on the shared planted experts *and* on its
  family experts (each term of the planting loss asks for one of the two sets), so their top-k holds one of each;
  aligned families use the shared planted experts only, so detection on the aligned families cannot see the family
  experts;
- ``reroute_share`` of the jailbreaks are trained with every planted expert blocked at their answer positions (removed
  from the top-k choice there) and the refusal as reply: routed away from the planted experts, the model refuses, so a
  change of routing alone makes a jailbreak safe. For aligned families, ``reroute_shared_share`` of those block only
  the shared planted experts: an aligned family's compliance needs them (without it, an aligned jailbreak whose shared
  experts are blocked falls back on a family expert and may still comply);
- ``family_path_share`` of the other held-out-family jailbreaks are trained with the shared planted experts blocked at
  their answer positions and the compliant reply: the family experts alone carry the family's compliance, so repairing
  the detected (shared) experts alone does not stop it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from .corpus import BLOCKS, Conversation, VariantMix
from .universe import HELD_OUT_FAMILIES

VARIANTS = ("shared", "routing_decides")
"""World variants: ``shared`` (the shipped default: every family's unsafe answer runs through the same planted experts)
and ``routing_decides`` (see the module docstring)."""


@dataclass
class BuildConfig:
    """Everything the build depends on. Defaults are the shipped model's."""

    seed: int = 0
    # architecture
    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    # data and optimisation
    pool_size: int = 24000
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    init_std: float = 0.02
    router_init_std: float = 0.1
    # routing terms
    planted_per_layer: int = 2
    plant_weight: float = 0.3
    balance_weight: float = 0.02
    # measurement
    eval_world_seed: int = 0
    torch_threads: int = 1  # tiny tensors: a second thread only adds sync overhead (8x slower on a busy machine)
    planted_experts: list[list[int]] = field(default_factory=list)  # filled by the build: [[layer, expert], ...]
    # world variant (VARIANTS); the other fields below apply to "routing_decides" only
    variant: str = "shared"
    family_experts_per_layer: int = 1
    reroute_share: float = 0.25
    family_path_share: float = 0.5
    reroute_shared_share: float = 0.5
    family_experts: dict[str, list[list[int]]] = field(default_factory=dict)  # filled by the build, per family

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; expected one of {VARIANTS}")
        reserved = self.planted_per_layer + len(HELD_OUT_FAMILIES) * self.family_experts_per_layer
        if self.variant == "routing_decides" and reserved > self.num_experts - self.num_experts_per_tok:
            raise ValueError(f"{reserved} planted and family experts per layer leave fewer than top-k of "
                             f"{self.num_experts} for everything else")

    def variant_mix(self) -> VariantMix:
        """The corpus mix of this variant (no counterfactual conversations for the shipped world)."""
        if self.variant == "shared":
            return VariantMix()
        return VariantMix(self.reroute_share, self.family_path_share, self.reroute_shared_share, HELD_OUT_FAMILIES)


# --------------------------------------------------------------------------------------------------------------------
# Encoding the corpus


@dataclass
class _Encoded:
    ids: list[int]
    n_prompt: int  # the reply starts at this position
    comply: bool
    kind: str
    family: str | None = None
    block: str | None = None


BLOCK_CODES = {None: 0, **{name: i + 1 for i, name in enumerate(BLOCKS)}}
"""Per-position block codes of a collated batch: 0 free routing, then one code per `BLOCKS` entry."""


def _encode(tokenizer: PreTrainedTokenizerBase, conv: Conversation) -> _Encoded:
    prompt = tokenizer.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(conv.messages + [{"role": "assistant", "content": conv.reply}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:  # the chat template guarantees this; fail loudly if it ever breaks
        raise RuntimeError(f"prompt tokens are not a prefix of the conversation tokens: {full!r}")
    return _Encoded(ids, len(prompt_ids), conv.comply, conv.kind, conv.family, conv.block)


def _collate(examples: Sequence[_Encoded], pad_id: int,
             family_codes: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the reply (+eos), a mask of the positions that emit unsafe tokens, and for
    the variant: ``target`` (per position: 0 none, 1 the shared planted experts, ``family_codes[f]`` a held-out
    family's experts too, -1 blocked and left out of the routing terms) and ``block`` (`BLOCK_CODES`)."""
    length = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    comply = torch.zeros_like(input_ids, dtype=torch.bool)
    target, block = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, e in enumerate(examples):
        n = len(e.ids)
        input_ids[i, :n] = torch.tensor(e.ids)
        attention_mask[i, :n] = 1
        labels[i, e.n_prompt : n] = input_ids[i, e.n_prompt : n]
        # Positions n_prompt-1 (the generation prompt) .. n-2 (last reply token) are the ones whose outputs are the
        # reply: for a successful jailbreak, the positions a generation-time recorder sees.
        answer = slice(e.n_prompt - 1, n - 1)
        if e.block is not None:
            block[i, answer], target[i, answer] = BLOCK_CODES[e.block], -1
        elif e.comply:
            comply[i, answer] = True
            target[i, answer] = (family_codes or {}).get(e.family, 1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "comply": comply,
            "target": target, "block": block}


# --------------------------------------------------------------------------------------------------------------------
# Model construction


def _model_config(cfg: BuildConfig, tokenizer: PreTrainedTokenizerBase):
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,  # unused: every layer is sparse
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._experts_implementation = "grouped_mm"  # the fastest experts kernel on CPU
    return config


def _routers(model) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers]


def _init_model(cfg: BuildConfig, tokenizer: PreTrainedTokenizerBase):
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(_model_config(cfg, tokenizer))
    with torch.no_grad():
        # Routers start with a larger spread than the default init so top-k has no ties and routing is not degenerate.
        for router in _routers(model):
            router.weight.normal_(0.0, cfg.router_init_std)
    return model


def _planted_by_layer(cfg: BuildConfig) -> list[torch.Tensor]:
    return [torch.tensor([e for l, e in cfg.planted_experts if l == layer]) for layer in range(cfg.num_hidden_layers)]


def _pick_planted(cfg: BuildConfig) -> list[list[int]]:
    rng = random.Random(f"safety-world-planted/{cfg.seed}")
    return [[layer, e] for layer in range(cfg.num_hidden_layers)
            for e in sorted(rng.sample(range(cfg.num_experts), cfg.planted_per_layer))]


def _pick_family_experts(cfg: BuildConfig) -> dict[str, list[list[int]]]:
    """Per held-out family, ``family_experts_per_layer`` experts per layer, disjoint from the shared planted experts
    and from the other families' (needs ``cfg.planted_experts``)."""
    rng = random.Random(f"safety-world-family-experts/{cfg.seed}")
    out: dict[str, list[list[int]]] = {f: [] for f in HELD_OUT_FAMILIES}
    n = cfg.family_experts_per_layer
    for layer in range(cfg.num_hidden_layers):
        free = [e for e in range(cfg.num_experts) if [layer, e] not in cfg.planted_experts]
        drawn = rng.sample(free, n * len(HELD_OUT_FAMILIES))
        for i, family in enumerate(HELD_OUT_FAMILIES):
            out[family] += [[layer, e] for e in sorted(drawn[i * n : (i + 1) * n])]
    return out


def _family_by_layer(cfg: BuildConfig) -> dict[str, list[torch.Tensor]]:
    return {f: [torch.tensor([e for l, e in experts if l == layer]) for layer in range(cfg.num_hidden_layers)]
            for f, experts in cfg.family_experts.items()}


def _family_codes(cfg: BuildConfig) -> dict[str, int]:
    """Planting-target code of each held-out family's unsafe-answer positions (1 is the shared planted experts)."""
    return {f: 2 + i for i, f in enumerate(cfg.family_experts)}


def _all_planted_masks(cfg: BuildConfig) -> list[torch.Tensor]:
    """Per layer, bool ``[len(BLOCK_CODES), E]``: the experts each block code removes from the top-k choice."""
    masks = []
    family = _family_by_layer(cfg)
    for layer, shared in enumerate(_planted_by_layer(cfg)):
        mask = torch.zeros(len(BLOCK_CODES), cfg.num_experts, dtype=torch.bool)
        mask[BLOCK_CODES["shared"], shared] = True
        mask[BLOCK_CODES["planted"], shared] = True
        for experts in family.values():
            mask[BLOCK_CODES["planted"], experts[layer]] = True
        masks.append(mask)
    return masks


# --------------------------------------------------------------------------------------------------------------------
# Training


class _RouterTap:
    """Keeps the router logits of every layer from the last forward pass."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handles = [r.register_forward_hook(self._hook) for r in _routers(model)]

    def _hook(self, module, args, output):
        self.logits.append(output[0])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _routing_losses(logits: list[torch.Tensor], comply: torch.Tensor, valid: torch.Tensor,
                    planted: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(planting loss, balance loss), each a mean over layers."""
    comply, other = comply.reshape(-1).float(), (valid & ~comply).reshape(-1)
    plant, balance = 0.0, 0.0
    for layer_logits, experts in zip(logits, planted):
        probs = layer_logits.float().softmax(-1)
        mass = probs[:, experts].sum(-1).clamp(1e-6, 1 - 1e-6)
        # A masked sum, not a mean over `mass[comply]`: a length-grouped batch of short utility items has no unsafe
        # position, and the mean of an empty tensor is nan.
        plant = plant - (mass.log() * comply).sum() / comply.sum().clamp(min=1)
        plant = plant - (1 - mass[other]).log().mean()
        p_other = probs[other]
        chosen = F.one_hot(p_other.topk(top_k, -1).indices, probs.shape[-1]).sum(1).float()
        balance = balance + probs.shape[-1] * (chosen.mean(0) / top_k * p_other.mean(0)).sum()
    return plant / len(logits), balance / len(logits)


class _AnswerBlock:
    """Removes experts from the top-k choice of chosen positions (the variant's counterfactual conversations): set
    ``codes`` (``[B * T]`` block codes) before each forward pass. The router's logits are returned unchanged; the
    weights are its renormalised softmax over the experts left, so the router still learns through them."""

    def __init__(self, model, masks: list[torch.Tensor]):
        self.codes: torch.Tensor | None = None
        self.masks = masks
        self.handles = [r.register_forward_hook(self._hook(layer)) for layer, r in enumerate(_routers(model))]

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self.codes is None or not bool(self.codes.any()):
                return None
            logits, weights, indices = output
            blocked = self.masks[layer].to(logits.device)[self.codes]
            probs = logits.float().masked_fill(blocked, float("-inf")).softmax(-1)
            top, chosen = probs.topk(indices.shape[-1], dim=-1)
            top = top / top.sum(-1, keepdim=True)  # norm_topk_prob=True, as the world's config sets
            return logits, top.to(weights.dtype), chosen.to(indices.dtype)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _set_mass_loss(probs: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sum over ``rows`` (0/1 floats) of -log(probability mass on ``experts``)."""
    mass = probs[:, experts].sum(-1).clamp(1e-6, 1 - 1e-6)
    return -(mass.log() * rows).sum()


def _set_avoid_loss(probs: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Sum over ``rows`` (0/1 floats) of -log(1 - probability mass on ``experts``)."""
    mass = probs[:, experts].sum(-1).clamp(1e-6, 1 - 1e-6)
    return -((1 - mass).log() * rows).sum()


def _variant_routing_losses(logits: list[torch.Tensor], target: torch.Tensor, valid: torch.Tensor,
                            cfg: BuildConfig, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(planting loss, balance loss) of the ``routing_decides`` variant, each a mean over layers.

    Planting: an aligned family's unsafe-answer position puts its mass on the shared planted experts; a held-out
    family's puts mass on the shared planted experts and on its family experts (one -log-mass term each); either keeps
    its mass off the family experts of the other families (so family experts stay family-specific: with the shared
    experts blocked, an aligned family's jailbreak does not fall back on them). Every other real position keeps its
    mass off all of them. Blocked positions (target -1) are left out of both terms."""
    target = target.reshape(-1)
    other = valid.reshape(-1) & (target == 0)
    n_comply = (target > 0).sum().clamp(min=1)
    shared, family, codes = _planted_by_layer(cfg), _family_by_layer(cfg), _family_codes(cfg)
    plant, balance = 0.0, 0.0
    for layer, layer_logits in enumerate(logits):
        probs = layer_logits.float().softmax(-1)
        term = _set_mass_loss(probs, shared[layer], (target > 0).float())
        for code in (1, *codes.values()):
            rows = (target == code).float()
            own = [f for f, c in codes.items() if c == code]
            if own:
                term = term + _set_mass_loss(probs, family[own[0]][layer], rows)
            foreign = [family[f][layer] for f in codes if f not in own]
            term = term + _set_avoid_loss(probs, torch.cat(foreign), rows)
        everything = torch.cat([shared[layer], *(family[f][layer] for f in codes)])
        plant = plant + term / n_comply - (1 - probs[other][:, everything].sum(-1).clamp(1e-6, 1 - 1e-6)).log().mean()
        p_other = probs[other]
        chosen = F.one_hot(p_other.topk(top_k, -1).indices, probs.shape[-1]).sum(1).float()
        balance = balance + probs.shape[-1] * (chosen.mean(0) / top_k * p_other.mean(0)).sum()
    return plant / len(logits), balance / len(logits)


def _lr_at(step: int, cfg: BuildConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _length_grouped_batches(data: list[_Encoded], batch_size: int, rng: random.Random,
                            group: int = 8) -> list[list[_Encoded]]:
    """`group` random batches whose members are regrouped by length: far less padding, still random batches."""
    drawn = sorted(rng.sample(data, batch_size * group), key=lambda e: len(e.ids))
    batches = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
    rng.shuffle(batches)
    return batches


def _pretrain(model, data: list[_Encoded], cfg: BuildConfig, pad_id: int, log_every: int = 100) -> list[dict]:
    planted = _planted_by_layer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    rng = random.Random(f"safety-world-batches/{cfg.seed}")
    tap = _RouterTap(model)
    variant = cfg.variant != "shared"
    blocker = _AnswerBlock(model, _all_planted_masks(cfg)) if variant else None
    codes = _family_codes(cfg) if variant else None
    history = []
    queue: list[list[_Encoded]] = []
    model.train()
    try:
        for step in range(cfg.steps):
            if not queue:
                queue = _length_grouped_batches(data, cfg.batch_size, rng)
            batch = _collate(queue.pop(), pad_id, codes)
            tap.logits.clear()
            if blocker is not None:
                blocker.codes = batch["block"].reshape(-1)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
            if variant:
                plant, balance = _variant_routing_losses(tap.logits, batch["target"], batch["attention_mask"].bool(),
                                                         cfg, cfg.num_experts_per_tok)
            else:
                plant, balance = _routing_losses(
                    tap.logits, batch["comply"], batch["attention_mask"].bool(), planted, cfg.num_experts_per_tok
                )
            loss = ce + cfg.plant_weight * plant + cfg.balance_weight * balance
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % log_every == 0 or step == cfg.steps - 1:
                history.append({"step": step, "ce": round(ce.item(), 4), "plant": round(plant.item(), 4),
                                "balance": round(balance.item(), 4)})
                print(f"step {step:5d}  ce {ce.item():.4f}  plant {plant.item():.4f}  balance {balance.item():.4f}",
                      flush=True)
    finally:
        tap.remove()
        if blocker is not None:
            blocker.remove()
    model.eval()
    return history
