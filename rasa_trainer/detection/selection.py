"""Selecting Safety-Critical Experts from :class:`~rasa_trainer.detection.statistics.ExpertStatistics`, and the result object
:class:`SafetyCriticalExperts` with its artifacts (JSON, CSV, heatmap). No pickle: JSON with a schema version.

The policies live in one registry (:mod:`rasa_trainer.detection.policies`: ``global_topk``, ``per_layer_topk``,
``batch_union``, ``per_layer_top_p``, ``random`` and any registered with ``register_policy``); :data:`POLICIES` is the
tuple of their names.

``num_experts`` below 1 is a fraction (of all routed experts ``L * E``, or of ``E`` for a per-layer policy such as
``per_layer_topk``), 1 or more an integral count. The authors used 12.5% and threshold 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..moe.discovery import moe_layers, unwrap_model
from ..utils import atomic_write
from .policies import get_policy, policy_names
from .statistics import ExpertStatistics

__all__ = [
    "EmptySelectionError", "POLICIES", "SafetyCriticalExperts", "SelectedExpert", "SelectionConfig", "select_experts",
]

SCHEMA_VERSION = 1
JSON_NAME = "safety_critical_experts.json"
CSV_NAME = "expert_stats.csv"
PNG_NAME = "risk_difference.png"


def __getattr__(name: str):
    if name == "POLICIES":  # the registered policy names, read now (a policy may have been registered since import)
        return policy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EmptySelectionError(ValueError):
    """No expert met the selection criteria (or no pair survived the filter); the message shows the statistics."""


# ------------------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class SelectionConfig:
    """How Safety-Critical Experts are chosen from the risk differences (see the module docstring)."""

    policy: str = "global_topk"
    num_experts: float = 0.125
    threshold: float = 0.0
    top_p_experts: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        get_policy(self.policy)  # a ValueError naming the registered policies
        if not self.num_experts > 0 or (self.num_experts >= 1 and self.num_experts != int(self.num_experts)):
            raise ValueError(
                f"num_experts={self.num_experts}: give a fraction in (0, 1) or a whole count >= 1"
            )
        if not 0.0 < self.top_p_experts <= 1.0:
            raise ValueError(f"top_p_experts={self.top_p_experts}; expected a value in (0, 1]")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold={self.threshold}; expected a finite number")

    def resolve_k(self, pool: int) -> int:
        """K as a count for a pool of ``pool`` experts (a fraction rounds to the nearest count, at least 1)."""
        k = max(1, round(self.num_experts * pool)) if self.num_experts < 1 else int(self.num_experts)
        if k > pool:
            raise ValueError(f"num_experts={self.num_experts} asks for {k} experts but only {pool} are available")
        return k

    def pool(self, num_layers: int, num_experts: int) -> int:
        """How many experts ``num_experts`` is counted against: ``E`` for a per-layer policy (per_layer_topk), else
        all ``L * E``."""
        return num_experts if get_policy(self.policy).k_pool == "layer" else num_layers * num_experts

    def k(self, num_layers: int, num_experts: int) -> int | None:
        """The resolved K of this policy on a model (per layer for per_layer_topk; None for a policy without a K,
        per_layer_top_p)."""
        if get_policy(self.policy).k_pool is None:
            return None
        return self.resolve_k(self.pool(num_layers, num_experts))

    def vote_k(self, num_layers: int, num_experts: int) -> int | None:
        """K of the per-batch votes the statistics must collect for this policy (batch_union), else None."""
        return self.resolve_k(num_layers * num_experts) if get_policy(self.policy).batch_votes else None

    def check(self, num_layers: int, num_experts: int) -> None:
        """Fail before any generation when K does not fit the model."""
        self.resolve_k(self.pool(num_layers, num_experts))
        self.resolve_k(num_layers * num_experts)  # the per-batch votes count against all experts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------------ select


def select_experts(
    stats: ExpertStatistics, config: SelectionConfig, *, pairs: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The selection as a bool mask ``[L, E]``.

    Raises:
        EmptySelectionError: nothing was selected; the message shows ``pairs`` (kept/dropped counts), token counts and
            the largest RD, with hints.
    """
    if pairs is not None and pairs.get("kept", 1) == 0:
        raise EmptySelectionError(_empty_message(stats, config, pairs, "no pair survived the filter"))
    mask = get_policy(config.policy).select(stats, config)
    shape = (stats.num_layers, stats.num_experts)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"selection policy {config.policy!r} returned {got}; a policy returns a bool mask {shape}")
    if not mask.any():
        raise EmptySelectionError(_empty_message(stats, config, pairs, "no expert met the selection criteria"))
    return mask


def _empty_message(stats: ExpertStatistics, config: SelectionConfig, pairs: Mapping[str, Any] | None, why: str) -> str:
    rd = stats.risk_difference()
    lines = [f"Safety-Critical Expert selection is empty: {why}."]
    if pairs is not None:
        lines.append(
            f"  pairs: {pairs.get('total')} total, {pairs.get('kept')} kept (anchor refused, attack succeeded), "
            f"{pairs.get('dropped')} dropped by reason {dict(pairs.get('dropped_by_reason', {}))}"
        )
        if pairs.get("by_attack"):
            lines.append(f"  by attack: {json.dumps(pairs['by_attack'], sort_keys=True)}")
    lines.append(
        f"  tokens: {stats.adversarial_tokens} adversarial, {stats.anchor_tokens} anchor; "
        f"max RD = {float(rd.max()):.4f}; policy {config.policy}, threshold {config.threshold}"
    )
    lines.append(
        "  Fixes: if no pair was kept, check the judge (does it recognise the model's refusals?) and the data (do "
        "anchors get refused and attacks succeed on this model?), or add pairs; raise max_new_tokens if replies are "
        "cut before a refusal shows; if pairs were kept but no RD exceeds the threshold, lower the threshold."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class SelectedExpert:
    """One Safety-Critical Expert: ``layer`` is the decoder layer index, ``moe_layer`` the index among MoE layers."""

    layer: int
    moe_layer: int
    expert: int
    risk_difference: float
    rate_adversarial: float
    rate_anchor: float


@dataclass
class SafetyCriticalExperts:
    """The Safety-Critical Experts of a model, with everything needed to reproduce and check the detection.

    Build it with :func:`rasa_trainer.detection.detect.detect_safety_critical_experts` (or :meth:`from_statistics`), save it
    with :meth:`save` and read it back with :meth:`load`. ``statistics`` is kept in memory only (it feeds the CSV and
    the heatmap) and is ``None`` after :meth:`load`.
    """

    experts: list[SelectedExpert]
    model_type: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    moe_layer_indices: list[int]
    model_name: str | None = None
    model_revision: str | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    judge: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    package_version: str | None = None
    statistics: ExpertStatistics | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_consistent()

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_statistics(
        cls,
        model,
        stats: ExpertStatistics,
        mask: torch.Tensor,
        *,
        selection: Mapping[str, Any] | None = None,
        judge: str | None = None,
        generation: Mapping[str, Any] | None = None,
        pairs: Mapping[str, Any] | None = None,
        model_revision: str | None = None,
    ) -> "SafetyCriticalExperts":
        """The selection ``mask`` ``[L, E]`` of ``stats`` on ``model``, sorted by decreasing RD."""
        from .. import __version__

        layers = moe_layers(model)
        config = unwrap_model(model).config
        rd = stats.risk_difference()
        adversarial, anchor = stats.rates()
        picked = mask.nonzero().tolist()
        picked.sort(key=lambda le: (-float(rd[le[0], le[1]]), le[0], le[1]))
        experts = [
            SelectedExpert(layers[l].layer_index, l, e, float(rd[l, e]), float(adversarial[l, e]), float(anchor[l, e]))
            for l, e in picked
        ]
        return cls(
            experts=experts,
            model_type=_model_type(model),
            num_moe_layers=len(layers),
            num_experts=layers[0].num_experts,
            top_k=layers[0].top_k,
            moe_layer_indices=[layer.layer_index for layer in layers],
            model_name=getattr(config, "_name_or_path", None) or None,
            model_revision=model_revision or getattr(config, "_commit_hash", None),
            selection=dict(selection or {}),
            judge=judge,
            generation=dict(generation or {}),
            pairs=dict(pairs or {}),
            tokens={"adversarial": stats.adversarial_tokens, "anchor": stats.anchor_tokens},
            package_version=__version__,
            statistics=stats,
        )

    # ------------------------------------------------------------------------------------------------ views

    def __len__(self) -> int:
        return len(self.experts)

    def by_moe_layer(self) -> dict[int, list[int]]:
        """``{moe_layer: sorted experts}`` for the MoE layers that hold at least one selected expert."""
        out: dict[int, list[int]] = {}
        for e in self.experts:
            out.setdefault(e.moe_layer, []).append(e.expert)
        return {layer: sorted(experts) for layer, experts in sorted(out.items())}

    def mask(self) -> torch.Tensor:
        """The selection as a bool mask ``[num_moe_layers, num_experts]``."""
        mask = torch.zeros(self.num_moe_layers, self.num_experts, dtype=torch.bool)
        for e in self.experts:
            mask[e.moe_layer, e.expert] = True
        return mask

    # ------------------------------------------------------------------------------------------------ (de)serialise

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "package_version": self.package_version,
            "model": {
                "name_or_path": self.model_name,
                "revision": self.model_revision,
                "model_type": self.model_type,
                "num_moe_layers": self.num_moe_layers,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "moe_layer_indices": list(self.moe_layer_indices),
            },
            "selection": dict(self.selection),
            "judge": self.judge,
            "generation": dict(self.generation),
            "pairs": dict(self.pairs),
            "tokens": dict(self.tokens),
            "num_selected": len(self.experts),
            "experts": [asdict(e) for e in self.experts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SafetyCriticalExperts":
        version = data.get("schema_version") if isinstance(data, Mapping) else None
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"safety-critical experts file has schema_version {version!r}; this rasa_trainer reads version "
                f"{SCHEMA_VERSION}. Re-run detection with this version (examples/detect_experts.py)."
            )
        try:
            model = data["model"]
            return cls(
                experts=[SelectedExpert(**e) for e in data["experts"]],
                model_type=model["model_type"],
                num_moe_layers=int(model["num_moe_layers"]),
                num_experts=int(model["num_experts"]),
                top_k=int(model["top_k"]),
                moe_layer_indices=[int(i) for i in model["moe_layer_indices"]],
                model_name=model.get("name_or_path"),
                model_revision=model.get("revision"),
                selection=dict(data.get("selection") or {}),
                judge=data.get("judge"),
                generation=dict(data.get("generation") or {}),
                pairs=dict(data.get("pairs") or {}),
                tokens=dict(data.get("tokens") or {}),
                package_version=data.get("package_version"),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed safety-critical experts file: {type(err).__name__}: {err}") from err

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``safety_critical_experts.json`` and, when statistics are at hand, ``expert_stats.csv`` and
        ``risk_difference.png`` into ``output_dir`` (created if needed), each atomically. Returns the JSON path."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / JSON_NAME
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")
        if self.statistics is not None:
            atomic_write(out / CSV_NAME, expert_table_csv(self))
            atomic_write(out / PNG_NAME, risk_difference_png(self))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SafetyCriticalExperts":
        """Read a saved selection from its JSON file or from the directory holding ``safety_critical_experts.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / JSON_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run detection first (examples/detect_experts.py)")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    # ------------------------------------------------------------------------------------------------ checks

    def _check_consistent(self) -> None:
        if len(self.moe_layer_indices) != self.num_moe_layers:
            raise ValueError(f"{len(self.moe_layer_indices)} MoE layer indices for {self.num_moe_layers} MoE layers")
        seen = set()
        for e in self.experts:
            for name in ("layer", "moe_layer", "expert"):
                value = getattr(e, name)
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ValueError(f"a selected expert has {name}={value!r}; layer, MoE layer and expert ids must be "
                                     f"integers")
            if not (0 <= e.moe_layer < self.num_moe_layers and 0 <= e.expert < self.num_experts):
                raise ValueError(
                    f"expert {e.expert} of MoE layer {e.moe_layer} is outside the recorded shape "
                    f"{self.num_moe_layers} MoE layers x {self.num_experts} experts"
                )
            if e.layer != self.moe_layer_indices[e.moe_layer]:
                raise ValueError(f"MoE layer {e.moe_layer} is decoder layer {self.moe_layer_indices[e.moe_layer]}, "
                                 f"but an expert records layer {e.layer}")
            if (e.moe_layer, e.expert) in seen:
                raise ValueError(f"expert {e.expert} of MoE layer {e.moe_layer} is listed twice")
            seen.add((e.moe_layer, e.expert))

    def validate(self, model) -> None:
        """Check that these experts fit ``model``: model type, number of MoE layers and their decoder positions,
        experts per layer, top-k, indices in range. Raises ``ValueError`` naming every difference."""
        layers = moe_layers(model)
        problems = []
        model_type = _model_type(model)
        if model_type != self.model_type:
            problems.append(f"model_type is {model_type!r}, the experts were detected on {self.model_type!r}")
        if len(layers) != self.num_moe_layers:
            problems.append(
                f"the model has {len(layers)} MoE layers, the experts were detected on {self.num_moe_layers}"
            )
        elif [layer.layer_index for layer in layers] != list(self.moe_layer_indices):
            problems.append(f"MoE layers sit at decoder layers {[l.layer_index for l in layers]}, the experts were "
                            f"detected with {list(self.moe_layer_indices)}")
        if {layer.num_experts for layer in layers} != {self.num_experts}:
            problems.append(f"experts per MoE layer: model {sorted({l.num_experts for l in layers})}, recorded "
                            f"{self.num_experts}")
        if {layer.top_k for layer in layers} != {self.top_k}:
            problems.append(f"top-k: model {sorted({l.top_k for l in layers})}, recorded {self.top_k}")
        out_of_range = [(e.moe_layer, e.expert) for e in self.experts
                        if e.moe_layer >= len(layers) or e.expert >= layers[e.moe_layer].num_experts]
        if out_of_range:
            problems.append(f"{len(out_of_range)} selected (moe_layer, expert) pairs are out of range for this model, "
                            f"e.g. {out_of_range[:3]}")
        if problems:
            raise ValueError(
                f"these Safety-Critical Experts do not fit {type(unwrap_model(model)).__name__}:\n"
                + "\n".join(f"  - {p}" for p in problems)
                + f"\nThey were detected on {self.model_name or 'an unnamed model'} ({self.model_type}, "
                f"{self.num_moe_layers} MoE layers x {self.num_experts} experts, top-{self.top_k}). Run detection on "
                f"this model (rasa_trainer.detection.detect.detect_safety_critical_experts or examples/detect_experts.py), "
                f"or load the file detected on it."
            )


def _model_type(model) -> str:
    config = unwrap_model(model).config
    return str(getattr(config, "model_type", "") or type(unwrap_model(model)).__name__)


# ------------------------------------------------------------------------------------------------------------ artifacts


CSV_COLUMNS = (
    "layer", "moe_layer", "expert", "count_adversarial", "count_anchor", "tokens_adversarial", "tokens_anchor",
    "rate_adversarial", "rate_anchor", "risk_difference", "batch_rd_mean", "batch_rd_std", "mean_prob_adversarial",
    "mean_prob_anchor", "selected",
)


def expert_table_csv(result: SafetyCriticalExperts) -> str:
    """One row per (MoE layer, expert): counts, rates, RD, per-batch RD mean/std, mean probabilities, selected flag."""
    stats = result.statistics
    if stats is None:
        raise ValueError("no statistics in memory (a loaded selection carries none); run detection to get the table")
    L, E = stats.num_layers, stats.num_experts
    adversarial, anchor = stats.rates()
    rd = adversarial - anchor
    batch_mean, batch_std = stats.batch_risk_difference()
    prob_adv, prob_anc = stats.mean_probabilities()
    missing = torch.full((L, E), float("nan"), dtype=torch.float64)
    layer_of = torch.tensor(result.moe_layer_indices).view(L, 1).expand(L, E)
    columns = [
        layer_of, torch.arange(L).view(L, 1).expand(L, E), torch.arange(E).view(1, E).expand(L, E),
        stats.adversarial_counts, stats.anchor_counts,
        torch.full((L, E), stats.adversarial_tokens), torch.full((L, E), stats.anchor_tokens),
        adversarial, anchor, rd, batch_mean, batch_std,
        prob_adv if prob_adv is not None else missing, prob_anc if prob_anc is not None else missing,
        result.mask().long(),
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = zip(*(c.reshape(-1).tolist() for c in columns))
    writer.writerows([_csv_value(v) for v in row] for row in rows)
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def risk_difference_png(result: SafetyCriticalExperts) -> bytes:
    """A layers x experts heatmap of RD (diverging colormap centred at 0) with the selected experts outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = result.statistics
    if stats is None:
        raise ValueError("no statistics in memory (a loaded selection carries none); run detection to plot RD")
    rd = stats.risk_difference().numpy()
    L, E = rd.shape
    # the object-oriented API with the Agg canvas: no pyplot global state, no display needed
    fig = Figure(figsize=(max(6.0, min(4 + E * 0.12, 24)), max(3.0, min(2 + L * 0.3, 16))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bound = max(float(abs(rd).max()), 1e-6)
    image = ax.imshow(rd, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    selected = result.mask().nonzero().numpy()
    if len(selected):
        ax.scatter(selected[:, 1], selected[:, 0], s=max(4.0, 160.0 / max(L, E) ** 0.5), marker="s",
                   facecolors="none", edgecolors="black", linewidths=0.8)
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    step = max(1, L // 16)
    ax.set_yticks(range(0, L, step), [str(result.moe_layer_indices[i]) for i in range(0, L, step)])
    ax.set_title(
        f"RD = rate(jailbreak) - rate(refused anchor)\n{len(selected)} selected (outlined), "
        f"policy {result.selection.get('policy', '?')}",
        fontsize="medium",
    )
    fig.colorbar(image, ax=ax, label="RD")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
