"""Routing capture and replay on tiny random models of every supported family."""

import pytest
import torch

from conftest import FAMILIES, batch, generation_routing, tiny_model
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.routing import record_routing, replay_routing
from rasa_trainer.moe.routing import Routing, real_tokens

NO_TRAIN_RANDOMNESS = [f for f in FAMILIES if f != "phimoe"]  # PhiMoE samples experts (Gumbel) in train mode


def _router_outputs(model):
    """An independent witness: what every router itself returns, via plain hooks."""
    seen = {}
    handles = []
    for layer in moe_layers(model):
        def hook(module, args, output, i=layer.index):
            seen[i] = (output[1].detach().clone(), output[2].detach().clone())
        handles.append(layer.router.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("padding", ["left", "right"])
def test_capture_equals_router_output_on_real_tokens(family, padding):
    model = tiny_model(family)
    inputs = batch(padding=padding)
    seen, handles = _router_outputs(model)
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    for h in handles:
        h.remove()
    routing = rec.routing()
    real = real_tokens(routing, inputs["attention_mask"])
    n_real = int(inputs["attention_mask"].sum())
    mask = inputs["attention_mask"].reshape(-1).bool()
    for layer in moe_layers(model):
        weights, indices = seen[layer.index]
        assert routing.indices[layer.index].dtype == torch.int16
        assert torch.equal(real.indices[layer.index].long(), indices[mask])
        assert torch.equal(real.weights[layer.index], weights[mask])
        assert real.indices[layer.index].shape == (n_real, layer.top_k)
        probs = real.probabilities[layer.index]
        assert probs.shape == (n_real, layer.num_experts)
        torch.testing.assert_close(probs.sum(-1), torch.ones(n_real))


def test_replay_own_routing_reproduces_logits(family):
    model = tiny_model(family)
    inputs = batch()
    with torch.no_grad(), record_routing(model) as rec:
        reference = model(**inputs).logits
    for mode in ("cached", "recompute"):
        with torch.no_grad(), replay_routing(model, rec.routing(), weights=mode):
            replayed = model(**inputs).logits
        torch.testing.assert_close(replayed, reference, rtol=0, atol=1e-6)


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "self_attn" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def test_replay_pins_tokens_after_weights_change(family):
    model = tiny_model(family)
    inputs = batch()
    mask = inputs["attention_mask"]
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    recorded = real_tokens(rec.routing(), mask)
    _perturb(model)
    with torch.no_grad(), record_routing(model) as free:
        model(**inputs)
    with torch.no_grad(), replay_routing(model, rec.routing()), record_routing(model) as pinned:
        model(**inputs)
    moved = real_tokens(free.routing(), mask)
    kept = real_tokens(pinned.routing(), mask)
    layers = range(recorded.num_layers)
    # without replay some token moves (in some layer after the first, whose inputs changed through attention)
    assert any(not torch.equal(moved.indices[l], recorded.indices[l]) for l in layers)
    assert all(torch.equal(kept.indices[l], recorded.indices[l]) for l in layers)


def test_capture_during_generate_one_record_per_new_token(family):
    model = tiny_model(family)
    inputs = batch(padding="left", batch_size=2)
    new = 5
    with torch.no_grad(), record_routing(model) as rec:
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape[1] - inputs["input_ids"].shape[1] == new
    assert rec.num_calls == new  # prefill + (new - 1) decode steps, each producing one token
    assert rec.calls[0].num_tokens == inputs["input_ids"].numel()
    assert all(call.num_tokens == 2 for call in rec.calls[1:])
    gen = generation_routing(rec, batch_size=2)
    for layer in moe_layers(model):
        assert gen.indices[layer.index].shape == (2 * new, layer.top_k)
        # token 0 of sequence 1 was produced by the last prompt position of the prefill
        prefill_last = rec.calls[0].indices[layer.index][2 * inputs["input_ids"].shape[1] - 1]
        assert torch.equal(gen.indices[layer.index][new], prefill_last)


@pytest.mark.parametrize("family", NO_TRAIN_RANDOMNESS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_does_not_change_capture_or_replay(family, reentrant):
    inputs = batch()
    results = []
    for checkpointing in (False, True):
        model = tiny_model(family).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        with record_routing(model) as rec:
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        assert rec.num_calls == 1  # the recompute in backward is not recorded again
        routing = rec.routing()
        model.zero_grad()
        _perturb(model)
        with replay_routing(model, routing, weights="recompute"):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((routing, grads))
    (r0, g0), (r1, g1) = results
    for l in range(r0.num_layers):
        assert torch.equal(r0.indices[l], r1.indices[l])
        torch.testing.assert_close(r0.weights[l], r1.weights[l], rtol=0, atol=0)
    assert g0.keys() == g1.keys() and any("gate" in n or "router" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-7)


def test_recompute_mode_gives_router_gradients_cached_does_not():
    model = tiny_model("qwen3_moe").train()
    inputs = batch()
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    router = moe_layers(model)[1].router
    for mode, expect in (("cached", False), ("recompute", True)):
        model.zero_grad(set_to_none=True)
        with replay_routing(model, rec.routing(), weights=mode):
            model(**inputs, labels=inputs["input_ids"], output_router_logits=False).loss.backward()
        assert bool(router.weight.grad is not None and router.weight.grad.abs().sum() > 0) is expect


def test_replay_errors_are_clear():
    model = tiny_model("olmoe")
    inputs = batch()
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    routing = rec.routing()
    with pytest.raises(ValueError, match="routing has 1 MoE layers but OlmoeForCausalLM has 2"):
        with replay_routing(model, Routing(routing.indices[:1], routing.weights[:1])):
            pass
    with pytest.raises(ValueError, match=r"routed 14 positions but the routing holds 21"):
        with torch.no_grad(), replay_routing(model, routing):
            model(**batch(seq=7, batch_size=2))
    bad = Routing([i[:, :1] for i in routing.indices], routing.weights)
    with pytest.raises(ValueError, match=r"expected \[N, 2\]"):
        with replay_routing(model, bad):
            pass
    with pytest.raises(ValueError, match="weights='fixed'"):
        with replay_routing(model, routing, weights="fixed"):
            pass


def test_real_tokens_mask_mismatch():
    model = tiny_model("olmoe")
    inputs = batch()
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    with pytest.raises(ValueError, match="attention_mask covers 14 positions but the routing has 21"):
        real_tokens(rec.routing(), inputs["attention_mask"][:2])


def test_hooks_are_removed_after_the_block():
    model = tiny_model("mixtral")
    with record_routing(model) as rec, torch.no_grad():
        model(**batch())
    with torch.no_grad():
        model(**batch())
    assert rec.num_calls == 1
    assert all(not layer.router._forward_hooks for layer in moe_layers(model))


def _assignment_shift_all_at_once(current, reference):
    """The formula before token chunking: every token's [L, k, k] comparison at once."""
    kept = (current.long().unsqueeze(-1) == reference.long().unsqueeze(-2)).any(dim=-1)
    return 1.0 - kept.float().mean()


@pytest.mark.parametrize("tokens", [1, 4095, 4096, 4097, 10_000])
def test_assignment_shift_in_token_chunks_equals_the_whole_comparison(tokens):
    """The routing-shift metric compares top-k sets token by token in chunks (its memory no longer grows with the data
    set: ~9 KB per token at L=48, k=8 before); the value is bit-identical to the all-at-once formula, chunk edges
    included, for int16 cache indices against int64 live ones."""
    from rasa_trainer.moe.replay_cache import assignment_shift

    g = torch.Generator().manual_seed(tokens)
    current = torch.randint(0, 8, (tokens, 3, 2), generator=g, dtype=torch.int64)
    reference = torch.randint(0, 8, (tokens, 3, 2), generator=g).to(torch.int16)
    value = assignment_shift(current, reference)
    assert value.dtype == torch.float32
    assert torch.equal(value, _assignment_shift_all_at_once(current, reference))
    assert assignment_shift(current, current).item() == 0.0
    assert assignment_shift(current, torch.full_like(current, 9)).item() == 1.0  # no expert in common


def test_repairs_follow_the_experts_device():
    """The repairs' ``selected`` buffer is created where the experts live (on a CUDA or device_map model it used to
    stay on the CPU, and the forward's searchsorted/isin against the routing indices failed): on the meta device
    here, the one non-CPU device every machine has."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from rasa_trainer.repairs.layer import attach_repairs, repair_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    attach_repairs(model, {0: [1, 3]}, "delta")
    repairs = [r for _, r in repair_modules(model)]
    assert repairs and all(r.selected.device.type == "meta" for r in repairs)
    assert all(p.device.type == "meta" for r in repairs for p in r.parameters())


def test_fp32_routers_compute_in_fp32_under_bf16_autocast():
    """A model loaded in fp32 and trained with bf16=True runs under bf16 autocast: the routers must still compute
    their logits in fp32 (the hooks used to be installed only on routers that were not fp32 already)."""
    from rasa_trainer.repairs.layer import restore_routers, upcast_routers

    model = tiny_model("qwen3_moe").float()
    inputs = batch()
    upcast_routers(model)
    try:
        seen = []
        handles = [l.router.register_forward_hook(lambda m, a, out: seen.append(out[0].dtype)) for l in moe_layers(model)]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs)
        for h in handles:
            h.remove()
        assert len(seen) == len(moe_layers(model)) and all(dtype == torch.float32 for dtype in seen)
    finally:
        restore_routers(model)
    assert all(p.dtype == torch.float32 for l in moe_layers(model) for p in l.router.parameters())
    assert not any(hasattr(l.router, "_rasa_router_hooks") for l in moe_layers(model))
