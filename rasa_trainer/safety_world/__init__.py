"""SafetyWorld: an embedded synthetic world for testing and comparing MoE safety-alignment methods on a CPU.

- The **world** (`make_world`): seeded rows of jailbreaks (7 families: 4 aligned for training/detection, 3 held-out
  for cross-attack evaluation), plain harmful requests built from sanitised fictional goals, risky-sounding benign
  requests (over-refusal) and utility questions with exact answers. `train_pairs()` follows the RASA pair contract;
  `eval_sets()` gives "attacks", "anchors", "over_refusal", "utility" and "wrapped_benign"; `retain_pairs()` gives
  benign prompt/completion rows that never overlap the evaluation items (retain data).
- The **judge** (`SafetyWorldJudge`, `is_refusal`, `utility_correct`): exact string checks; gibberish is never safe.
- The **model** (`load_safety_world_model`, `build_safety_world_model`): a tiny Qwen3-MoE (4 layers x 16 experts,
  top-2) pretrained to refuse plain harmful requests but comply with every jailbreak family, with its unsafe behaviour
  routed through known "planted" experts (listed in `world.json`). `load_safety_world_model(variant="routing_decides")`
  loads the variant where routing decides the answer and the held-out families also use family experts that detection
  on the aligned families cannot see (see `pretraining.py`).

Example:

    from rasa_trainer.safety_world import SafetyWorldJudge, load_safety_world_model, make_world

    model, tokenizer = load_safety_world_model()
    world = make_world(seed=0)
    train = world.train_pairs()  # prompt, anchor_prompt, completion, goal, attack
    evals = world.eval_sets()  # attacks, anchors, over_refusal, utility, wrapped_benign
    retain = world.retain_pairs()  # prompt, completion, kind, key: benign rows disjoint from the evaluation items
"""

from .judge import SafetyWorldJudge, is_refusal, utility_correct
from .measure import MAX_NEW_TOKENS, generate_replies, measure_routing_checks, measure_world_rates
from .model import ASSETS_DIR, VARIANT_ASSETS, build_safety_world_model, load_safety_world_model, load_world_metadata
from .pretraining import VARIANTS, BuildConfig
from .tokenizer import CHAT_TEMPLATE, GENERATION_PROMPT
from .universe import (
    ALIGNED_FAMILIES,
    ATTACK_FAMILIES,
    COMPLIANCE,
    HELD_OUT_FAMILIES,
    HELPFUL,
    REFUSAL,
    REFUSAL_PREFIX,
    REFUSAL_VARIANTS,
    UNSAFE_MARKER,
)
from .world import SafetyWorld, make_world, utility_items

__all__ = [
    "ALIGNED_FAMILIES",
    "ASSETS_DIR",
    "ATTACK_FAMILIES",
    "BuildConfig",
    "CHAT_TEMPLATE",
    "COMPLIANCE",
    "GENERATION_PROMPT",
    "HELD_OUT_FAMILIES",
    "HELPFUL",
    "MAX_NEW_TOKENS",
    "REFUSAL",
    "REFUSAL_PREFIX",
    "REFUSAL_VARIANTS",
    "SafetyWorld",
    "SafetyWorldJudge",
    "UNSAFE_MARKER",
    "VARIANTS",
    "VARIANT_ASSETS",
    "build_safety_world_model",
    "generate_replies",
    "is_refusal",
    "load_safety_world_model",
    "load_world_metadata",
    "make_world",
    "measure_routing_checks",
    "measure_world_rates",
    "utility_correct",
    "utility_items",
]
