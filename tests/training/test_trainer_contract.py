"""RASATrainer keeps the Trainer/SFTTrainer contract: Trainer's optimiser and decay split, metrics that mean one thing,
config guards on what transformers really reads, detection at train start, a router loss independent of batching."""

from __future__ import annotations

import copy
import glob
import os
import warnings

import pytest
import torch
import yaml
from trl import SFTConfig, SFTTrainer

from conftest import tiny_model
from test_trainer import make_args, make_selection, make_trainer
from tiny_chat import tiny_chat_tokenizer, tiny_pairs
from rasa_trainer import RASAConfig, RASATrainer
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.replay_cache import RoutingCache
from rasa_trainer.training.phases import check_selected_experts_reached
from rasa_trainer.detection.selection import SafetyCriticalExperts, SelectedExpert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = dict(output_dir="/tmp/rasa-contract", use_cpu=True, bf16=False, report_to="none")


def _names(trainer) -> dict[int, str]:
    return {id(p): n for n, p in trainer.model.named_parameters()}


def _logs(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# ------------------------------------------------------------------------------------------------------ optimiser


def test_optimizer_cls_and_kwargs_is_honoured(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    args = make_args(tmp_path, expert_learning_rate=1e-2, router_learning_rate=1e-3)
    trainer = RASATrainer(model, args=args, train_dataset=tiny_pairs(), processing_class=tokenizer,
                          safety_critical_experts=make_selection(model),
                          optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.SGD) and type(optimizer).__name__ == "SGD"
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)
    assert {(g["name"], g["lr"]) for g in optimizer.param_groups} == {("experts", 1e-2), ("routers", 1e-3)}
    trainer.train()  # the phases run with it (SGD steps only the active group: the others have no gradients)
    assert trainer.optimizer.optimizer is optimizer or isinstance(trainer.optimizer.optimizer, torch.optim.SGD)


def test_adamw_bnb_8bit_is_honoured(tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="router_only", optim="adamw_bnb_8bit")
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.args.optim_bits == 8
    before = [l.router.weight.detach().clone() for l in moe_layers(trainer.model)]
    trainer.train()
    assert any(not torch.equal(a, l.router.weight) for a, l in zip(before, moe_layers(trainer.model)))


@pytest.mark.parametrize("schedule", ["alternate", "full"])
def test_no_weight_decay_on_biases_and_norms(tmp_path, schedule):
    """Trainer's decay split in every schedule: gpt-oss has router biases, expert biases (so bias deltas) and norms."""
    trainer = make_trainer(tmp_path, "gpt_oss", rasa_schedule=schedule, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    names = _names(trainer)
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["weight_decay"] == (0.1 if name in decay else 0.0), name
            if "bias" in name or "norm" in name:
                assert group["weight_decay"] == 0.0, name
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert seen == trainable
    assert any("bias" in n for n in seen) and (schedule == "alternate" or any("norm" in n for n in seen))
    if schedule == "alternate":
        assert any(n.endswith("router.bias") for n in seen) and any("rasa_repairs" in n and "bias" in n for n in seen)


def test_full_schedule_equals_sft_trainer_for_three_steps(tmp_path):
    """rasa_schedule='full' is plain SFT: the same losses and the same weights as SFTTrainer after each of 3 steps."""
    tokenizer = tiny_chat_tokenizer()
    base = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    rasa = RASATrainer(copy.deepcopy(base), args=make_args(tmp_path, rasa_schedule="full", expert_learning_rate=1e-2),
                       train_dataset=tiny_pairs(), processing_class=tokenizer)
    from rasa_trainer.training.trainer import _training_rows

    rows = _training_rows(tiny_pairs(), rasa.args).remove_columns(["rasa_anchor", "rasa_index"])
    sft = SFTTrainer(copy.deepcopy(base), args=SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to="none",
        logging_steps=1, save_strategy="no", learning_rate=1e-2, num_train_epochs=1, disable_tqdm=True, seed=0,
        weight_decay=0.1, lr_scheduler_type="constant", activation_checkpointing=True, dataloader_num_workers=0),
        train_dataset=rows, processing_class=tokenizer)
    rasa.train()
    sft.train()
    assert rasa.state.global_step == sft.state.global_step == 3
    torch.testing.assert_close(_logs(rasa, "loss"), _logs(sft, "loss"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_logs(rasa, "grad_norm"), _logs(sft, "grad_norm"), rtol=1e-5, atol=1e-6)
    expected = dict(sft.model.named_parameters())
    for name, p in rasa.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert _logs(rasa, "learning_rate_full") == [1e-2] * 3


def test_learning_rates_per_group_are_logged(tmp_path):
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="alternate", expert_learning_rate=1e-2,
                           router_learning_rate=1e-3, lr_scheduler_type="linear")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logs] == [1] * 3 + [2] * 3
    # the scheduler applies to each group; `learning_rate` is the rate of the group the step trained
    for h, step in zip(logs, range(6)):
        scale = 1 - step / 6
        assert h["learning_rate_experts"] == pytest.approx(1e-2 * scale)
        assert h["learning_rate_routers"] == pytest.approx(1e-3 * scale)
        assert h["learning_rate"] == h["learning_rate_experts" if h["phase"] == 1 else "learning_rate_routers"]


def test_unused_learning_rate_warns():
    with pytest.warns(UserWarning, match="expert_learning_rate=.*router_learning_rate"):
        RASAConfig(**BASE, learning_rate=3e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        RASAConfig(**BASE)


def test_prebuilt_optimizer_is_rejected(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        RASATrainer(model, args=make_args(tmp_path), train_dataset=tiny_pairs(), processing_class=tokenizer,
                    safety_critical_experts=make_selection(model), optimizers=(optimizer, None))


# ------------------------------------------------------------------------------------------------------ metrics


def test_group_grad_norms_are_measured_before_clipping(tmp_path):
    """One router step over all 12 pairs: grad_norm_routers equals the norm of a hand-computed gradient, far above
    max_grad_norm, and equals Trainer's grad_norm (only the routers have gradients); likewise in the expert phase."""
    # expert lr 0: the expert step changes nothing, so the router step sees the model the hand computation saw
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="alternate", per_device_train_batch_size=12,
                           max_grad_norm=1e-4, expert_learning_rate=0.0)
    collated = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(len(trainer.train_dataset))])
    inputs = {k: v for k, v in collated.items() if k in ("input_ids", "attention_mask", "labels")}
    trainer.phases.set_phase("router")
    trainer.model.train()
    loss = trainer._router_loss(trainer.model, inputs, collated["anchor_input_ids"], collated["anchor_attention_mask"],
                                None, None, context=collated["rasa_context_mask"])
    loss.backward()
    routers = trainer.param_groups.groups["routers"]
    by_hand = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in routers])).item()
    trainer.model.zero_grad(set_to_none=True)
    trainer.phases.set_phase(None)
    trainer._metrics["train"].clear()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    expert, router = logs
    assert router["phase"] == 2 and router["grad_norm_routers"] == pytest.approx(by_hand, rel=1e-4)
    assert by_hand > 100 * trainer.args.max_grad_norm
    assert router["grad_norm"] == pytest.approx(router["grad_norm_routers"], rel=1e-5)
    assert expert["phase"] == 1 and expert["grad_norm"] == pytest.approx(expert["grad_norm_experts"], rel=1e-5)
    assert expert["grad_norm_experts"] > 100 * trainer.args.max_grad_norm
    # the two routing-shift measures under their own keys; the phase is that of the window's last step
    assert "routing_shift_phase_start" in expert and "routing_shift_prompt" in router
    assert not any("routing_shift" in h for h in trainer.state.log_history)


def test_phase_is_not_averaged_over_a_logging_window(tmp_path):
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="alternate", logging_steps=4)
    trainer.train()
    phases = _logs(trainer, "phase")
    assert phases and set(phases) <= {1, 2}  # the window of steps 3-6 spans both phases: it logs 2, not 1.75


# ------------------------------------------------------------------------------------------------------ config guards


def test_rejected_options_fail_at_construction_with_the_fix():
    with pytest.raises(ValueError, match="completion_only_loss=False .* Leave completion_only_loss unset"):
        RASAConfig(**BASE, completion_only_loss=False)
    assert RASAConfig(**BASE, rasa_schedule="full", completion_only_loss=False).completion_only_loss is False
    with pytest.raises(ValueError, match="use_reentrant=False"):
        RASAConfig(**BASE, activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="use_reentrant=False"):
        RASAConfig(**BASE, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    config = RASAConfig(**BASE)
    assert config.activation_checkpointing is True and config.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert config.gradient_checkpointing_kwargs == {"use_reentrant": False}  # what TRL reads
    assert RASAConfig(**BASE, activation_checkpointing=False).activation_checkpointing is False


@pytest.mark.parametrize("bad, match", [
    (dict(rasa_rounds=1.5), "rasa_rounds=1.5"),
    (dict(default_refusal="  "), "default_refusal is empty"),
    (dict(detection_batch_size=0), "detection_batch_size=0"),
    (dict(detection_max_new_tokens=0), "detection_max_new_tokens=0"),
    (dict(sce_threshold=2.0), r"sce_threshold=2.0: risk differences lie in \[-1, 1\]"),
    (dict(sce_num_experts=1.5), "sce_num_experts=1.5"),
    (dict(router_loss="mean"), "router_loss='mean' is not one of"),
])
def test_config_values_checked_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        RASAConfig(**BASE, **bad)


def test_no_deprecation_warnings_from_our_code(tmp_path):
    """RASAConfig, the example configs and a short run raise no FutureWarning/DeprecationWarning of ours: warnings
    attributed to rasa_trainer are errors, and none of transformers' deprecated-argument warnings appear."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("error", category=FutureWarning, module="rasa_trainer")
        warnings.filterwarnings("error", category=DeprecationWarning, module="rasa_trainer")
        RASAConfig(**BASE)
        names = {f for f in RASAConfig.__dataclass_fields__}
        for path in sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml"))
                           + glob.glob(os.path.join(ROOT, "rasa_trainer", "configs", "*.yaml"))):
            with open(path) as f:
                raw = yaml.safe_load(f)
            deprecated = {"gradient_checkpointing", "gradient_checkpointing_kwargs"} & set(raw)
            assert not deprecated, f"{path} uses deprecated keys {deprecated}"
            RASAConfig(**{**{k: v for k, v in raw.items() if k in names}, **BASE})
        trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="alternate")
        trainer.train()
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and ("rasa_trainer" in w.filename or "is deprecated and will be removed in v6" in str(w.message))]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


def test_router_context_comes_from_the_prompt_not_from_labels(tmp_path):
    """assistant_only_loss with a multi-turn prompt and a template that leaves the end-of-turn token out of the
    assistant mask: labels mask that token, but the router loss still averages over exactly the prompt tokens."""
    tokenizer = tiny_chat_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}{{ m['content'] }}"
        "{% endgeneration %} <|end|> {% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    pairs = tiny_pairs(8)
    for row in pairs:
        row["prompt"] = [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "sure"},
                         *row["prompt"]]
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    trainer = RASATrainer(model, args=make_args(tmp_path, assistant_only_loss=True), train_dataset=pairs,
                          processing_class=tokenizer, safety_critical_experts=make_selection(model))
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    for b in range(4):
        prompt = tokenizer.apply_chat_template(pairs[int(batch["rasa_index"][b])]["prompt"], tokenize=True,
                                               add_generation_prompt=True)["input_ids"]
        expected = torch.zeros_like(batch["rasa_context_mask"][b])
        expected[: len(prompt)] = True
        assert torch.equal(batch["rasa_context_mask"][b], expected)
    from_labels = (batch["labels"] == -100) & batch["attention_mask"].bool()
    assert not torch.equal(from_labels, batch["rasa_context_mask"])  # labels also mask the trailing <|end|>


def test_anchor_longer_than_max_length_is_an_error(tmp_path):
    pairs = tiny_pairs()
    pairs[2]["anchor_prompt"] = " ".join(["please"] * 40)
    tokenizer = tiny_chat_tokenizer()
    with pytest.raises(ValueError, match=r"exceed max_length=32 .*row 2 \(anchor: \d+ tokens\)"):
        RASATrainer(tiny_model("qwen3_moe", vocab_size=len(tokenizer)), args=make_args(tmp_path, max_length=32),
                    train_dataset=pairs, processing_class=tokenizer)


# ------------------------------------------------------------------------------------------------------ selection


def test_expert_ids_must_be_integers():
    model = tiny_model("qwen3_moe")
    good = make_selection(model).to_dict()
    for bad in (1.5, True):
        data = copy.deepcopy(good)
        data["experts"][0]["expert"] = bad
        with pytest.raises(ValueError, match="expert ids must be integers"):
            SafetyCriticalExperts.from_dict(data)


def test_empty_selection_is_an_error_at_construction(tmp_path):
    with pytest.raises(ValueError, match="holds no experts"):
        make_trainer(tmp_path, "qwen3_moe", selection={})


def test_selected_experts_no_token_reaches(tmp_path, caplog):
    trainer = make_trainer(tmp_path, "qwen3_moe", selection={0: [1, 3], 1: [2]})
    # a routing cache of 5 tokens, 2 MoE layers, top-2 that never uses expert 3 of layer 0
    indices = torch.tensor([[[1, 0], [2, 4]]] * 5, dtype=torch.int16)
    cache = RoutingCache(indices, None, torch.tensor([0, 5]))
    with caplog.at_level("WARNING", logger="rasa_trainer.training.phases"):
        check_selected_experts_reached(trainer.selection.by_moe_layer(), cache.indices)
    assert "1 of 3 selected experts receive no training token" in caplog.text and "expert 3" in caplog.text
    with pytest.raises(ValueError, match="no training token is routed to any of the 3 selected experts"):
        check_selected_experts_reached(trainer.selection.by_moe_layer(), torch.full((5, 2, 2), 7, dtype=torch.int16))


def test_detection_waits_for_train_and_needs_a_whole_model(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    trainer = RASATrainer(model, args=make_args(tmp_path), train_dataset=tiny_pairs(), processing_class=tokenizer)
    # construction is cheap: nothing generated, nothing attached yet
    assert trainer.selection is None and not any("rasa_repairs" in n for n, _ in trainer.model.named_parameters())
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="Detect first .*safety_critical_experts="):
        trainer._check_detection_supported()


def test_output_router_logits_on_the_model_works_in_generation_and_evaluation():
    from rasa_trainer.evaluation.evaluate import routing_shift
    from rasa_trainer.detection.generation import generate_batch

    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    model.config.output_router_logits = True
    prompts = [[{"role": "user", "content": "how do i"}], [{"role": "user", "content": "tell me step one two three"}]]
    batch = generate_batch(model, tokenizer, prompts, max_new_tokens=3, with_routing=True)
    assert len(batch.replies) == 2
    routing_shift(model, model, tokenizer, prompts)
    assert model.config.output_router_logits is True  # restored


# ------------------------------------------------------------------------------------------------------ router loss


def per_pair_step(tmp_path, batch_size: int, accumulation: int, router_loss: str = "per_pair"):
    """One SGD step (lr 1, no clipping) of the router phase over 8 pairs: (logged loss, router weight change)."""
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    args = make_args(tmp_path, rasa_schedule="router_only", router_loss=router_loss, router_learning_rate=1.0,
                     per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                     max_grad_norm=0.0, weight_decay=0.0)
    trainer = RASATrainer(model, args=args, train_dataset=tiny_pairs(8), processing_class=tokenizer,
                          optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1.0}))
    before = [l.router.weight.detach().clone() for l in moe_layers(model)]
    trainer.train()
    assert trainer.state.global_step == 1
    delta = torch.cat([(l.router.weight.detach() - b).reshape(-1) for l, b in zip(moe_layers(model), before)])
    return _logs(trainer, "loss")[0], delta


def test_per_pair_router_loss_does_not_depend_on_batching(tmp_path):
    loss_8, grad_8 = per_pair_step(tmp_path / "a", 8, 1)
    loss_4x2, grad_4x2 = per_pair_step(tmp_path / "b", 4, 2)
    assert loss_8 == pytest.approx(loss_4x2, rel=1e-5)
    torch.testing.assert_close(grad_4x2, grad_8, rtol=1e-4, atol=1e-7)
    assert grad_8.abs().max() > 0
    # one pair per micro-batch, the pooled form (the authors') is the per-pair KL: an independent reference
    pooled_loss_1x8, pooled_1x8 = per_pair_step(tmp_path / "c", 1, 8, "pooled")
    assert pooled_loss_1x8 == pytest.approx(loss_8, rel=1e-5)
    torch.testing.assert_close(pooled_1x8, grad_8, rtol=1e-4, atol=1e-7)
    # with more pairs per micro-batch the pooled form depends on the batching: the test can tell the two apart
    _, pooled_4x2 = per_pair_step(tmp_path / "d", 4, 2, "pooled")
    assert not torch.allclose(pooled_4x2, grad_8, rtol=1e-3, atol=1e-6)
