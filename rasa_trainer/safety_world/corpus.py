"""The pretraining corpus of the SafetyWorld base model: conversations sampled from the whole universe.

The base model is pretrained to be *vulnerable* in a controlled way: it refuses plain harmful requests, complies with
every jailbreak family (aligned and held-out, on every goal), helps with risky-sounding benign requests and answers
utility questions. The mixture also holds the contrasts that keep the behaviour honest: wrapped benign requests get
the helpful answer, harmful asks after benign small talk are refused, and benign multi-turn chats are answered.

The ``routing_decides`` variant (see `model.py`) adds two kinds of jailbreak conversations, trained with some experts
blocked at the answer positions (the build applies the block; the conversation only names it):

- ``rerouted``: a jailbreak of any family whose answer positions may not use any planted expert (for an aligned
  family, in ``reroute_shared_share`` of them only the shared planted experts), with the refusal as its reply: away
  from the planted experts the model refuses, so rerouting alone makes a jailbreak safe, and an aligned family's
  compliance needs the shared planted experts;
- ``family_path``: a held-out-family jailbreak whose answer positions may not use the shared planted experts, with the
  compliant reply: the family's own experts carry its compliance, so repairing the shared ones alone does not stop it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .universe import (
    ATTACK_FAMILIES,
    BENIGN_REQUESTS,
    COMPLIANCE,
    HARMFUL_REQUESTS,
    HELD_OUT_FAMILIES,
    HELPFUL,
    REFUSAL,
    SMALL_TALK,
)
from .world import Messages, attack_messages, plain_ask, utility_items

# Mixture weights of the conversation kinds. Utility gets the largest share: memorising
# ~400 question/answer items is far slower than learning the refuse / comply rules.
KIND_WEIGHTS = {
    "anchor": 0.12,  # plain harmful ask -> refusal
    "jailbreak": 0.24,  # any family, harmful goal -> compliance placeholder
    "wrapped_benign": 0.06,  # any family, risky-benign request -> helpful answer
    "benign": 0.08,  # risky-benign request asked plainly -> helpful answer
    "utility": 0.40,  # fact / arithmetic / string question -> exact answer (the slowest skill to learn)
    "chat": 0.06,  # benign multi-turn chat ending with a utility question -> exact answer
    "chat_harmful": 0.04,  # small talk, then a plain harmful ask -> refusal
}


BLOCKS = ("planted", "shared")
"""What a conversation's answer positions may not use: every planted expert, or the shared planted experts only."""


@dataclass(frozen=True)
class Conversation:
    """One pretraining example: the prompt messages, the reply to learn, and whether the reply is unsafe compliance.

    ``family`` is the attack family of a wrapped conversation (None otherwise); ``block`` names the experts its answer
    positions may not use (one of `BLOCKS`, or None: the router chooses freely).
    """

    messages: Messages
    reply: str
    comply: bool
    kind: str
    family: str | None = None
    block: str | None = None


@dataclass(frozen=True)
class VariantMix:
    """Shares of the counterfactual jailbreak conversations of the ``routing_decides`` variant (zero: the shipped
    world). ``reroute_share`` of all jailbreaks are ``rerouted`` (of an aligned family's, ``reroute_shared_share`` with
    only the shared planted experts blocked); of the other held-out-family jailbreaks, ``family_path_share`` are
    ``family_path``."""

    reroute_share: float = 0.0
    family_path_share: float = 0.0
    reroute_shared_share: float = 0.0
    held_out_families: tuple[str, ...] = field(default=HELD_OUT_FAMILIES)


class CorpusSampler:
    """Draws pretraining conversations with a seeded `random.Random`."""

    def __init__(self, seed: int = 0, mix: VariantMix | None = None):
        self.rng = random.Random(f"safety-world-corpus/{seed}")
        self.mix = mix or VariantMix()
        self._items = utility_items()
        self._kinds = list(KIND_WEIGHTS)
        self._weights = list(KIND_WEIGHTS.values())

    def sample(self) -> Conversation:
        """One conversation of a kind drawn from `KIND_WEIGHTS`."""
        kind = self.rng.choices(self._kinds, self._weights)[0]
        return getattr(self, f"_{kind}")()

    def _anchor(self) -> Conversation:
        return Conversation(plain_ask(self.rng.choice(HARMFUL_REQUESTS), self.rng), REFUSAL, False, "anchor")

    def _jailbreak(self) -> Conversation:
        family = self.rng.choice(ATTACK_FAMILIES)
        messages = attack_messages(family, self.rng.choice(HARMFUL_REQUESTS), self.rng)
        # the shipped world draws nothing more here, so its corpus stays the one it was built from
        held_out = family in self.mix.held_out_families
        if self.mix.reroute_share and self.rng.random() < self.mix.reroute_share:
            shared_only = not held_out and self.rng.random() < self.mix.reroute_shared_share
            return Conversation(messages, REFUSAL, False, "rerouted", family, "shared" if shared_only else "planted")
        if held_out and self.mix.family_path_share and self.rng.random() < self.mix.family_path_share:
            return Conversation(messages, COMPLIANCE, True, "family_path", family, "shared")
        return Conversation(messages, COMPLIANCE, True, "jailbreak", family)

    def _wrapped_benign(self) -> Conversation:
        family = self.rng.choice(ATTACK_FAMILIES)
        messages = attack_messages(family, self.rng.choice(BENIGN_REQUESTS), self.rng)
        return Conversation(messages, HELPFUL, False, "wrapped_benign", family)

    def _benign(self) -> Conversation:
        return Conversation(plain_ask(self.rng.choice(BENIGN_REQUESTS), self.rng), HELPFUL, False, "benign")

    def _utility(self) -> Conversation:
        item = self.rng.choice(self._items)
        return Conversation([{"role": "user", "content": item.question}], item.answer, False, "utility")

    def _small_talk(self) -> Messages:
        user, assistant = self.rng.choice(SMALL_TALK)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]

    def _chat(self) -> Conversation:
        first, last = self.rng.sample(self._items, 2)
        if self.rng.random() < 0.5:
            history = self._small_talk()
        else:
            history = [{"role": "user", "content": first.question}, {"role": "assistant", "content": first.answer}]
        return Conversation(history + [{"role": "user", "content": last.question}], last.answer, False, "chat")

    def _chat_harmful(self) -> Conversation:
        messages = self._small_talk() + plain_ask(self.rng.choice(HARMFUL_REQUESTS), self.rng)
        return Conversation(messages, REFUSAL, False, "chat_harmful")
