"""Activation formulas: the bytes autograd saves for backward in each phase, its transient, the no-grad forward.

Activation formulas (bytes per token of the micro-batch, ``T = batch_size * seq_len``; ``b`` = bytes of ``dtype``;
``f`` = bytes of the LoRA products: 4 (fp32 factors) without autocast, ``b`` under it; ``H`` hidden size; ``Q`` /
``K`` / ``Vd`` = query / key / value widths; ``k`` top-k; ``I`` expert intermediate size; ``act`` = ``3I`` for gated
experts (gate and up halves, activation), ``I`` otherwise; ``E`` experts; ``n`` sequence length; ``r`` LoRA rank;
``s = S / E_tot`` the selected experts' share of the assignments, ``S_l = s * E`` per layer; ``P_e`` parameters of one
expert). They were read off the tensors autograd saves in the transformers 5 implementations (SDPA attention, the
``grouped_mm`` experts kernel, RMSNorms that keep fp32 copies of their inputs) and the repaired forward of
:mod:`rasa_trainer.repairs.layer`, and are checked layer by layer against the tensors autograd really saves
(``tests/memory/test_memory.py``) and as totals against measured training runs (``benchmarks/bench_memory.py``):

- a decoder layer whose weights are frozen but whose input needs a gradient (expert and router phases): attention
  ``8H (two fp32 norm inputs) + 4(Q + K) (q/k norms, where the family has them) + b(2Q + K + Vd) + 4 heads + 4n``;
  MoE block ``4E + 12k + 4 + bk`` (router scores, top-k, the weights the outputs are scaled by) ``+ 32k`` (int64 slot
  and sort indices) ``+ k(1 - s) * b * act`` (assignments to unselected experts, through the kernel); dense MLPs
  ``3b * I_d``. Layers up to the first MoE layer get inputs that need no gradient and save only what their own
  trainable parameters need.
- the selected experts' assignments, ``k * s`` per token and MoE layer, in the expert phase: delta
  ``b(H + act + I)`` (the kernel on the repaired slices keeps its input, gate/up halves, activation, the down
  projection's input) plus the repaired slices ``S_l * P_e * b`` per layer; LoRA (two skinny products per
  projection, never ``B @ A``) ``f(H + I) + 2fr + b*act + bH`` (the inputs of ``x Aᵀ`` in the factors' precision, the
  ``[n, r]`` products, the gate/up halves and activation, the selected rows' outputs) plus, under autocast, the
  16-bit copies of the factors ``S_l * r(d_in + d_out) * b`` per layer. With the repairs frozen (router phase): LoRA
  ``b(act + H)``, delta ``b * act`` plus the repaired slices.
- router phase, every MoE layer: ``bkH`` (the per-slot outputs ``[N*k, H]``, multiplied by differentiable weights)
  ``+ 4H`` (the fp32 router input; ``bH`` under autocast, whose linear casts it back) ``+ 4E``.
- full fine-tuning (reference), per decoder layer: ``b*(8H + 4Q + K + Vd + k*(2H + 4I)) + 8E + 4n + 4 heads + 40k``
  (dense MLP layers: ``+ b*(H + 4I_d)``).
- LM head (expert phase and full fine-tuning, TRL's fused chunked log-probabilities): ``bH`` saved per token; in
  backward one ``[min(T, 4096), 32768]`` buffer in the compute dtype (its width is fixed) and the fp32 gradient of
  the hidden states ``4TH``; without Triton (CPU) the tile's gradient takes about six fp32 temporaries of
  ``[min(T, 4096), min(V, 32768)]`` more; full fine-tuning adds the fp32 gradient of the LM head weight ``4VH``. The
  router phase keeps one position's logits only.
- gradient checkpointing (one checkpoint per decoder layer): ``bH`` per layer per token, plus one layer's saved
  tensors (recomputed in backward) and the LM head.
- backward transient: the larger of the LM head's and one layer's working set (its saved tensors again for the
  gradients flowing through it, one per-slot gradient ``bkH``, the gradient of its output ``bH``; delta: the gradient
  of the repaired slices and its fp32 cast ``S_l * P_e * (b + 4)``; LoRA: the fp32 gradient of one skinny update).
- a forward without gradients while repairs are attached (the phase-start routing record, the router phase's anchor
  pass) takes, per MoE layer, the path the repaired forward takes (:func:`rasa_trainer.repairs.layer.no_grad_working_set`):
  a copy of the fused experts with the repaired slices written in (``E * P_e * b``), or, for a layer of 64 MiB or more
  when it needs less, the per-slot path (``T * k * H * (2b + b_w)``, ``b_w`` the bytes of the product with the top-k
  weights); either way plus the slices built in fp32 (``S_l * largest slice * (b + 12)``, LoRA ``+ 4`` for
  ``B @ A``) and the kernel's ``T * k * b * (2H + 3I)``.
"""

from __future__ import annotations

import math

import torch

from ..repairs.layer import no_grad_working_set

LM_HEAD_VOCAB_TILE = 32768  # TRL's chunked log-probabilities: vocabulary columns per tile
LM_HEAD_TOKEN_TILE = 4096  # ... and token rows per tile


def _activations(model, layers, text_config, b: int, batch_size: int, seq_len: int, selected: int, num_routed: int,
                 checkpointing: bool, expert_tuning: str, lora_rank: int, mixed_precision: bool,
                 schedule: str, device: str, weight_bytes: int | None = None) -> dict:
    """Saved activations, backward transient and no-grad working set per phase (formulas in the module docstring)."""
    T, n = batch_size * seq_len, seq_len
    H = int(text_config.hidden_size)
    V = int(text_config.vocab_size)
    Q, K, Vd, heads = _attention_shapes(text_config)
    by_layer = {layer.layer_index: layer for layer in layers}
    decoder = _decoder_layers(model)
    dense = _dense_intermediate(model, layers, H)
    num_layers = len(decoder)
    first_moe = min(by_layer)
    share = selected / num_routed  # the selected experts' share of the assignments (and of each layer's experts)
    repaired = schedule in ("alternate", "expert_only")  # repairs are attached (and run the per-slot forward)
    lora = expert_tuning == "lora"
    # the LoRA products run in fp32 (the factors' dtype), or in the autocast dtype under mixed precision
    f = b if mixed_precision else 4

    def attention(i: int) -> float:
        """Attention block of a frozen layer whose input needs a gradient: the RMSNorms keep fp32 copies of their
        inputs (the two layer norms, and q/k norms where the family has them), SDPA keeps q, k, v, its output and
        the fp32 log-sum-exp; plus the attention mask."""
        qk_norm = _has_qk_norm(decoder[i])
        return 8 * H + (4 * (Q + K) if qk_norm else 0) + b * (2 * Q + K + Vd) + 4 * heads + 4 * n

    def moe(layer, phase: str, input_grad: bool) -> tuple[float, float, float]:
        """(bytes per token saved, bytes per layer saved, bytes per token of the backward working set) of one MoE
        block in ``phase`` ("expert" / "router") with the base weights frozen."""
        k, inter, E = layer.top_k, _expert_intermediate(layer), layer.num_experts
        gated = bool(getattr(layer.experts, "has_gate", True))
        act = (3 if gated else 1) * inter  # per assignment: the gate/up halves and the activation (gated), or its input
        down_in = inter
        S_l = share * E
        per_expert = sum(getattr(layer.experts, name)[0].numel() for name in layer.expert_parameter_names())
        lora_per_expert = sum(lora_rank * (p.shape[1] + p.shape[2]) for name in layer.expert_parameter_names()
                              if (p := getattr(layer.experts, name)).dim() == 3)
        widest = max(max(getattr(layer.experts, name).shape[1:]) for name in layer.expert_parameter_names())
        sel, unsel = k * share, k * (1 - share)
        index = 32 * k  # int64 slot / sort indices per assignment
        router = 4 * E + 12 * k + 4 + b * k  # fp32 scores, top-k indices and weights; the weights the outputs are scaled by
        per_token = router + index if input_grad else 0.0
        fixed = 0.0
        work = b * k * H  # one per-slot buffer [N * k, H] (the gradient of the per-slot outputs)
        trains_repairs = phase == "expert" and repaired
        if input_grad:
            per_token += unsel * b * act
        if not repaired or not (sel > 0):
            per_token += sel * b * act if input_grad else 0
        elif trains_repairs and lora:
            # x and the expert's hidden activation in the factors' precision (inputs of x A^T), x A^T per projection,
            # the gate/up halves and activation, the concatenated outputs of the selected rows
            per_token += sel * (f * (H + down_in) + f * 2 * lora_rank + b * act + b * H)
            fixed += S_l * lora_per_expert * b if mixed_precision else 0  # autocast copies of the factors
            work += sel * 8 * widest  # fp32 gradients of one skinny update
        elif trains_repairs:
            # delta: the kernel on the repaired slices keeps its input, the gate/up halves, the activation and the
            # down projection's input; the effective slices [S, out, in] in the model dtype are kept for the
            # gradient of each projection's input (the first projection's only when the layer input needs one)
            per_token += sel * b * (H + act + down_in)
            first = "gate_up_proj" if "gate_up_proj" in layer.expert_parameter_names() else "up_proj"
            kept = per_expert if input_grad else per_expert - getattr(layer.experts, first)[0].numel()
            fixed += S_l * kept * b
        elif lora:  # frozen LoRA repairs (router phase): the gate/up halves, activation and concatenated outputs
            per_token += sel * b * (act + H) if input_grad else 0
        else:  # frozen delta repairs (router phase): the kernel keeps the effective slices it was given
            per_token += sel * b * act if input_grad else 0
            fixed += S_l * per_expert * b if input_grad else 0
        if phase == "router":
            # the per-slot expert outputs multiplied by differentiable weights, the router's input (fp32 master weights
            # take an fp32 input; under autocast the linear casts it back to 16 bits), its scores
            per_token += b * k * H + (b if mixed_precision else 4) * H + 4 * E
            per_token += 0 if input_grad else router
        if trains_repairs and not lora:
            work_fixed = S_l * per_expert * (b + 4)  # gradient of the effective slices, and its fp32 cast
        else:
            work_fixed = 0.0
        return per_token, fixed, work, work_fixed

    def layer_bytes(i: int, phase: str) -> tuple[float, float]:
        """(bytes saved by decoder layer i for T tokens, its backward working set) in ``phase``."""
        layer, d = by_layer.get(i), dense.get(i, 0)
        if phase == "full":
            total = b * (8 * H + 4 * Q + (K + Vd)) + 4 * n + 4 * heads
            if layer is not None:
                k, inter, E = layer.top_k, _expert_intermediate(layer), layer.num_experts
                total += b * k * (2 * H + 4 * inter) + 8 * E + 40 * k
            if d:
                total += b * (H + 4 * d)
            return T * total, T * total
        # the embeddings are frozen: layers up to the first MoE layer get inputs that need no gradient (in the
        # router phase the first router's input does not either, but its weights need its output)
        input_grad = i > first_moe
        per_token = attention(i) if input_grad else 0.0
        per_token += b * 3 * d if (d and input_grad) else 0
        fixed = work = work_fixed = 0.0
        if layer is not None:
            p, fx, w, wf = moe(layer, phase, input_grad)
            per_token, fixed, work, work_fixed = per_token + p, fx, w, wf
        saved = T * per_token + fixed
        return saved, saved + T * work + work_fixed

    per_layer: dict[str, list[int]] = {}

    def phase_totals(phase: str, lm_head: bool) -> tuple[int, int]:
        saved_layers, working = zip(*(layer_bytes(i, phase) for i in range(num_layers)))
        per_layer[phase] = [int(x) for x in saved_layers]
        if checkpointing:
            # one checkpoint (the layer input) per decoder layer; backward recomputes one layer at a time
            saved = T * num_layers * b * H + max(saved_layers)
        else:
            saved = sum(saved_layers)
        # backward through one layer: its saved tensors, the gradients flowing through it and the gradient of its
        # output; the LM head's buffers are gone by then, so the two transients never add up
        transient = max(working) + T * b * H
        if lm_head:
            saved += T * b * H
            transient = max(transient, lm_head_transient)
        return int(saved), int(transient)

    # TRL's chunked log-probabilities (the fused LM head) in backward: one [min(T, 4096), 32768] buffer in the compute
    # dtype (its width is fixed, whatever the vocabulary) that Triton turns into the logits gradient in place, and the
    # fp32 gradient of the hidden states; without Triton (CPU) the tile's gradient is computed with torch ops, about
    # six fp32 temporaries of one [tokens, min(V, 32768)] tile (seven when the tile is not fp32), plus a boolean mask.
    # Full fine-tuning adds the fp32 gradient of the LM head weight. On CPU every position is scored; on CUDA TRL
    # scores the completion positions only, so this is an upper bound there.
    rows = min(T, LM_HEAD_TOKEN_TILE)
    lm_head_transient = rows * LM_HEAD_VOCAB_TILE * b + 4 * T * H
    if device == "cpu":
        lm_head_transient += rows * min(V, LM_HEAD_VOCAB_TILE) * (24 + (4 if b != 4 else 0) + 1)
    full, full_t = phase_totals("full", True)
    full_t += 4 * V * H
    expert, expert_t = phase_totals("expert", True)
    router, router_t = phase_totals("router", False)
    return {"full": full, "full_transient": full_t, "expert": expert, "expert_transient": expert_t,
            "router": router, "router_transient": router_t,
            "no_grad": _no_grad_forward(layers, b, T, share, expert_tuning, weight_bytes) if repaired else 0,
            "per_layer": per_layer}


def _no_grad_forward(layers, b: int, T: int, share: float, expert_tuning: str, weight_bytes: int) -> int:
    """Working set of a forward without gradients while repairs are attached (the phase-start routing record, the
    router phase's anchor pass, evaluation), the largest over the MoE layers: each layer takes the path the repaired
    forward takes, a copy of its fused experts with the repaired slices written in, or, for a large layer when it
    needs less, the per-slot path (:func:`rasa_trainer.repairs.layer.no_grad_working_set` gives both)."""
    worst = 0
    for layer in layers:
        _, nbytes = no_grad_working_set(layer.experts, layer.expert_parameter_names(), expert_tuning,
                                        math.ceil(share * layer.num_experts), T, layer.top_k, b, weight_bytes)
        worst = max(worst, nbytes)
    return int(worst)


def _has_qk_norm(decoder_layer) -> bool:
    attention = getattr(decoder_layer, "self_attn", None) or getattr(decoder_layer, "attention", None)
    return attention is not None and hasattr(attention, "q_norm") and hasattr(attention, "k_norm")


def _attention_shapes(text_config) -> tuple[int, int, int, int]:
    """Widths per token of queries, keys and values, and the number of heads."""
    hidden = int(text_config.hidden_size)
    heads = int(getattr(text_config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
    qk_dim = int(getattr(text_config, "qk_head_dim", None) or head_dim)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    v_dim = int(getattr(text_config, "v_head_dim", None) or head_dim)
    return heads * qk_dim, kv_heads * qk_dim, kv_heads * v_dim, heads


def _expert_intermediate(layer) -> int:
    """The intermediate width of one routed expert of ``layer`` (from ``down_proj``)."""
    down = layer.experts.down_proj
    return int(down.shape[1] if layer.is_transposed else down.shape[2])


def _dense_intermediate(model: torch.nn.Module, layers, hidden: int) -> dict[int, int]:
    """Per decoder layer, the intermediate width of its dense MLP or shared experts (0 when there is none), from the
    2-D weights of the MLP block outside the routed experts and the router."""
    moe_blocks = {layer.experts_name.rpartition(".")[0]: layer for layer in layers}
    out: dict[int, int] = {}
    decoder = _decoder_layers(model)
    for i, block in enumerate(decoder):
        mlp = getattr(block, "mlp", None) or getattr(block, "block_sparse_moe", None)
        if mlp is None:
            out[i] = 0
            continue
        skip = set()
        for name, module in mlp.named_modules():
            if any(n for n, l in moe_blocks.items() if l.experts is module or l.router is module):
                skip.add(name)
        numel = 0
        for name, p in mlp.named_parameters():
            owner = name.rpartition(".")[0]
            if p.dim() != 2 or any(owner == s or owner.startswith(s + ".") for s in skip if s):
                continue
            if min(p.shape) <= 1:  # e.g. a shared-expert gate [1, H]
                continue
            numel += p.numel()
        out[i] = numel // (3 * hidden) if numel else 0
    return out


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise ValueError(f"{type(model).__name__}: no decoder layers (a ModuleList named 'layers') found")
