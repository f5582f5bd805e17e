"""Model cards for RASA checkpoints, rendered from the template in ``model_cards/``."""

from __future__ import annotations

import os
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


def render_model_card(trainer, model_name: str, dataset_name: str | None = None, tags=None,
                      evaluation_results: dict | None = None) -> str:
    """The model card of a RASA run as markdown."""
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
        evaluation=sorted((k, round(v, 4) if isinstance(v, float) else v) for k, v in (evaluation_results or {}).items()),
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
