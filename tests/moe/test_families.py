"""Every Mixture-of-Experts causal-LM family the installed transformers registers, on a tiny random model each.

The families are enumerated from transformers itself, not listed by hand: every causal-LM model type whose modeling
module declares router-logit recording (``_can_record_outputs["router_logits"]``) or defines a fused-experts class
(decorated with ``use_experts_implementation``). Each is built from its own default config shrunk by a generic
shrinker (every known size field set small; family overrides only where the generic one fails) and put through
what RASA does to a model: discovery, routing capture, exact replay, one expert-phase step with repairs and one
router step. Families that cannot be supported are listed with the reason and must fail discovery with a clear
error.

Two kinds of family go through the same tests:

- the **known-supported** ones (``rasa_trainer.moe.discovery.SUPPORTED_FAMILIES``, checked on the versions
  ``docs/compatibility.md`` names): any failure is a regression and fails the suite;
- families the installed transformers registers that the tables here do not know yet (a newer release): each is
  exercised like the others and *reported*, not failed: it passes (supported, to be listed), or its tests are
  ``xfail`` with the error (refused until classified), or ``skip`` when its tiny config cannot be built here. The
  terminal summary lists them under "MoE families new to rasa_trainer" (``tests/conftest.py``).

``python tests/moe/test_families.py`` prints the README's table of supported families.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.routing import record_routing, replay_routing
from rasa_trainer.moe.discovery import ELEMENTWISE_SCORES, SUPPORTED_FAMILIES, clear_rule_cache
from rasa_trainer.repairs.layer import attach_repairs, merge_repairs, upcast_routers
from rasa_trainer.moe.routing import Routing


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module's many tiny forwards on one thread: with intra-op threads the fixed synchronisation cost of
    each tiny op dominates (measured 20x the CPU time on a loaded 2-core machine). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------------------------
# Enumeration
# --------------------------------------------------------------------------------------------------------------------


def _modeling_module(model_type: str) -> tuple[str, Path] | None:
    """The module defining a model type's causal-LM class and its source file, without importing it.

    Most model types have their own ``modeling_<type>.py``; some reuse another family's class (``param2moe`` and
    ``sarvam_moe`` are ``Glm4MoeForCausalLM``), so the class name is looked up in transformers' lazy class index."""
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    module = getattr(transformers, "_class_to_module", {}).get(class_name)  # private index; the fallback is public
    if module is None:
        name = model_type_to_module_name(model_type)
        module = f"models.{name}.modeling_{name}"
    spec = importlib.util.find_spec(f"transformers.{module.rsplit('.', 1)[0]}")
    path = Path(spec.origin).parent / f"{module.rsplit('.', 1)[1]}.py" if spec and spec.origin else None
    if path is None or not path.exists():
        return None
    return f"transformers.{module}", path


def _is_moe(module_name: str) -> bool:
    """Some class of the module declares router-logit recording or is a fused-experts class."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a family whose optional dependencies are missing here cannot be built anyway
        return False
    classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    records_router = any("router_logits" in (getattr(c, "_can_record_outputs", None) or {}) for c in classes)
    # use_experts_implementation wraps forward (functools.wraps keeps __wrapped__) and adds _apply_gate
    fused_experts = any(
        issubclass(c, nn.Module) and hasattr(c, "_apply_gate") and hasattr(c.forward, "__wrapped__") for c in classes
    )
    return records_router or fused_experts


@functools.cache
def moe_causal_lm_types() -> tuple[str, ...]:
    """Every registered model type with a causal-LM class whose modeling module has routed experts.

    Modules whose source mentions neither router logits nor the experts decorator cannot qualify, so only the
    others are imported (importing every causal LM's modeling module would cost seconds)."""
    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        located = _modeling_module(model_type) if model_type in CONFIG_MAPPING_NAMES else None
        if located is None:
            continue
        source = _source_text(located[1])
        if ("router_logits" in source or "use_experts_implementation" in source) and _is_moe(located[0]):
            found.append(model_type)
    return tuple(sorted(found))


@functools.cache
def _source_text(path: Path) -> str:
    return path.read_text()


# Registered MoE causal-LM types not built here. Each reason says why; nothing is skipped for being slow or odd.
SKIPPED = {
    "dots3_note": "multimodal config of the Dots3NoteForCausalLM class that dots3_note_text tests; its vision adapter "
                  "must match the decoder width, so it does not build from a shrunk decoder alone",
    "gemma4": "multimodal: its causal-LM entry is Gemma4ForConditionalGeneration with vision and audio towers; the "
              "decoder is tested as gemma4_text",
}

# Caveats of tested families, for the README table (each is asserted by a test).
NOTES = {
    "deepseek_v4": "hash-routed layers (experts fixed by token id) are not discovered, only the top-k routed ones",
}

# Families whose routers or experts do not follow the convention rasa_trainer needs: discovery must refuse them with
# an error naming the model class and this reason (a regular expression over the error message).
EXPECTED_UNSUPPORTED: dict[str, tuple[str, str]] = {
    "dbrx": ("no fused experts module beside it",
             "the router returns logits only (top-k is chosen in the block) and the experts are not fused"),
    "doge": ("no fused experts module beside it",
             "product-key retrieval of embedding experts inside one block; no router module, no fused experts"),
    "ergo": ("experts \\(ErgoExperts\\) that do not dispatch through",
             "each route's expert output passes a per-expert RMSNorm outside transformers' ExpertsInterface, so a "
             "repair of the fused projections could not cover the norm and the route-per-row dispatch"),
    "gemma4_text": ("top-k weights follow no known scoring rule",
                    "the renormalised top-k probabilities are multiplied by a learned per-expert scale"),
    "inkling_text": ("returns tuple of length 4",
                     "the router also returns shared-expert weights, normalised jointly with the top-k weights"),
    "jetmoe": ("no fused experts module beside it",
               "per-expert linear layers grouped by a gating module that returns sorted token groups"),
    "llama4": ("returns tuple of length 2", "the router returns (dense sigmoid scores [N, E], logits), no top-k"),
    "llama4_text": ("returns tuple of length 2", "the router returns (dense sigmoid scores [N, E], logits), no top-k"),
    "longcat_flash": ("scores 264 experts while its experts module .* holds 8",
                      "the router also picks compute-free identity experts, which the fused experts do not hold"),
    "zaya": ("returns tuple of length 4",
             "the router also returns a router state carried to the next layer, and routes to a skip expert"),
}

# --------------------------------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------------------------------

NUM_EXPERTS, TOP_K, LAYERS = 8, 2, 2

# Applied to every config that has the field. Shapes are kept consistent (4 heads x 8 = 32); every family's defaults
# for fields not listed are left alone.
SMALL_SIZES: dict[str, object] = {
    # widths
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 8, "max_position_embeddings": 64,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "shared_intermediate_size": 16,
    "shared_experts_intermediate_size": 16, "moe_shared_expert_intermediate_size": 16,
    "dense_intermediate_size": 32, "intermediate_size_mlp": 32, "expert_ffn_hidden_size": 16, "ffn_hidden_size": 32,
    # depth: dense-first families keep one dense layer, so two layers hold at least one MoE layer
    "num_hidden_layers": LAYERS, "first_k_dense_replace": 1, "num_dense_layers": 1, "mlp_only_layers": [],
    "num_nextn_predict_layers": 0,
    # experts: 8 routed, top-2; groups of 4 with one group chosen (group-limited routing stays active)
    "num_experts": NUM_EXPERTS, "n_routed_experts": NUM_EXPERTS, "num_local_experts": NUM_EXPERTS,
    "moe_num_experts": NUM_EXPERTS, "num_experts_per_tok": TOP_K, "moe_topk": TOP_K, "num_experts_per_token": TOP_K,
    "moe_k": TOP_K, "n_group": 2, "topk_group": 1, "num_expert_group": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    # multi-head latent attention and its sparse indexer
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16,
    "v_head_dim": 8, "index_head_dim": 8, "index_n_heads": 4, "index_topk": 4,
    # linear attention, sliding windows, state-space mixers
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 8, "linear_num_heads": 4, "linear_conv_kernel_dim": 4,
    "sliding_window": 16, "sliding_window_size": 16,
    "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_head_dim": 8,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_expand": 2,
    "mamba_head_dim": 16, "mamba_num_heads": 4, "ssm_state_size": 8, "n_groups": 1, "chunk_size": 8,
    "mamba_chunk_size": 8,
    # per-layer embeddings (Gemma 4), token indexers (Qwen4-Exp)
    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 128, "top_k_experts": TOP_K,
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4, "indexer_compress_ratio": 2,
    # Inkling 2: output vocabulary and relative-position extent
    "unpadded_vocab_size": 128, "rel_extent": 16,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}

# Family overrides, only where the generic shrinker fails; each says why.
FAMILY_OVERRIDES: dict[str, dict[str, object]] = {
    # DBRX names its sizes differently and nests them; its attention reads a rope_theta its default config lacks
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=16, moe_num_experts=NUM_EXPERTS, moe_top_k=TOP_K)),
    "doge": dict(is_moe=True),  # dense by default
    # the sliding layers' sizes are init-only aliases, not config fields the generic shrinker can see
    "dots3_note_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16, swa_kv_lora_rank=16,
                            swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=8),
    "gemma4_text": dict(enable_moe_block=True),  # dense by default
    # the default is all Mamba layers; the hybrid needs an attention layer for its cache
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"]),
    # attention every 8th layer from layer 4 by default: with two layers there would be none
    # Kolibri 1.1: the default layout (50 layers, K/V shared between indexed layers, NVFP4 keys) does not shrink by
    # cutting lists; one sliding and one indexed layer, each with its own K/V, and a 16-wide head (NVFP4 rounding)
    "kolibri1_1": dict(num_hidden_layers=2, layer_types=["sliding_attention", "indexed_attention"], index_layers=[1],
                       kv_source_layers=[0, 1], head_dim=16, index_num_heads=1),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2, expert_layer_offset=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),  # no default layer pattern
    "mimo_v2_flash": dict(num_key_value_heads=2),  # sliding layers use twice the key-value heads, at most all heads
    "zaya": dict(num_experts_per_tok=1),  # ZAYA supports top-1 only
}


def _layer_selection(fields: dict) -> dict[str, object]:
    """Per-layer lists (``layer_types``, ``mlp_layer_types``, ...) cut to a few layers that still cover every
    distinct combination of layer kinds: hybrids need their attention layer, MoE-every-k-layers families their
    sparse layer."""
    n = fields.get("num_hidden_layers")
    per_layer = {k: v for k, v in fields.items() if isinstance(v, list) and n and len(v) == n}
    if not per_layer:
        return {}
    rows = list(zip(*per_layer.values()))
    keep = [i for i, row in enumerate(rows) if row not in rows[:i]]  # first layer of every distinct kind
    keep = sorted(keep + [i for i in range(n) if i not in keep][: max(0, LAYERS - len(keep))])
    return {"num_hidden_layers": len(keep), **{k: [v[i] for i in keep] for k, v in per_layer.items()}}


def tiny_config(model_type: str):
    default = AutoConfig.for_model(model_type)
    text = default.get_text_config()
    fields = text.to_dict()
    overrides = {k: v for k, v in SMALL_SIZES.items() if k in fields}
    overrides.update(_layer_selection(fields))
    overrides.update(FAMILY_OVERRIDES.get(model_type, {}))
    if text is default:
        return AutoConfig.for_model(model_type, **overrides)
    return AutoConfig.for_model(model_type, text_config=overrides)  # composite: shrink the decoder


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random model in eval mode, router matrices re-initialised wide so top-k has no near-ties."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():
        for param in _router_parameters(model).values():
            if param.dim() == 2:
                param.normal_(0.0, 0.5)
    return model


def _router_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The routers' learnable parameters (frozen ones, such as selection biases held as parameters, excluded)."""
    return {
        f"{l.router_name}.{n}": p for l in moe_layers(model) for n, p in l.router.named_parameters() if p.requires_grad
    }


def expected_top_k(model_type: str) -> int:
    return int(FAMILY_OVERRIDES.get(model_type, {}).get("num_experts_per_tok", TOP_K))


def batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    """Two sequences of 8 tokens, the second right-padded by 2."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": input_ids.masked_fill(mask == 0, 0), "attention_mask": mask}


TESTED = [t for t in moe_causal_lm_types() if t not in SKIPPED and t not in EXPECTED_UNSUPPORTED]
# Registered here but in none of the tables: new in a transformers release newer than the one last checked.
NEW = [t for t in TESTED if t not in SUPPORTED_FAMILIES]


@contextlib.contextmanager
def exercised(model_type: str):
    """Runs one family's test body. A known-supported family fails as usual; a family new to rasa_trainer is
    reported instead: ``skip`` when its tiny model cannot be built here, ``xfail`` with the error when it does not
    meet RASA's contract, a plain pass when it does (``tests/conftest.py`` lists all three at the end)."""
    if model_type not in NEW:
        yield
        return
    try:
        tiny_config(model_type)
    except Exception as error:  # noqa: BLE001 - any failure to build the config makes the family untestable here
        pytest.skip(f"new MoE family `{model_type}` not testable here: its tiny config cannot be built "
                    f"({type(error).__name__}: {_first_line(error)})")
    try:
        yield
    except Exception as error:  # noqa: BLE001 - reported, not failed: the family is not classified yet
        pytest.xfail(f"new MoE family `{model_type}` (transformers {transformers.__version__}) is not supported "
                     f"until classified: {type(error).__name__}: {_first_line(error)}")


def family_test(test):
    """Marks a per-family test: its body runs under :func:`exercised`."""
    @functools.wraps(test)
    def run(model_type, *args, **kwargs):
        with exercised(model_type):
            return test(model_type, *args, **kwargs)
    return run


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


@dataclass
class Reference:
    """One plain forward of a family's tiny model on :func:`batch`, recorded twice: by ``record_routing`` and by
    plain hooks on the routers (what every router itself returned: scores, top-k weights, top-k indices)."""

    model: nn.Module
    logits: torch.Tensor
    routing: Routing
    witness: dict[int, tuple[torch.Tensor, ...]]


@functools.cache
def reference(model_type: str) -> Reference:
    """Built once per family; tests that change the model work on a deep copy."""
    model = tiny_model(model_type)
    witness: dict[int, tuple[torch.Tensor, ...]] = {}

    def hook_for(index: int):
        def hook(module, args, output):
            witness[index] = tuple(t.detach().clone() for t in output)
        return hook

    handles = [l.router.register_forward_hook(hook_for(l.index)) for l in moe_layers(model)]
    try:
        with torch.no_grad(), record_routing(model) as rec:
            logits = model(**batch()).logits
    finally:
        for h in handles:
            h.remove()
    return Reference(model, logits, rec.routing(), witness)


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


def test_the_enumeration_finds_moe_causal_lms():
    registered = set(moe_causal_lm_types())
    assert {"olmoe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"} <= registered  # the enumeration finds MoEs
    assert "llama" not in registered  # ... and only MoEs
    assert "param2moe" in registered  # ... also model types that reuse another family's class (Glm4MoeForCausalLM)


def test_known_supported_families_are_still_registered():
    """A family we list as supported that transformers no longer registers as an MoE causal LM is a regression users
    would meet (their checkpoints of it stop loading as one)."""
    gone = set(SUPPORTED_FAMILIES) - set(moe_causal_lm_types())
    assert not gone, f"supported families transformers no longer registers as MoE causal LMs: {sorted(gone)}"


def test_the_tables_are_consistent():
    tables = [set(SUPPORTED_FAMILIES), set(EXPECTED_UNSUPPORTED), set(SKIPPED)]
    for i, first in enumerate(tables):
        for second in tables[i + 1:]:
            assert not first & second, f"a family is classified twice: {sorted(first & second)}"
    assert len(SUPPORTED_FAMILIES) == len(set(SUPPORTED_FAMILIES))


def test_a_new_family_is_reported_and_a_known_one_fails(monkeypatch):
    """The guard the per-family tests run under: a regression of a known-supported family fails the suite; a family
    new to rasa_trainer is xfail with its error, or skipped when its tiny config cannot be built here."""
    monkeypatch.setattr(sys.modules[__name__], "NEW", ["olmoe"])
    with pytest.raises(ValueError, match="regressed"), exercised("qwen3_moe"):
        raise ValueError("regressed")
    with pytest.raises(pytest.xfail.Exception, match="new MoE family `olmoe`.*not supported until classified: "
                                                     "ValueError: no top-k"), exercised("olmoe"):
        raise ValueError("no top-k")
    def needs_the_hub(model_type):
        raise OSError(f"{model_type}'s config needs a file from the Hub")

    monkeypatch.setattr(sys.modules[__name__], "tiny_config", needs_the_hub)
    with pytest.raises(pytest.skip.Exception, match="`olmoe` not testable here: its tiny config cannot be built"):
        with exercised("olmoe"):
            pass


@pytest.mark.parametrize("model_type", TESTED)
@family_test
def test_discovery(model_type):
    ref = reference(model_type)
    layers = moe_layers(ref.model)
    modules = dict(ref.model.named_modules())
    assert layers and [l.index for l in layers] == list(range(len(layers)))
    assert len({l.layer_index for l in layers}) == len(layers)
    for layer in layers:
        assert (layer.num_experts, layer.top_k) == (NUM_EXPERTS, expected_top_k(model_type))
        assert modules[layer.router_name] is layer.router and modules[layer.experts_name] is layer.experts
        assert layer.scoring in ("softmax", "sparsemixer", *ELEMENTWISE_SCORES)
        # the identified rule reproduces the router's own top-k weights on the model's real hidden states
        first, weights, indices = ref.witness[layer.index]
        recomputed = layer.rule.topk_weights(first.reshape(-1, first.shape[-1]), indices.reshape(-1, layer.top_k))
        torch.testing.assert_close(recomputed.to(weights.dtype), weights.reshape(-1, layer.top_k), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", TESTED)
@family_test
def test_record_routing(model_type):
    ref = reference(model_type)
    routing = ref.routing
    assert routing.num_tokens == batch()["input_ids"].numel()
    for layer in moe_layers(ref.model):
        _, weights, indices = ref.witness[layer.index]
        assert torch.equal(routing.indices[layer.index].long(), indices.reshape(-1, layer.top_k).long())
        assert torch.equal(routing.weights[layer.index], weights.reshape(-1, layer.top_k))
        probs = routing.probabilities[layer.index]
        assert probs.shape == (routing.num_tokens, NUM_EXPERTS)
        torch.testing.assert_close(probs.sum(-1), torch.ones(routing.num_tokens))


def _shifted(routing: Routing) -> Routing:
    """The same routing with every expert index moved by one: a different, valid routing."""
    return Routing([(i.long() + 1) % NUM_EXPERTS for i in routing.indices], routing.weights, routing.probabilities)


@pytest.mark.parametrize("model_type", TESTED)
@family_test
def test_replay_cached_is_bit_identical(model_type):
    ref = reference(model_type)
    with torch.no_grad(), replay_routing(ref.model, ref.routing, weights="cached"):
        replayed = ref.model(**batch()).logits
    assert torch.equal(replayed, ref.logits)
    # replay really decides the experts: another routing gives other logits
    with torch.no_grad(), replay_routing(ref.model, _shifted(ref.routing), weights="cached"):
        assert not torch.allclose(ref.model(**batch()).logits, ref.logits)


def _busiest_experts(routing: Routing, layer: int = 0) -> list[int]:
    """The two experts of MoE layer ``layer`` with the most assignments (so their repairs get gradients)."""
    counts = torch.bincount(routing.indices[layer].long().flatten(), minlength=NUM_EXPERTS)
    return counts.topk(2).indices.sort().values.tolist()


@pytest.mark.parametrize("model_type", TESTED)
@family_test
def test_expert_phase_step(model_type):
    ref = reference(model_type)
    model = copy.deepcopy(ref.model)
    routers = _router_parameters(model)
    model.requires_grad_(False)
    for param in routers.values():
        param.requires_grad_(True)  # trainable, yet cached replay must keep them out of the expert loss
    repairs = attach_repairs(model, {0: _busiest_experts(ref.routing)}, "delta")
    inputs = batch()
    with replay_routing(model, ref.routing, weights="cached"):
        out = model(**inputs, labels=inputs["input_ids"])
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)  # zero repairs change nothing
        out.loss.backward()
    repair_ids = {id(p) for p in repairs}
    with_grads = [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in repair_ids]
    assert not with_grads, f"parameters outside the repairs got gradients: {with_grads}"
    assert repairs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in repairs)

    # a trained repair acts exactly like the same change written into the fused expert tensors
    with torch.no_grad():
        for param in repairs:
            param.add_(-0.1 * param.grad.sign())  # one signed-gradient step: every repaired slice changes
    merged = copy.deepcopy(model)
    merge_repairs(merged)
    with torch.no_grad(), replay_routing(model, ref.routing, weights="cached"):
        repaired = model(**inputs).logits
    with torch.no_grad(), replay_routing(merged, ref.routing, weights="cached"):
        written = merged(**inputs).logits
    assert not torch.allclose(repaired, ref.logits)
    torch.testing.assert_close(repaired, written, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", TESTED)
@family_test
def test_router_step(model_type):
    model = copy.deepcopy(reference(model_type).model)
    routers = _router_parameters(model)
    model.requires_grad_(False)
    # what the router phase trains (upcast_routers, by probing which parameters the router's outputs differentiate)
    # is exactly what the family declares learnable: a frozen selection-only bias stays out
    trained = upcast_routers(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in trained) == sorted(routers)
    for param in trained:
        param.requires_grad_(True)
    with record_routing(model, probabilities=True, detach=False) as rec:
        model(**batch())
    probs = rec.routing().probabilities
    # the router loss of the router phase: KL(anchor || adversarial) of token-mean router probabilities per layer,
    # here with the first sequence as anchor and the real tokens of the second as adversarial
    anchor = [p[:8].mean(0).detach() for p in probs]
    adversarial = [p[8:14].mean(0) for p in probs]
    kl = sum(torch.sum(a * (a.log() - b.log())) for a, b in zip(anchor, adversarial)) / len(probs)
    kl.backward()
    assert kl.item() > 0
    for layer in moe_layers(model):
        grads = [p.grad for p in layer.router.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0, f"router of MoE layer {layer.index} got no gradient"
    others = [n for n, p in model.named_parameters() if p.grad is not None and n not in routers]
    assert not others


def _summary(layers: list) -> list[tuple]:
    return [(l.layer_index, l.router_name, l.experts_name, l.num_experts, l.top_k, l.rule) for l in layers]


@pytest.mark.parametrize("model_type", TESTED)
@family_test
def test_discovery_without_weights(model_type):
    """Memory planning discovers a meta-device model: the probe must identify every router from copies alone (router
    submodules, buffers and the MoE block's tensors passed to the router are all on meta), with the same result."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    clear_rule_cache()  # both discoveries below must probe, not reuse each other's rule
    on_meta = _summary(moe_layers(model))
    clear_rule_cache()
    assert on_meta == _summary(moe_layers(reference(model_type).model))


def test_deepseek_v4_hash_routed_layers_are_left_out():
    """DeepSeek-V4's hash-routed layers pick experts by token id (transformers does not record them as routers):
    discovery keeps exactly its top-k routed layers."""
    model = reference("deepseek_v4").model
    assert "hash_moe" in model.config.mlp_layer_types
    routed = [i for i, kind in enumerate(model.config.mlp_layer_types) if kind == "moe"]
    assert [l.layer_index for l in moe_layers(model)] == routed


def test_experts_outside_the_experts_interface_are_refused(monkeypatch):
    """Repairs are applied through transformers' ExpertsInterface: an experts class without the decorator would run
    unrepaired, silently, so discovery refuses it."""
    model = reference("olmoe").model
    experts_class = type(moe_layers(model)[0].experts)
    monkeypatch.setattr(experts_class, "forward", experts_class.forward.__wrapped__)  # the undecorated forward
    with pytest.raises(ValueError, match=r"OlmoeForCausalLM has experts \(OlmoeExperts\) that do not dispatch through"):
        moe_layers(model)


@pytest.mark.parametrize("model_type", sorted(set(EXPECTED_UNSUPPORTED) & set(moe_causal_lm_types())))
def test_unsupported_family_is_refused(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    why, _ = EXPECTED_UNSUPPORTED[model_type]
    with pytest.raises(ValueError, match=re.compile(f"{type(model).__name__}.*{why}", re.S)):
        moe_layers(model)


def supported_families_table() -> str:
    """The README's "Supported families" table: tested model types grouped by their routers' identified scoring
    rule, then the refused and the unbuilt ones with their reasons."""
    by_rule: dict[str, list[str]] = {}
    for model_type in sorted(set(SUPPORTED_FAMILIES) & set(TESTED)):
        by_rule.setdefault(moe_layers(reference(model_type).model)[0].scoring, []).append(model_type)
    rows = ["| model types | status | scoring rule or reason |", "|---|---|---|"]
    for kind, types in sorted(by_rule.items(), key=lambda item: -len(item[1])):
        names = ", ".join(f"`{t}`{'*' if t in NOTES else ''}" for t in types)
        rows.append(f"| {names} | tested | {kind} |")
    rows += [f"| `{t}` | refused | {reason} |" for t, (_, reason) in sorted(EXPECTED_UNSUPPORTED.items())]
    rows += [f"| `{t}` | not built | {reason} |" for t, reason in sorted(SKIPPED.items())]
    notes = [f"\\* `{t}`: {note}." for t, note in sorted(NOTES.items())]
    return "\n".join(rows) + "\n\n" + "\n".join(notes)  # a blank line ends the table before the notes


def test_readme_lists_the_families_tested_here():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert supported_families_table() in readme, "README is stale: paste `python tests/moe/test_families.py` into it"


if __name__ == "__main__":
    print(supported_families_table())
