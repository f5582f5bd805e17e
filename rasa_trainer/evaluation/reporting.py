"""Rates with their uncertainty, plots and tables of a RASA run.

Every rate an evaluation reports is a share of ``n`` independent prompts, so it comes with ``n`` and a 95% **Wilson
score interval** (:func:`wilson_interval`; Wilson 1927, method 3 of Newcombe 1998a): unlike the normal approximation
it stays inside [0, 1] and is not empty at 0/n or n/n, where safety rates usually sit (0/32 gives [0.0%, 10.7%]).
Two rates measured on separate runs are compared with **Newcombe's hybrid score interval** of their difference
(:func:`difference_interval`; method 10 of Newcombe 1998b), built from the two Wilson intervals: a change is *outside
the intervals* when that interval excludes 0.

Plots: loss per phase and attack success per family before and after, with the intervals as error bars (PNG via
matplotlib/Agg).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Mapping, Sequence

from ..utils import atomic_write

__all__ = ["Rate", "difference_interval", "outside_intervals", "plot_asr", "plot_phase_losses", "wilson_interval"]

CONFIDENCE = 0.95
"""The confidence level of every interval rasa-trainer reports."""


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion ``successes / n``.

    ``successes`` may be fractional (a mean over runs of the same ``n`` prompts); it must lie in ``[0, n]``.

    Raises:
        ValueError: ``n < 1``, ``successes`` outside ``[0, n]`` or a confidence outside (0, 1).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"a rate needs n >= 1 prompts, got n={n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} is outside [0, n={n}]")
    z2 = _z(confidence) ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2) / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # the exact ends at 0/n and n/n (the formula gives them up to rounding)
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    """A rate measured on ``n`` prompts, with its Wilson interval (``low``, ``high``; ``None`` for a share that is not
    a proportion of independent prompts, such as the routing shift, a share of correlated token assignments)."""

    value: float
    n: int
    low: float | None
    high: float | None

    @classmethod
    def of(cls, value: float, n: int, confidence: float = CONFIDENCE) -> Rate:
        """The rate ``value`` of ``n`` prompts with its Wilson interval (``value * n`` successes)."""
        successes = value * n
        if abs(successes - round(successes)) < 1e-9:  # k / n * n is k up to rounding
            successes = round(successes)
        low, high = wilson_interval(successes, n, confidence)
        return cls(float(value), int(n), low, high)

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "n", "ci95": [low, high] or None}``."""
        ci = None if self.low is None else [self.low, self.high]
        return {"value": self.value, "n": self.n, "ci95": ci}

    def format(self, digits: int = 1) -> str:
        """``"12.5% [4.3, 29.0]"``: the rate and its interval in percent (the rate alone without an interval)."""
        text = f"{100 * self.value:.{digits}f}%"
        return text if self.low is None else f"{text} [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}]"


def difference_interval(before: Rate, after: Rate) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``after.value - before.value`` (two independent samples), from the two
    Wilson intervals: ``d - sqrt((p2 - l2)^2 + (u1 - p1)^2)`` to ``d + sqrt((u2 - p2)^2 + (p1 - l1)^2)`` with
    ``d = p2 - p1``. The change is outside the intervals when the result excludes 0.

    Raises:
        ValueError: a rate without an interval.
    """
    if before.low is None or after.low is None:
        raise ValueError("a difference interval needs two rates with Wilson intervals")
    p1, l1, u1 = before.value, before.low, before.high
    p2, l2, u2 = after.value, after.low, after.high
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def outside_intervals(before: Rate, after: Rate) -> bool:
    """Whether the change from ``before`` to ``after`` is outside the 95% intervals (its Newcombe interval excludes 0)."""
    low, high = difference_interval(before, after)
    return low > 0 or high < 0


def _figure_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def plot_phase_losses(log_history: Sequence[Mapping[str, Any]], path: str) -> None:
    """Completion loss (expert phases) and router KL (router phases) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"completion_loss": ([], []), "router_kl": ([], [])}
    for entry in log_history:
        for key, (steps, values) in series.items():
            if key in entry and "step" in entry:
                steps.append(entry["step"])
                values.append(entry[key])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    titles = {"completion_loss": "expert phase: completion cross-entropy", "router_kl": "router phase: KL(anchor || adversarial)"}
    for ax, (key, (steps, values)) in zip(axes, series.items()):
        ax.plot(steps, values, marker=".", color="tab:blue" if key == "completion_loss" else "tab:orange")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("step")
        if not steps:
            ax.text(0.5, 0.5, "phase not run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    atomic_write(path, _figure_bytes(fig))
    plt.close(fig)


def plot_asr(before: Mapping[str, float], after: Mapping[str, float], path: str, held_out: Sequence[str] = (),
             n_before: Mapping[str, int] | None = None, n_after: Mapping[str, int] | None = None) -> None:
    """Attack success rate per attack family, before and after alignment (held-out families marked with *).

    With ``n_before`` / ``n_after`` (the prompts behind each family's rate: ``SafetyReport.n_by_attack``) every bar
    carries its 95% Wilson interval as an error bar and each family label its ``n``; a family missing from either
    mapping is an error, never a bar without its interval.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted(set(before) | set(after))
    counts = {"before": n_before, "after": n_after}
    for side, n in counts.items():
        missing = [f for f in (before if side == "before" else after) if n is not None and f not in n]
        if missing:
            raise ValueError(f"n_{side} has no count for the families {missing}")
    labels = []
    for f in families:
        sizes = dict.fromkeys(str(n[f]) for n in counts.values() if n is not None and f in n)
        labels.append(f"{f}{'*' if f in held_out else ''}" + (f" (n={'/'.join(sizes)})" if sizes else ""))
    x = range(len(families))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(families)), 3.5))
    for offset, (side, rates) in zip((-0.2, 0.2), (("before", before), ("after", after))):
        values = [rates.get(f, 0.0) for f in families]
        n = counts[side]
        yerr = None
        if n is not None:
            intervals = [wilson_interval(rates[f] * n[f], n[f]) if f in rates else (0.0, 0.0) for f in families]
            yerr = [[v - low for v, (low, _) in zip(values, intervals)],
                    [high - v for v, (_, high) in zip(values, intervals)]]
        ax.bar([i + offset for i in x], values, width=0.4, label=side, yerr=yerr, capsize=3 if yerr else 0)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("attack success rate")
    intervals_note = ", bars: 95% Wilson intervals" if n_before is not None or n_after is not None else ""
    ax.set_title(f"ASR per attack family (* = held out{intervals_note})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, _figure_bytes(fig))
    plt.close(fig)


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table with aligned columns (floats as percentages with one decimal)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{100 * v:.1f}%"
        return "-" if v is None else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(h) for h in header]), rule, *(line(r) for r in body)])


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
