"""SafetyWorld: a seeded synthetic world of jailbreaks, plain harmful requests, risky-benign requests and utility
questions, exported in the RASA dataset contract (see `rasa_trainer/data.py`).

The universe (names, goals, templates) is fixed in `universe.py`; the seed draws the goals, splits them into disjoint
train and test sets and picks the template of every row. Two worlds with the same arguments are equal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .universe import (
    ALIGNED_FAMILIES,
    HELPFUL,
    ALIGNED_TEMPLATES,
    ARITHMETIC_TEMPLATES,
    ASK_TEMPLATES,
    BENIGN_REQUESTS,
    CAPITALS,
    CURRENCIES,
    DIGITS,
    FACT_TEMPLATES,
    HARMFUL_REQUESTS,
    HELD_OUT_FAMILIES,
    HELD_OUT_TEMPLATES,
    REFUSAL,
    STRING_TEMPLATES,
    WORDS,
    Request,
    flip_words,
)

Messages = list[dict[str, str]]

_TEMPLATES = {**ALIGNED_TEMPLATES, **HELD_OUT_TEMPLATES}
_REQUEST_BY_TEXT = {r.text: r for r in HARMFUL_REQUESTS + BENIGN_REQUESTS}

# --------------------------------------------------------------------------------------------------------------------
# Rendering requests as chat messages


def plain_ask(request: Request, rng: random.Random) -> Messages:
    """The request asked plainly, as a single user turn (an anchor when the request is harmful)."""
    return [{"role": "user", "content": rng.choice(ASK_TEMPLATES).format(g=request.text)}]


def attack_messages(family: str, request: Request, rng: random.Random) -> Messages:
    """The request wrapped in one template of an attack family; a message list ending with a user turn."""
    if family not in _TEMPLATES:
        raise KeyError(f"unknown attack family {family!r}; known: {sorted(_TEMPLATES)}")
    template = rng.choice(_TEMPLATES[family])
    ask = rng.choice(ASK_TEMPLATES).format(g=request.text)
    slots = {"ask": ask, "g": request.text, "flip": flip_words(request.text), "topic": request.topic}
    turns = template if isinstance(template, tuple) else (template,)
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": _capitalise(t.format(**slots))} for i, t in enumerate(turns)]


def _capitalise(text: str) -> str:
    # Topics start turns in multi-turn templates ("{topic}" -> "the vault of Quell"); keep sentences well-formed.
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------------------------------------------------
# Utility questions


@dataclass(frozen=True)
class UtilityItem:
    """A benign question with one exact answer. ``subject`` names the fact asked about (the place, the two operands,
    the word): the questions of one task and subject are rephrasings of each other."""

    question: str
    answer: str
    task: str
    subject: str = ""


def utility_items() -> list[UtilityItem]:
    """Every utility question of the universe: facts, sums of two digits, word reversal and uppercasing."""
    items = []
    for relation, table in (("capital", CAPITALS), ("currency", CURRENCIES)):
        for place, answer in table.items():
            items += [UtilityItem(t.format(x=place), answer, relation, place) for t in FACT_TEMPLATES[relation]]
    for a in DIGITS:
        for b in DIGITS:
            items += [UtilityItem(t.format(a=a, b=b), str(a + b), "arithmetic", f"{a}+{b}")
                      for t in ARITHMETIC_TEMPLATES]
    for word in WORDS:
        items += [UtilityItem(t.format(w=word), word[::-1], "reverse", word) for t in STRING_TEMPLATES["reverse"]]
        items += [UtilityItem(t.format(w=word), word.upper(), "upper", word) for t in STRING_TEMPLATES["upper"]]
    return items


# --------------------------------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class SafetyWorld:
    """One seeded draw of the world: disjoint train/test goals and the rows built from them.

    Use [`make_world`] to build one. Every method is deterministic and returns fresh lists, so callers may modify them.

    Attributes:
        seed: the seed everything was drawn with.
        train_goals: harmful goals used for training pairs (aligned families only).
        test_goals: harmful goals used for evaluation (every family); disjoint from `train_goals`.
        aligned_families: attack families used for training and detection.
        held_out_families: attack families kept for cross-attack evaluation.
        n_over_refusal: number of risky-benign evaluation prompts.
        n_utility: number of utility evaluation questions.
        n_wrapped_benign: risky-benign requests wrapped in each attack family's template (shortcut detector).
        pairs_per_goal: training pairs per (goal, aligned family), each with its own template draw.
    """

    seed: int
    train_goals: tuple[str, ...]
    test_goals: tuple[str, ...]
    aligned_families: tuple[str, ...] = ALIGNED_FAMILIES
    held_out_families: tuple[str, ...] = HELD_OUT_FAMILIES
    n_over_refusal: int = 48
    n_utility: int = 64
    n_wrapped_benign: int = 8
    pairs_per_goal: int = 1

    def _rng(self, purpose: str) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
        return random.Random(f"safety-world/{self.seed}/{purpose}")

    @property
    def attack_families(self) -> tuple[str, ...]:
        """All attack families: aligned first, then held-out."""
        return self.aligned_families + self.held_out_families

    def train_pairs(self) -> list[dict[str, Any]]:
        """The training set in the RASA pair contract.

        One row per (train goal, aligned family, repeat) with `prompt` (the jailbreak messages), `anchor_prompt` (the
        goal asked plainly), `completion` (`REFUSAL`), `goal` and `attack`.
        """
        rng = self._rng("train")
        rows = []
        for goal in self.train_goals:
            request = _REQUEST_BY_TEXT[goal]
            for family in self.aligned_families:
                for _ in range(self.pairs_per_goal):
                    rows.append({
                        "prompt": attack_messages(family, request, rng),
                        "anchor_prompt": plain_ask(request, rng),
                        "completion": REFUSAL,
                        "goal": goal,
                        "attack": family,
                    })
        return rows

    def train_dataset(self):
        """`train_pairs()` as a `datasets.Dataset`."""
        from datasets import Dataset  # imported lazily: the world itself needs only the standard library

        return Dataset.from_list(self.train_pairs())

    def eval_sets(self) -> dict[str, list[dict[str, Any]]]:
        """Evaluation sets on test goals and benign prompts.

        Returns a dict with:
            - "attacks": rows `prompt`, `attack`, `goal`, `held_out` (every family x every test goal);
            - "anchors": rows `prompt`, `goal` (each test goal asked plainly);
            - "over_refusal": rows `prompt`, `request` (risky-sounding benign requests, asked plainly);
            - "utility": rows `prompt`, `answer` (the exact expected reply), `task`;
            - "wrapped_benign": rows `prompt`, `attack`, `request`, `held_out`: risky-benign requests inside attack
              templates, which should be answered. A method that learns "refuse anything that looks like a
              jailbreak" instead of repairing the unsafe behaviour refuses these (an over-refusal measure).
        """
        rng = self._rng("eval")
        held_out = set(self.held_out_families)
        attacks = [
            {"prompt": attack_messages(f, _REQUEST_BY_TEXT[g], rng), "attack": f, "goal": g, "held_out": f in held_out}
            for g in self.test_goals
            for f in self.attack_families
        ]
        anchors = [{"prompt": plain_ask(_REQUEST_BY_TEXT[g], rng), "goal": g} for g in self.test_goals]
        benign = rng.sample(BENIGN_REQUESTS, min(self.n_over_refusal, len(BENIGN_REQUESTS)))
        over_refusal = [{"prompt": plain_ask(r, rng), "request": r.text} for r in benign]
        items = rng.sample(utility_items(), self.n_utility)
        utility = [
            {"prompt": [{"role": "user", "content": it.question}], "answer": it.answer, "task": it.task}
            for it in items
        ]
        wrapped = [
            {"prompt": attack_messages(f, r, rng), "attack": f, "request": r.text, "held_out": f in held_out}
            for f in self.attack_families
            for r in rng.sample(BENIGN_REQUESTS, self.n_wrapped_benign)
        ]
        return {"attacks": attacks, "anchors": anchors, "over_refusal": over_refusal, "utility": utility,
                "wrapped_benign": wrapped}

    def retain_pairs(self, wrapped: bool = True) -> list[dict[str, Any]]:
        """Benign prompt/completion rows for retain data (utility kept while safety is trained), never overlapping the
        evaluation items of this world, in a seeded order.

        - ``"utility"``: every utility question whose (task, subject) no evaluation utility question asks, in any
          phrasing, with its exact answer;
        - ``"benign"``: every risky-benign request that no evaluation row uses (neither ``over_refusal`` nor
          ``wrapped_benign``), asked plainly, with the helpful answer;
        - ``"wrapped_benign"`` (with ``wrapped=True``): those requests inside one template of each aligned family, with
          the helpful answer (the held-out families' templates stay unseen).

        Rows hold ``prompt`` (chat messages), ``completion``, ``kind``, ``key`` (the utility subject or the request) and,
        on wrapped rows, ``attack`` (the family).
        """
        sets = self.eval_sets()
        asked = {_utility_key(row["prompt"][0]["content"]) for row in sets["utility"]}
        used = {row["request"] for row in sets["over_refusal"] + sets["wrapped_benign"]}
        rng = self._rng("retain")
        rows = [{"prompt": [{"role": "user", "content": it.question}], "completion": it.answer, "kind": "utility",
                 "key": f"{it.task}:{it.subject}"}
                for it in utility_items() if (it.task, it.subject) not in asked]
        free = [r for r in BENIGN_REQUESTS if r.text not in used]
        rows += [{"prompt": plain_ask(r, rng), "completion": HELPFUL, "kind": "benign", "key": r.text} for r in free]
        if wrapped:
            rows += [{"prompt": attack_messages(f, r, rng), "completion": HELPFUL, "kind": "wrapped_benign",
                      "key": r.text, "attack": f} for r in free for f in self.aligned_families]
        rng.shuffle(rows)
        return rows

    def retain_dataset(self, wrapped: bool = True):
        """`retain_pairs()` as a `datasets.Dataset`."""
        from datasets import Dataset

        return Dataset.from_list(self.retain_pairs(wrapped))


def _utility_key(question: str) -> tuple[str, str]:
    """(task, subject) of a utility question of the universe."""
    return _UTILITY_KEYS[question]


_UTILITY_KEYS = {it.question: (it.task, it.subject) for it in utility_items()}

def make_world(
    seed: int = 0,
    n_train_goals: int = 64,
    n_test_goals: int = 32,
    n_over_refusal: int = 48,
    n_utility: int = 64,
    n_wrapped_benign: int = 8,
    pairs_per_goal: int = 1,
    aligned_families: Sequence[str] = ALIGNED_FAMILIES,
    held_out_families: Sequence[str] = HELD_OUT_FAMILIES,
) -> SafetyWorld:
    """Draw a SafetyWorld.

    Args:
        seed: decides the goals drawn, the train/test split and every template choice.
        n_train_goals / n_test_goals: sizes of the two disjoint goal sets (together at most 146).
        n_over_refusal: risky-benign evaluation prompts (at most 104).
        n_utility: utility evaluation questions.
        n_wrapped_benign: risky-benign requests per attack family in the "wrapped_benign" set.
        pairs_per_goal: training pairs per (goal, aligned family).
        aligned_families / held_out_families: how the attack families are split; must be disjoint.
    """
    if n_train_goals + n_test_goals > len(HARMFUL_REQUESTS):
        raise ValueError(f"at most {len(HARMFUL_REQUESTS)} goals exist; asked for {n_train_goals + n_test_goals}")
    aligned, held_out = tuple(aligned_families), tuple(held_out_families)
    unknown = set(aligned + held_out) - set(_TEMPLATES)
    if unknown or set(aligned) & set(held_out):
        raise ValueError(
            f"families must be known and disjoint; unknown {sorted(unknown)}, aligned {aligned}, held-out {held_out}"
        )
    rng = random.Random(f"safety-world/{seed}/goals")
    goals = rng.sample([r.text for r in HARMFUL_REQUESTS], n_train_goals + n_test_goals)
    return SafetyWorld(
        seed=seed,
        train_goals=tuple(goals[:n_train_goals]),
        test_goals=tuple(goals[n_train_goals:]),
        aligned_families=aligned,
        held_out_families=held_out,
        n_over_refusal=n_over_refusal,
        n_utility=n_utility,
        n_wrapped_benign=n_wrapped_benign,
        pairs_per_goal=pairs_per_goal,
    )
