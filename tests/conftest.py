"""Shared fixtures: tiny random MoE models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

# one thread: the tiny test models make a second thread pure synchronisation overhead (many times slower on a
# loaded machine)
torch.set_num_threads(1)

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_KWARGS = {
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=8, num_experts_per_tok=2
    ),
    "qwen3_moe": dict(intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8),
    "mixtral": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_shared_experts=1, num_key_value_heads=4, num_hidden_layers=3,
    ),
    "gpt_oss": dict(
        intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        layer_types=["full_attention", "sliding_attention"], sliding_window=16,
    ),
    "granitemoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "phimoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
}
FAMILIES = list(FAMILY_KWARGS)


def tiny_config(family: str, **overrides):
    kwargs = {**COMMON, **FAMILY_KWARGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random model with distinct routing: routers re-initialised with a larger std so top-k has no ties."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
                param.normal_(0.0, 0.5)
    return model.eval()


def batch(vocab: int = 128, batch_size: int = 3, seq: int = 7, padding: str = "right", seed: int = 0):
    """Random input ids with ragged lengths, padded on the given side."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq), generator=g)
    lengths = [seq - (i % 3) for i in range(batch_size)]
    mask = torch.zeros(batch_size, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if padding == "right":
            mask[i, :n] = 1
        else:
            mask[i, seq - n :] = 1
    input_ids = input_ids.masked_fill(mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# --------------------------------------------------------------------------------------------------------------------
# Chat tokenizer for generation tests (appended for generation/detection tests)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def tiny_chat_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer with a Jinja chat template: ids 0/1/2 are pad/bos/eos (as in COMMON), then role markers,
    then the words ``w0 w1 ...`` up to ``vocab_size`` entries, so every id a tiny model can emit decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(CHAT_SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate(CHAT_SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=CHAT_SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def word_text(rng, low: int = 2, high: int = 9, vocab: int = 100) -> str:
    """Random text of ``low..high-1`` words from the tiny chat tokenizer's vocabulary."""
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(rng.randrange(low, high)))


@pytest.fixture
def chat_tokenizer():
    return tiny_chat_tokenizer()


def generation_routing(recorder, batch_size: int):
    """The test oracle for routing captured during ``generate``: from every forward call a ``RoutingRecorder`` saw,
    the routing that produced each new token, as ``N = batch * new_tokens`` rows in row-major order (row ``b * T + t``
    is new token ``t`` of sequence ``b``). New token t was produced by the last position of forward call t: the
    prefill's last prompt position for the first token, then the previous new token's position at each decode step."""
    from rasa_trainer.moe.routing import Routing

    steps = []
    for call in recorder.calls:
        n = call.num_tokens
        assert n % batch_size == 0, f"a forward call routed {n} positions, not a multiple of batch size {batch_size}"
        last = torch.arange(batch_size) * (n // batch_size) + (n // batch_size - 1)
        steps.append(call.select(last))
    layers = range(steps[0].num_layers)
    stack = lambda rows: torch.stack(rows, dim=1).flatten(0, 1)  # [B, T, ...] -> [B*T, ...]  # noqa: E731
    probs = None
    if steps[0].probabilities is not None:
        probs = [stack([s.probabilities[l] for s in steps]) for l in layers]
    return Routing([stack([s.indices[l] for s in steps]) for l in layers],
                   [stack([s.weights[l] for s in steps]) for l in layers], probs)


# --------------------------------------------------------------------------------------------------------------------
# MoE families new to rasa_trainer (tests/moe/test_families.py): reported at the end of the run, not failed
# --------------------------------------------------------------------------------------------------------------------

_NEW_FAMILY_OUTCOMES: dict[str, dict[str, str]] = {}


def pytest_runtest_logreport(report):
    if "test_families.py::" not in report.nodeid or "[" not in report.nodeid:
        return
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    from test_families import NEW  # the families the installed transformers registers and no table knows

    model_type = report.nodeid.rsplit("[", 1)[1].rstrip("]")
    if model_type not in NEW:
        return
    outcome = "xfail" if hasattr(report, "wasxfail") else report.outcome
    reason = getattr(report, "wasxfail", "") or (report.longrepr[2] if report.skipped and report.longrepr else "")
    test = report.nodeid.split("::")[-1].split("[")[0]
    _NEW_FAMILY_OUTCOMES.setdefault(model_type, {})[test] = f"{outcome} {reason}".strip()


def pytest_terminal_summary(terminalreporter):
    if not _NEW_FAMILY_OUTCOMES:
        return
    import transformers

    terminalreporter.section(f"MoE families new to rasa_trainer (transformers {transformers.__version__})")
    for model_type, outcomes in sorted(_NEW_FAMILY_OUTCOMES.items()):
        states = {o.split(" ", 1)[0] for o in outcomes.values()}
        if states == {"passed"}:
            verdict = "passes every RASA check: supported, add it to rasa_trainer.moe.discovery.SUPPORTED_FAMILIES"
        elif "skipped" in states:
            verdict = "not testable here: " + next(o for o in outcomes.values() if o.startswith("skipped"))
        else:
            first = next(f"{t}: {o}" for t, o in outcomes.items() if not o.startswith("passed"))
            verdict = f"not supported until classified ({first})"
        terminalreporter.write_line(f"{model_type}: {verdict}")
