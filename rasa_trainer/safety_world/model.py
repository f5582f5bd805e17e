"""The SafetyWorld base model's build driver and saved artefact: build, save and load a tiny Qwen3-MoE.

`build_safety_world_model` trains the tokenizer, pretrains the model on the world's conversations (`pretraining`,
whose docstring describes the planting and balance terms and the ``routing_decides`` variant), measures it
(`measure`) and saves it with its `world.json`.

The result is saved as a standard transformers checkpoint (safetensors + JSON, no pickle); `load_safety_world_model`
loads it with `AutoModelForCausalLM`, no custom code.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from .corpus import CorpusSampler
from .measure import (
    MAX_NEW_TOKENS,
    _family_routing_stats,
    _planted_routing_stats,
    measure_routing_checks,
    measure_world_rates,
)
from .pretraining import VARIANTS, BuildConfig, _encode, _init_model, _pick_family_experts, _pick_planted, _pretrain
from .tokenizer import GENERATION_PROMPT, train_tokenizer
from .world import make_world, utility_items

ASSETS_DIR = Path(__file__).parent / "assets"
"""Where the shipped base model lives."""

VARIANT_ASSETS = {"shared": ASSETS_DIR, "routing_decides": Path(__file__).parent / "assets_routing_decides"}
"""Where each variant's shipped model lives."""

WORLD_FILE = "world.json"


def build_safety_world_model(output_dir: str | Path, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Build the SafetyWorld base model from scratch and save it to `output_dir`.

    Trains the tokenizer, pretrains a tiny Qwen3-MoE on the world's conversations (seeded), measures its greedy base
    rates on `make_world(eval_world_seed)` and writes config.json, model.safetensors, generation_config.json, the
    tokenizer files and `world.json` (build settings, planted experts, measured rates, build time).

    Args:
        output_dir: where to save (created if missing).
        seed: seeds the corpus, tokenizer data, initialisation, batches and planted experts.
        **overrides: any field of [`BuildConfig`] (e.g. `steps=800`, `variant="routing_decides"`).

    Returns:
        The metadata written to `world.json`.
    """
    cfg = BuildConfig(seed=seed, **overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:
        return _build(Path(output_dir), cfg)
    finally:
        torch.set_num_threads(threads)


def _build(output_dir: Path, cfg: BuildConfig) -> dict[str, Any]:
    start = time.time()
    seed = cfg.seed
    cfg.planted_experts = _pick_planted(cfg)
    if cfg.variant != "shared":
        cfg.family_experts = _pick_family_experts(cfg)

    sampler = CorpusSampler(seed, cfg.variant_mix())
    pool = [sampler.sample() for _ in range(cfg.pool_size)]
    texts = [m["content"] for c in pool for m in c.messages] + [c.reply for c in pool]
    texts += [f"{it.question} {it.answer}" for it in utility_items()]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    data = [_encode(tokenizer, c) for c in pool]

    model = _init_model(cfg, tokenizer)
    history = _pretrain(model, data, cfg, tokenizer.pad_token_id)
    train_seconds = time.time() - start

    rates = measure_world_rates(model, tokenizer, make_world(cfg.eval_world_seed))
    probe = [d for d in data if d.comply][:256] + [d for d in data if not d.comply][:256]
    routing = _planted_routing_stats(model, probe, cfg, tokenizer.pad_token_id)
    meta = {
        "name": "safety_world",
        "seed": seed,
        "build": asdict(cfg),
        "planted_experts": cfg.planted_experts,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "max_new_tokens": MAX_NEW_TOKENS,
        "generation_prompt": GENERATION_PROMPT,
        "base_rates": rates,
        "planted_routing": routing,
        "loss_history": history,
        "train_seconds": round(train_seconds, 1),
    }
    if cfg.variant != "shared":
        meta.update(variant=cfg.variant, family_experts=cfg.family_experts,
                    family_routing=_family_routing_stats(model, data, cfg, tokenizer.pad_token_id))
        meta["routing_checks"] = measure_routing_checks(model, tokenizer, meta, make_world(cfg.eval_world_seed))
    meta["build_seconds"] = round(time.time() - start, 1)
    meta["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    _save(model, tokenizer, meta, output_dir)
    return meta


def _save(model, tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    (output_dir / WORLD_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _variant_path(path: str | Path | None, variant: str) -> Path:
    if path is not None:
        return Path(path)
    if variant not in VARIANT_ASSETS:
        raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}")
    return VARIANT_ASSETS[variant]


def load_safety_world_model(path: str | Path | None = None, variant: str = "shared", **kwargs: Any):
    """Load the SafetyWorld base model and tokenizer (the shipped assets by default).

    Args:
        path: a directory written by [`build_safety_world_model`]; None loads the model shipped for `variant`.
        variant: one of `VARIANTS` (used when `path` is None): ``"shared"`` (the default world) or
            ``"routing_decides"``.
        **kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype=torch.bfloat16`).

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    path = _variant_path(path, variant)
    if not (path / "config.json").exists():
        extra = "" if variant == "shared" else f", variant={variant!r}"
        raise FileNotFoundError(
            f"no SafetyWorld model in {path}; build one with build_safety_world_model({str(path)!r}{extra})"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval(), tokenizer


def load_world_metadata(path: str | Path | None = None, variant: str = "shared") -> dict[str, Any]:
    """The `world.json` of a built model (the shipped one of `variant` by default): seed, planted experts (and the
    family experts of the ``routing_decides`` variant), measured base rates."""
    path = _variant_path(path, variant)
    return json.loads((path / WORLD_FILE).read_text())
