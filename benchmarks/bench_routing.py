"""Overhead of routing capture and routing replay on a small but not trivial OLMoE model (CPU).

Model: OLMoE, 4 layers, 64 experts, top-8, hidden 256, 128 intermediate per expert, vocab 1024, 4 heads, random
init with the routers re-initialised to std 0.5 so routing is not degenerate. Batch 8 x 256 tokens.

Modes, timed as a forward pass under ``torch.no_grad()`` in eval mode:

- ``plain``: no hooks;
- ``record``: inside ``record_routing(model, probabilities=False)`` (what the replay cache and detection use);
- ``record+probs``: inside ``record_routing(model, probabilities=True)``;
- ``replay cached``: inside ``replay_routing(model, routing, weights="cached")``;
- ``replay recompute``: inside ``replay_routing(model, routing, weights="recompute")``.

Each timed call includes entering and leaving the context manager (discovery of the MoE layers, hook registration),
because that is what a caller pays per batch. Repetitions are interleaved (the order of modes rotates every
repetition) so that load from other processes on the shared CPU hits every mode alike; the ratio of a mode to plain is
taken per repetition and the median of those ratios is reported, next to the median times.

Usage: ``python benchmarks/bench_routing.py [--reps 15] [--batch 8] [--seq 256] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.replay_cache import RoutingCache
from rasa_trainer.moe.routing import record_routing, replay_routing

TARGETS = {"record": 1.10, "record+probs": 1.10, "replay cached": 1.05, "replay recompute": 1.05}


def benchmark_config(vocab_size: int = 1024, max_positions: int = 512):
    return AutoConfig.for_model(
        "olmoe", vocab_size=vocab_size, hidden_size=256, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def benchmark_model(seed: int = 0, **config_kwargs):
    """The benchmark OLMoE with routers re-initialised to std 0.5 (non-degenerate routing)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(benchmark_config(**config_kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iso-reps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = benchmark_model()
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}

    with torch.no_grad(), record_routing(model, probabilities=False) as rec:
        model(**inputs)
    routing = rec.routing()

    def plain():
        model(**inputs)

    def record():
        with record_routing(model, probabilities=False) as r:
            model(**inputs)
        return r.routing()

    def record_probs():
        with record_routing(model, probabilities=True) as r:
            model(**inputs)
        return r.routing()

    def replay_cached():
        with replay_routing(model, routing, weights="cached"):
            model(**inputs)

    def replay_recompute():
        with replay_routing(model, routing, weights="recompute"):
            model(**inputs)

    modes = {"plain": plain, "record": record, "record+probs": record_probs, "replay cached": replay_cached,
             "replay recompute": replay_recompute}
    names = list(modes)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in modes.values():
                fn()
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                start = time.perf_counter()
                modes[name]()
                times[name].append(time.perf_counter() - start)

    plain_median = statistics.median(times["plain"])
    tokens = args.batch * args.seq
    print(f"bench_routing: OLMoE 4 layers x 64 experts top-8, hidden 256, expert intermediate 128, batch "
          f"{args.batch} x {args.seq} = {tokens} tokens, {args.reps} interleaved reps, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, experts kernel {model.config._experts_implementation}")
    print(f"{'mode':<18} {'median ms':>10} {'min ms':>9} {'ratio (median of per-rep)':>26} {'ratio of medians':>17} {'target':>7} {'met':>4}")
    for name in names:
        ratios = [t / p for t, p in zip(times[name], times["plain"])]
        ratio = statistics.median(ratios)
        target = TARGETS.get(name)
        met = "" if target is None else ("yes" if ratio <= target else "NO")
        print(f"{name:<18} {1e3 * statistics.median(times[name]):>10.1f} {1e3 * min(times[name]):>9.1f} "
              f"{ratio:>26.3f} {statistics.median(times[name]) / plain_median:>17.3f} "
              f"{'' if target is None else f'<={target:.2f}':>7} {met:>4}")

    # Isolated overhead: the same context managers around calls of the routers alone, on the hidden states each
    # router received in the forward pass. The difference to the bare router calls is everything capture or replay
    # adds to a forward (context entry and exit, MoE discovery, hook registration, hook bodies); these runs take
    # milliseconds, so many interleaved repetitions give a stable number even on a loaded machine.
    routers = [layer.router for layer in moe_layers(model)]
    hidden: list[torch.Tensor] = []
    handles = [r.register_forward_pre_hook(lambda m, a: hidden.append(a[0].detach().clone())) for r in routers]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()

    def routers_only():
        for router, h in zip(routers, hidden):
            router(h)

    def iso_record(probs):
        def fn():
            with record_routing(model, probabilities=probs) as r:
                routers_only()
            return r.routing()
        return fn

    def iso_replay(mode):
        def fn():
            with replay_routing(model, routing, weights=mode):
                routers_only()
        return fn

    iso = {"plain": routers_only, "record": iso_record(False), "record+probs": iso_record(True),
           "replay cached": iso_replay("cached"), "replay recompute": iso_replay("recompute")}
    iso_times: dict[str, list[float]] = {n: [] for n in names}
    forward_times: list[float] = []  # a plain forward in every round, so the overhead is set against the same load
    with torch.no_grad():
        for rep in range(args.iso_reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                start = time.perf_counter()
                iso[name]()
                iso_times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            plain()
            forward_times.append(time.perf_counter() - start)
    print()
    print(f"isolated overhead ({args.iso_reps} interleaved rounds of the {len(routers)} router calls alone, with and "
          f"without the context manager, plus one plain forward per round);")
    print("overhead = median over rounds of (mode - bare router calls); share = median over rounds of overhead / "
          "plain forward of the same round; estimated ratio = 1 + share")
    print(f"{'mode':<18} {'overhead ms':>12} {'share of forward':>17} {'estimated ratio':>16} {'target':>7} {'met':>4}")
    for name in names[1:]:
        diffs = [t - b for t, b in zip(iso_times[name], iso_times["plain"])]
        shares = [d / f for d, f in zip(diffs, forward_times)]
        share = statistics.median(shares)
        ratio = 1 + share
        target = TARGETS[name]
        print(f"{name:<18} {1e3 * statistics.median(diffs):>12.2f} {100 * share:>16.2f}% {ratio:>16.4f} "
              f"{f'<={target:.2f}':>7} {'yes' if ratio <= target else 'NO':>4}")
    print(f"(plain forward in these rounds: median {1e3 * statistics.median(forward_times):.1f} ms; bare router calls: "
          f"median {1e3 * statistics.median(iso_times['plain']):.2f} ms)")

    cache = RoutingCache.record(model, [inputs])
    layers, k = routing.num_layers, routing.indices[0].shape[-1]
    print()
    print(f"stored routing per token (Routing.nbytes_per_token): indices {routing.indices[0].dtype} + weights "
          f"{routing.weights[0].dtype} = {routing.nbytes_per_token()} B "
          f"(indices alone {routing.nbytes_per_token(include_weights=False)} B; L*k = {layers}*{k})")
    print(f"replay cache per token (RoutingCache.nbytes_per_token): {cache.nbytes_per_token()} B "
          f"= L*k*(2 + {cache.weights.element_size()}) = {layers * k * (2 + cache.weights.element_size())} B; "
          f"{cache.nbytes_per_token() * 1e6 / 2**20:.1f} MiB per 1M tokens")


if __name__ == "__main__":
    main()
