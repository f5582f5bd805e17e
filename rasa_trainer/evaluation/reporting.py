"""Plots and tables of a RASA run: loss per phase and attack success before and after (PNG via matplotlib/Agg)."""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

from ..utils import atomic_write


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


def plot_asr(before: Mapping[str, float], after: Mapping[str, float], path: str, held_out: Sequence[str] = ()) -> None:
    """Attack success rate per attack family, before and after alignment (held-out families marked with *)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted(set(before) | set(after))
    labels = [f"{f}*" if f in held_out else f for f in families]
    x = range(len(families))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(families)), 3.5))
    ax.bar([i - 0.2 for i in x], [before.get(f, 0.0) for f in families], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], [after.get(f, 0.0) for f in families], width=0.4, label="after")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("attack success rate")
    ax.set_title("ASR per attack family (* = held out)", fontsize=10)
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
