"""Model cards for RASA checkpoints, rendered from the template in ``model_cards/``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jinja2

from ..utils import plain_value

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", "rasa_model_card.md")

_HYPERPARAMETERS = (
    "rasa_schedule", "rasa_rounds", "expert_tuning", "expert_lora_rank", "expert_lora_alpha", "expert_learning_rate",
    "router_learning_rate", "router_loss", "kl_direction", "replay_weights", "per_device_train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "weight_decay", "max_length", "seed",
)


def _selection_summary(selection) -> dict[str, Any] | None:
    if selection is None:
        return None
    data = selection.to_dict()
    by_layer: dict[int, dict[str, Any]] = {}
    for e in data["experts"]:
        row = by_layer.setdefault(e["moe_layer"], {"moe_layer": e["moe_layer"], "layer": e["layer"], "experts": []})
        row["experts"].append(e["expert"])
    model = data.get("model", {})
    num_routed = model.get("num_moe_layers", 0) * model.get("num_experts", 0) if isinstance(model, dict) else 0
    policy = data.get("selection", {}).get("policy", "?")
    return {
        "num_selected": len(data["experts"]),
        "num_routed": num_routed or "?",
        "policy": policy,
        "judge": data.get("judge"),
        "rows": [by_layer[k] for k in sorted(by_layer)],
    }


def card_evaluation(evaluation_results: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The card's evaluation section: ``rows`` of ``(metric, value, n, 95% interval)`` and the ``judges`` and
    ``sources`` (benchmark files with their SHA-256) the numbers came from.

    ``evaluation_results`` is ``{"report": SafetyReport or its to_dict(), other keys: shown as they are}`` (every rate
    with its ``n`` and Wilson interval), or a flat ``{metric: value}`` dict, whose rates are shown without ``n`` and
    interval (it carries neither; the card says so).
    """
    if not evaluation_results:
        return None
    from ..evaluation.evaluate import SafetyReport

    results = dict(evaluation_results)
    report = results.pop("report", None)
    if isinstance(report, Mapping):
        known = {f.name for f in dataclasses.fields(SafetyReport)}  # the derived "intervals" are recomputed
        report = SafetyReport(**{k: v for k, v in report.items() if k in known})
    if report is not None and not isinstance(report, SafetyReport):
        raise TypeError(f"evaluation_results['report'] is a {type(report).__name__}; expected a SafetyReport or its "
                        "to_dict()")
    rows = []
    if report is not None:
        for key, rate in report.rates().items():
            interval = "–" if rate.low is None else f"[{round(rate.low, 4)}, {round(rate.high, 4)}]"
            rows.append((key, round(rate.value, 4), rate.n, interval))
    for key, value in sorted(results.items()):
        rate = isinstance(value, float) and report is None  # a legacy rate: no n, no interval
        rows.append((key, round(value, 4) if isinstance(value, float) else value, "–" if rate else "",
                     "–" if rate else ""))
    judges = []
    for role, info in (report.judges if report is not None else {}).items():
        judges.append({"role": role.replace("_", " "), **{k: info.get(k) for k in ("name", "version", "format")}})
    return {"rows": rows, "with_intervals": report is not None, "judges": judges,
            "sources": list(report.sources) if report is not None else []}


def render_model_card(trainer, model_name: str, dataset_name: str | None = None, tags=None,
                      evaluation_results: dict | None = None) -> str:
    """The model card of a RASA run as markdown (``evaluation_results``: see :func:`card_evaluation`)."""
    from .. import __version__

    args = trainer.args
    model = trainer.model
    base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if base_model and os.path.isdir(base_model):
        base_model = None  # a local path is not a Hub id
    tag_list = list(trainer._tag_names) + ([tags] if isinstance(tags, str) else list(tags or []))
    attacks = sorted({row.get("attack") for row in _rows(trainer._pairs) if row.get("attack")})
    with open(TEMPLATE, encoding="utf-8") as f:
        template = jinja2.Template(f.read(), keep_trailing_newline=True)
    return template.render(
        model_name=model_name,
        base_model=base_model,
        tags=sorted(set(tag_list)),
        package_version=__version__,
        dataset_name=dataset_name,
        num_pairs=len(trainer._pairs),
        attacks=attacks,
        selection=_selection_summary(trainer.selection),
        schedule=args.rasa_schedule,
        hyperparameters=[(k, plain_value(getattr(args, k))) for k in _HYPERPARAMETERS] + _retain_settings(trainer),
        evaluation=card_evaluation(evaluation_results),
        citation=trainer._paper["citation"],
        adapter=args.expert_tuning == "lora" and args.rasa_schedule in ("alternate", "expert_only"),
    )


def _retain_settings(trainer) -> list[tuple[str, Any]]:
    """The retain data's settings, when the run mixed retain rows into its expert phase."""
    rows = getattr(trainer, "_retain", None)
    if rows is None:
        return []
    args = trainer.args
    return [("retain rows", len(rows)), ("retain_ratio", args.retain_ratio),
            ("retain_loss_weight", args.retain_loss_weight)]


def _rows(pairs):
    return pairs if isinstance(pairs, list) else pairs.to_list()
