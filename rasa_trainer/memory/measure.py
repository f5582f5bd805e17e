"""What the CPU allocator really holds during a call: the yardstick the memory plan's tests and benchmarks hold the
plan against (profiler memory events, so no GPU is needed)."""

from __future__ import annotations

from typing import Callable

__all__ = ["cpu_allocated_peak"]


def cpu_allocated_peak(fn: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator holds above its level at the start of ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        level += nbytes
        peak = max(peak, level)
    return peak
