"""Retain data in the expert phase: which batches get retain rows, their replayed routing, their loss, generated
completions, resume and validation."""

from __future__ import annotations

import pytest
import torch

import rasa_trainer.training.retain as retain_module
from conftest import tiny_model
from test_trainer import make_args, make_selection
from tiny_chat import tiny_chat_tokenizer, tiny_pairs
from rasa_trainer import RASATrainer
from rasa_trainer.moe.routing import record_routing
from rasa_trainer.training.retain import retain_slots
from rasa_trainer.moe.routing import real_tokens

QUESTIONS = ["what capital zorbia", "what capital velm", "kill a stuck process", "tell me step one two three",
             "please answer what capital", "how do i make a story", "tell me a story about hero", "step one two"]
ANSWERS = ["velm", "zorbia", "sure here is step one", "one two three", "sure", "sure here is a story", "story", "two"]


def retain_rows(n: int = 8, completions: bool = True) -> list[dict]:
    rows = [{"prompt": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]} for i in range(n)]
    if completions:
        for i, row in enumerate(rows):
            row["completion"] = ANSWERS[i % len(ANSWERS)]
    return rows


class BatchRecorder(RASATrainer):
    """Records, per training step, the phase, the pair rows, the retain rows and the routing the forward used."""

    steps: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows, retain = inputs.get("rasa_index"), inputs.get("rasa_retain_index")
        mask = inputs["attention_mask"].cpu()
        with record_routing(model, probabilities=False) as rec:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.steps.append({
            "phase": self.phases.phase, "epoch": self.phases.epoch, "rows": rows.clone(), "batch": int(mask.shape[0]),
            "retain": None if retain is None else retain.clone().cpu(), "mask": mask,
            "used": real_tokens(rec.routing(), mask).stacked_indices() if self.phases.phase == "expert" else None,
            "cache": self.routing.cache,
        })
        return loss


def make_trainer(tmp_path, retain=None, cls=BatchRecorder, model=None, **overrides):
    tokenizer = tiny_chat_tokenizer()
    model = model if model is not None else tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    overrides.setdefault("rasa_schedule", "alternate")
    trainer = cls(model, args=make_args(tmp_path, **overrides), train_dataset=tiny_pairs(), processing_class=tokenizer,
                  safety_critical_experts=make_selection(model), retain_dataset=retain)
    trainer.steps = []
    return trainer


def test_retain_rows_join_expert_batches_at_the_ratio_never_router_batches(tmp_path):
    trainer = make_trainer(tmp_path, retain_rows(5), retain_ratio=0.5, rasa_rounds=2)
    trainer.train()
    expert = [s for s in trainer.steps if s["phase"] == "expert"]
    router = [s for s in trainer.steps if s["phase"] == "router"]
    assert len(expert) == 6 and len(router) == 6  # 2 rounds x 3 steps of 4 pairs
    for step in expert:
        assert step["retain"] is not None and len(step["retain"]) == 2  # 0.5 x 4 pairs
        assert step["batch"] == len(step["rows"]) + 2
    for step in router:
        assert step["retain"] is None and step["batch"] == len(step["rows"])
    used = torch.cat([s["retain"] for s in expert]).tolist()
    # 12 slots over 5 rows: every row once per cycle of 5
    assert sorted(used[:5]) == list(range(5)) and sorted(used[5:10]) == list(range(5))


def test_retain_slots_keep_the_ratio_exactly():
    slots = [retain_slots(a, 16, 0.3, 7, seed=1) for a in range(0, 160, 16)]
    assert sum(map(len, slots)) == 48  # floor(0.3 x 160)
    flat = [r for s in slots for r in s]
    for c in range(len(flat) // 7):
        assert sorted(flat[7 * c: 7 * c + 7]) == list(range(7))
    assert retain_slots(0, 16, 0.3, 7, seed=1) == retain_slots(0, 16, 0.3, 7, seed=1)
    assert retain_slots(0, 16, 0.0, 7, seed=1) == []


def test_retain_routing_is_replayed_bit_identical(tmp_path):
    trainer = make_trainer(tmp_path, retain_rows(6), retain_ratio=0.5, rasa_schedule="expert_only", rasa_rounds=2,
                           expert_learning_rate=5e-2)
    base_routing = {}
    model = trainer.model
    # the retain rows' routing under the model before training, recorded independently of the trainer
    trainer._prepare_retain()
    with torch.no_grad():
        for i, example in enumerate(trainer.retain.examples):
            ids = torch.tensor([example["input_ids"]])
            with record_routing(model, probabilities=False) as one:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            base_routing[i] = one.routing().stacked_indices()
    trainer.train()
    num_pairs = len(trainer.train_dataset)
    checked = 0
    for step in (s for s in trainer.steps if s["phase"] == "expert"):
        n = len(step["rows"])
        positions = torch.cat([trainer.routing.positions(step["rows"]), num_pairs + step["retain"]])
        cached = real_tokens(step["cache"].batch_routing(positions, step["mask"]), step["mask"]).stacked_indices()
        assert torch.equal(step["used"].long(), cached.long())  # the whole batch, retain rows included
        if step["epoch"] == 0:  # first expert phase: the cache is the base model's routing
            lengths = step["mask"].sum(dim=1).tolist()
            offset = sum(lengths[:n])
            for b, r in enumerate(step["retain"].tolist()):
                tokens = step["used"][offset: offset + lengths[n + b]]
                assert torch.equal(tokens.long(), base_routing[r].long())
                offset += lengths[n + b]
                checked += 1
    assert checked >= 3
    # without replay the trained model routes some retain token elsewhere: the replay is what kept it
    moved = False
    with torch.no_grad():
        for i, example in enumerate(trainer.retain.examples):
            ids = torch.tensor([example["input_ids"]])
            with record_routing(trainer.model, probabilities=False) as one:
                trainer.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            moved |= not torch.equal(one.routing().stacked_indices().long(), base_routing[i].long())
    assert moved


def test_retain_loss_is_logged(tmp_path):
    trainer = make_trainer(tmp_path, retain_rows(6), retain_ratio=0.5, cls=RASATrainer)
    trainer.train()
    expert_logs = [h for h in trainer.state.log_history if h.get("phase") == 1.0]
    router_logs = [h for h in trainer.state.log_history if h.get("phase") == 2.0]
    assert expert_logs and all("retain_loss" in h and "completion_loss" in h for h in expert_logs)
    assert all(h["retain_loss"] > 0 for h in expert_logs)
    assert router_logs and not any("retain_loss" in h for h in router_logs)
    trainer.create_model_card(output_dir=str(tmp_path / "card"))
    card = (tmp_path / "card" / "README.md").read_text()
    assert "| retain rows | 6 |" in card and "| retain_ratio | 0.5 |" in card and "| retain_loss_weight | 1.0 |" in card


def test_split_losses_match_the_parts(tmp_path):
    """completion_loss / retain_loss are the token-mean cross-entropies of the pairs and of the retain rows."""
    trainer = make_trainer(tmp_path, retain_rows(6), retain_ratio=0.5, rasa_schedule="expert_only")
    trainer._prepare_retain()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.phases.set_phase("expert", 0)
    batch = trainer._with_retain_rows(batch, 0)
    n = len(batch["rasa_index"])
    model = trainer.model.train()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        ce = lambda part: torch.nn.functional.cross_entropy(  # noqa: E731
            logits[part, :-1].flatten(0, 1), labels[part, 1:].flatten(), ignore_index=-100)
        trainer._metrics["train"].clear()
        trainer.compute_loss(model, dict(batch))
    metrics = trainer._metrics["train"]
    assert metrics["completion_loss"][0] == pytest.approx(float(ce(slice(0, n))), rel=1e-4)
    assert metrics["retain_loss"][0] == pytest.approx(float(ce(slice(n, None))), rel=1e-4)


def _token_sums(model, batch, num_pairs: int) -> tuple[float, int, float, int]:
    """Summed cross-entropy and completion tokens of the pairs and of the retain rows of one collated batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                               reduction="none")
    mask = labels != -100
    pairs, retain = slice(0, num_pairs), slice(num_pairs, None)
    return (float(losses[pairs].sum()), int(mask[pairs].sum()), float(losses[retain].sum()), int(mask[retain].sum()))


def test_retain_rows_do_not_dilute_the_pairs_loss(tmp_path):
    """The loss is the pairs' mean cross-entropy plus retain_loss_weight x the retain rows' mean, each over its own
    tokens: adding retain rows leaves the pairs' term (and so the refusal gradient) at full strength."""
    trainer = make_trainer(tmp_path, retain_rows(6), retain_ratio=0.5, rasa_schedule="expert_only",
                           retain_loss_weight=0.5)
    trainer._prepare_retain()
    trainer.phases.set_phase("expert", 0)
    batch = trainer._with_retain_rows(next(iter(trainer.get_train_dataloader())), 0)
    n = len(batch["rasa_index"])
    model = trainer.model.train()
    with torch.no_grad():
        pair_sum, pair_tokens, retain_sum, retain_tokens = _token_sums(model, batch, n)
        loss = trainer.compute_loss(model, dict(batch))
    assert retain_tokens > 0 and pair_tokens > 0
    assert float(loss) == pytest.approx(pair_sum / pair_tokens + 0.5 * retain_sum / retain_tokens, rel=1e-4)
    pooled = (pair_sum + retain_sum) / (pair_tokens + retain_tokens)
    assert abs(float(loss) - pooled) > 1e-3  # not SFT's pooled mean, which the retain tokens would dilute


def test_retain_weighting_over_an_accumulated_step(tmp_path):
    """With gradient accumulation each part's mean runs over the whole optimiser step (as num_items_in_batch does):
    the micro-batch losses add up to the step's pairs mean plus the weighted retain mean."""
    trainer = make_trainer(tmp_path, retain_rows(6), retain_ratio=0.5, rasa_schedule="expert_only",
                           gradient_accumulation_steps=2, retain_loss_weight=2.0)
    trainer._prepare_retain()
    trainer.phases.set_phase("expert", 0)
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, torch.device("cpu"))
    assert num_items is not None and trainer._loss_scaled_for_accumulation(num_items)
    assert any("rasa_retain_index" in b for b in batches)
    model = trainer.model.train()
    totals = [0.0, 0, 0.0, 0]
    step_loss = 0.0
    with torch.no_grad():
        for batch in batches:
            sums = _token_sums(model, batch, len(batch["rasa_index"]))
            totals = [a + b for a, b in zip(totals, sums)]
            step_loss += float(trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items))
    pair_sum, pair_tokens, retain_sum, retain_tokens = totals
    assert pair_tokens + retain_tokens == int(num_items)
    assert step_loss == pytest.approx(pair_sum / pair_tokens + 2.0 * retain_sum / retain_tokens, rel=1e-4)


def retain_step(tmp_path, batch_size: int, accumulation: int) -> torch.Tensor:
    """One SGD step (lr 1, no clipping) of the expert phase over 8 pairs with retain rows (ratio 0.5, weight 1): the
    change of the expert repairs."""
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    args = make_args(tmp_path, rasa_schedule="expert_only", retain_ratio=0.5, expert_learning_rate=1.0,
                     per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                     max_grad_norm=0.0, weight_decay=0.0)
    trainer = RASATrainer(model, args=args, train_dataset=tiny_pairs(8), processing_class=tokenizer,
                          safety_critical_experts=make_selection(model), retain_dataset=retain_rows(6),
                          optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1.0}))
    before = [p.detach().clone() for p in trainer.param_groups.groups["experts"]]
    trainer.train()
    assert trainer.state.global_step == 1
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(trainer.param_groups.groups["experts"], before)])


def test_retain_step_does_not_depend_on_batching(tmp_path):
    """8 pairs (and their 4 retain rows) as one micro-batch or as 4 + 4 accumulated: the same update."""
    delta_8 = retain_step(tmp_path / "a", 8, 1)
    delta_4x2 = retain_step(tmp_path / "b", 4, 2)
    assert delta_8.abs().max() > 0
    torch.testing.assert_close(delta_4x2, delta_8, rtol=1e-4, atol=1e-7)


def test_retain_with_a_loss_computed_elsewhere_is_refused(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1"):
        make_trainer(tmp_path, retain_rows(4), retain_ratio=0.5, cls=RASATrainer, label_smoothing_factor=0.1)
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="compute_loss_func"):
        RASATrainer(model, args=make_args(tmp_path, retain_ratio=0.5), train_dataset=tiny_pairs(),
                    processing_class=tokenizer, safety_critical_experts=make_selection(model),
                    retain_dataset=retain_rows(4), compute_loss_func=lambda outputs, labels, num_items_in_batch: 0)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="retain_loss_weight"):
            make_args(tmp_path, retain_loss_weight=bad)


def test_prompts_only_retain_rows_get_generated_completions_once(tmp_path, monkeypatch):
    calls = []
    real = retain_module.generate_replies

    def counting(model, tokenizer, conversations, **kwargs):
        calls.append((len(conversations), kwargs["batch_size"], kwargs["do_sample"]))
        yield from real(model, tokenizer, conversations, **kwargs)

    monkeypatch.setattr(retain_module, "generate_replies", counting)
    rows = retain_rows(6, completions=False)
    rows[1]["completion"] = "velm"  # a given completion is kept
    trainer = make_trainer(tmp_path, rows, retain_ratio=0.5, retain_max_new_tokens=4, retain_batch_size=8,
                           cls=RASATrainer)
    expected = list(real(trainer.model, trainer.processing_class, [rows[i]["prompt"] for i in (0, 2, 3, 4, 5)],
                         batch_size=8, max_new_tokens=4, progress=False))[0].replies
    trainer.train()
    assert calls == [(5, 8, False)]  # once, every prompt-only row in one batched call, greedy
    tokenizer = trainer.processing_class
    for i, reply in zip((0, 2, 3, 4, 5), expected):
        labels = [t for t in trainer.retain.examples[i]["labels"] if t != -100]
        assert tokenizer.decode(labels, skip_special_tokens=True).split()[: len(reply.split())] == reply.split()
    labels = [t for t in trainer.retain.examples[1]["labels"] if t != -100]
    assert tokenizer.decode(labels, skip_special_tokens=True).split()[0] == "velm"


def test_resume_with_retain_is_bit_identical(tmp_path):
    rows = retain_rows(5)
    full = make_trainer(tmp_path / "a", rows, retain_ratio=0.5, cls=RASATrainer)
    full.train()
    interrupted = make_trainer(tmp_path / "b", rows, retain_ratio=0.5, cls=RASATrainer, save_strategy="steps",
                               save_steps=2)
    interrupted.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"  # mid expert phase (3 steps per epoch)
    assert (checkpoint / "rasa_routing_cache.safetensors").exists()
    resumed = make_trainer(tmp_path / "c", rows, retain_ratio=0.5, cls=BatchRecorder)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [s["retain"] is not None for s in resumed.steps] == [True, False, False, False]
    expected = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[name]), name


@pytest.mark.parametrize("change", ["rows", "none", "ratio", "weight"])
def test_changed_retain_refuses_resume(tmp_path, change):
    first = make_trainer(tmp_path / "a", retain_rows(5), retain_ratio=0.5, cls=RASATrainer,
                         rasa_schedule="expert_only", save_strategy="steps", save_steps=2)
    first.train()
    retain = {"rows": retain_rows(4), "none": None, "ratio": retain_rows(5), "weight": retain_rows(5)}[change]
    # without retain rows retain_ratio stays at its default (a ratio set without rows is refused)
    ratio = {"ratio": {"retain_ratio": 0.75}, "none": {}}.get(change, {"retain_ratio": 0.5})
    other = make_trainer(tmp_path / "b", retain, cls=RASATrainer, rasa_schedule="expert_only",
                         retain_loss_weight=2.0 if change == "weight" else 1.0, **ratio)
    with pytest.raises(ValueError, match="belongs to another run: .*retain data"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


@pytest.mark.parametrize("rows, match", [
    ([], "retain_dataset has no rows"),
    ([{"question": "what capital zorbia"}], "column 'prompt' is missing"),
    ([{"prompt": "what capital zorbia", "completion": "velm"}, {"prompt": "", "completion": "velm"}],
     "row 1, column 'prompt': empty text"),
    ([{"prompt": [{"role": "assistant", "content": "velm"}]}], "row 0, column 'prompt': bad role order"),
    ([{"prompt": "what capital velm", "completion": [{"role": "assistant", "content": "a"},
                                                   {"role": "assistant", "content": "b"}]}],
     "row 0, column 'completion': is a list of 2 messages"),
    ([{"prompt": "what capital velm", "completion": 3}], "row 0, column 'completion': has type int"),
    ([{"prompt": "what capital velm", "completion": "velm"}, {"prompt": [{"role": "user", "content": "velm"}]}],
     "mixed formats"),
    ("not rows", "expected a datasets.Dataset or a list of dicts"),
])
def test_bad_retain_rows_fail_before_any_work(tmp_path, monkeypatch, rows, match):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the retain rows were checked")

    monkeypatch.setattr(RASATrainer, "_prepare_dataset", no_work)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, rows, cls=RASATrainer)


def test_retain_too_long_and_bad_ratio_fail(tmp_path):
    long = [{"prompt": " ".join(["one"] * 200), "completion": "velm"}]
    with pytest.raises(ValueError, match=r"of retain_dataset exceed max_length=64 .*: row 0 \(205 tokens\)"):
        make_trainer(tmp_path, long, cls=RASATrainer, max_length=64)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="retain_ratio"):
            make_args(tmp_path, retain_ratio=bad)


def test_no_retain_rows_without_retain_data_or_ratio(tmp_path):
    trainer = make_trainer(tmp_path, retain_rows(4), retain_ratio=0.0, rasa_rounds=1)
    trainer.train()
    assert all(s["retain"] is None for s in trainer.steps)
    assert "retain" not in trainer._run_fingerprint()
    trainer.create_model_card(output_dir=str(tmp_path / "card"))
    assert "retain" not in (tmp_path / "card" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# issue 21, items 4 and 6: no inert retain_ratio, no retain row that answers a training jailbreak


def test_retain_ratio_without_retain_data_is_refused(tmp_path):
    from rasa_trainer.training.retain import _validated_retain

    with pytest.raises(ValueError, match=r"retain_ratio=0\.5 is set but no retain_dataset is given, so it would do "
                                         r"nothing; pass the retain rows .* or leave retain_ratio at its default"):
        make_trainer(tmp_path, None, cls=RASATrainer, retain_ratio=0.5)
    for ratio in (0.25, 0.0):  # the default, and 0 (which says: no retain rows)
        assert _validated_retain(None, make_args(tmp_path, retain_ratio=ratio)) is None


def test_retain_rows_repeating_a_training_jailbreak_without_a_refusal_are_refused(tmp_path):
    from rasa_trainer.training.retain import _validated_retain

    pairs = tiny_pairs()
    args = make_args(tmp_path, rasa_schedule="alternate")
    retain = retain_rows(3) + [
        {"prompt": pairs[1]["prompt"], "completion": "sure here is step one"},  # the jailbreak, answered
        {"prompt": [{"role": "user", "content": pairs[0]["anchor_prompt"]}]},  # the plain request, no completion
        {"prompt": pairs[2]["prompt"], "completion": pairs[2]["completion"]},  # answered with the refusal: fine
    ]
    with pytest.raises(ValueError, match=r"retain_dataset: 2 row\(s\) repeat a training pair's prompt without a "
                                         r"refusal:\n  - retain row 3 repeats pair row 1's 'prompt' .*\n  - retain row 4 "
                                         r"repeats pair row 0's 'anchor_prompt' and has no completion"):
        _validated_retain(retain, args, None, train_dataset=pairs)
    assert len(_validated_retain(retain[:3] + retain[5:], args, None, train_dataset=pairs)) == 4
