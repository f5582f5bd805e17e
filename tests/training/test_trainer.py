"""RASATrainer on tiny random MoE models: what each phase changes, replay during training, losses, resume, saving."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from conftest import tiny_model
from tiny_chat import tiny_chat_tokenizer, tiny_pairs
from rasa_trainer import RASAConfig, RASATrainer
from rasa_trainer.moe.routing import record_routing
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.routing import real_tokens
from rasa_trainer.detection.selection import SafetyCriticalExperts, SelectedExpert

TRAINER_FAMILIES = ["olmoe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]
SELECTED = {0: [1, 3], 1: [2]}


def make_selection(model, by_layer=SELECTED) -> SafetyCriticalExperts:
    layers = moe_layers(model)
    experts = [
        SelectedExpert(layers[l].layer_index, l, e, 0.5, 0.6, 0.1) for l, es in by_layer.items() for e in es
    ]
    return SafetyCriticalExperts(
        experts=experts, model_type=model.config.model_type, num_moe_layers=len(layers),
        num_experts=layers[0].num_experts, top_k=layers[0].top_k, moe_layer_indices=[l.layer_index for l in layers],
        selection={"policy": "test"},
    )


def make_args(tmp_path, **overrides) -> RASAConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), rasa_rounds=1, per_device_train_batch_size=4, use_cpu=True, bf16=False,
        report_to="none", logging_steps=1, save_strategy="no", expert_learning_rate=1e-2, router_learning_rate=1e-2,
        disable_tqdm=True, seed=0, weight_decay=0.1, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return RASAConfig(**kwargs)


def make_trainer(tmp_path, family="qwen3_moe", selection=SELECTED, model=None, cls=RASATrainer, **overrides):
    tokenizer = tiny_chat_tokenizer()
    model = model if model is not None else tiny_model(family, vocab_size=len(tokenizer))
    args = make_args(tmp_path, **overrides)
    sce = make_selection(model, selection) if selection is not None else None
    return cls(model, args=args, train_dataset=tiny_pairs(), processing_class=tokenizer, safety_critical_experts=sce)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".rasa_repairs." not in n}


def _merged_params(trainer):
    from rasa_trainer.repairs.layer import merged_state_dict

    return merged_state_dict(trainer.model)


@pytest.mark.parametrize("family", TRAINER_FAMILIES)
@pytest.mark.parametrize("tuning", ["delta", "lora"])
def test_expert_phase_changes_only_selected_expert_slices(tmp_path, family, tuning):
    trainer = make_trainer(tmp_path, family, rasa_schedule="expert_only", expert_tuning=tuning)
    before = _snapshot(trainer.model)
    trainer.train()
    after = _merged_params(trainer)
    layers = {l.experts_name: l for l in moe_layers(trainer.model)}
    changed_any = False
    for name, old in before.items():
        new = after[name]
        module = name.rpartition(".")[0]
        if module in layers and new.dim() >= 2 and new.shape[0] == layers[module].num_experts:
            selected = SELECTED.get(layers[module].index, [])
            moved = [e for e in range(new.shape[0]) if not torch.equal(new[e], old[e])]
            if name.endswith("_bias") and tuning == "lora":
                assert moved == [], name  # LoRA does not tune biases
            else:
                assert set(moved) <= set(selected), f"{name}: experts {moved} changed, selected {selected}"
                changed_any |= bool(moved)
        else:
            assert torch.equal(new, old), f"{name} changed in the expert phase"
    assert changed_any


def test_trainable_parameters_are_exactly_the_selected_experts(tmp_path):
    trainer = make_trainer(tmp_path, "olmoe", rasa_schedule="expert_only")
    trainer.create_optimizer()
    trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    layer = moe_layers(trainer.model)[0]
    per_expert = sum(p[0].numel() for p in (layer.experts.gate_up_proj, layer.experts.down_proj))
    assert trainable == per_expert * sum(len(v) for v in SELECTED.values())
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"experts"}


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_router_phase_changes_only_routers(tmp_path, family):
    trainer = make_trainer(tmp_path, family, rasa_schedule="router_only")
    before = _snapshot(trainer.model)
    trainer.train()
    routers = {f"{l.router_name}.{n}" for l in moe_layers(trainer.model) for n, _ in l.router.named_parameters()}
    for name, p in trainer.model.named_parameters():
        if name in routers:
            assert not torch.equal(p, before[name]), f"router {name} did not learn"
        elif name in before:
            assert torch.equal(p, before[name]), f"{name} changed in the router phase"


def test_alternate_phases_leave_inactive_group_untouched(tmp_path):
    """With weight decay on, the routers do not move in the expert phase and the repairs not in the router phase."""
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="alternate")
    seen = {}

    class Probe(torch.nn.Module):
        pass

    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kw):
            seen[round(state.epoch)] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad or "rasa" in n or "gate.weight" in n}

    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.add_callback(Snap())
    trainer.train()
    routers = [n for n in start if n.endswith("mlp.gate.weight")]
    repairs = [n for n in start if ".rasa_repairs." in n]
    assert all(torch.equal(seen[1][n], start[n]) for n in routers)  # expert epoch: routers untouched
    assert any(not torch.equal(seen[1][n], start[n]) for n in repairs)
    assert all(torch.equal(seen[2][n], seen[1][n]) for n in repairs)  # router epoch: repairs untouched
    assert any(not torch.equal(seen[2][n], seen[1][n]) for n in routers)
    logged = {h.get("phase") for h in trainer.state.log_history if "phase" in h}
    assert logged == {1.0, 2.0}


class RecordingTrainer(RASATrainer):
    """Records the routing every training forward actually used."""

    used: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.get("rasa_index")
        with record_routing(model, probabilities=False) as rec:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.phases.phase == "expert":
            routing = real_tokens(rec.routing(), inputs["attention_mask"].cpu())
            self.used.append((rows.clone(), routing.stacked_indices(), inputs["attention_mask"].cpu()))
        return loss


def test_expert_phase_keeps_phase_start_routing(tmp_path):
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only", cls=RecordingTrainer,
                           rasa_rounds=2, expert_learning_rate=5e-2)
    trainer.used = []
    trainer.train()
    assert len(trainer.used) == 6  # 2 epochs x 3 steps
    cache = trainer.routing.cache  # routing at the start of the last expert phase
    for rows, used, mask in trainer.used[3:]:
        expected = cache.batch_routing(trainer.routing.positions(rows), mask)
        expected = real_tokens(expected, mask).stacked_indices()
        assert torch.equal(used.long(), expected.long())
    # and without replay the trained model would route some of these tokens elsewhere
    rows, _, mask = trainer.used[-1]
    batch = trainer.data_collator.base([
        {"input_ids": trainer.train_dataset[int(p)]["input_ids"], "labels": trainer.train_dataset[int(p)]["labels"]}
        for p in trainer.routing.positions(rows)
    ])
    with torch.no_grad(), record_routing(trainer.model, probabilities=False) as rec:
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    free = real_tokens(rec.routing(), batch["attention_mask"]).stacked_indices()
    first = real_tokens(trainer.routing.initial.batch_routing(trainer.routing.positions(rows), batch["attention_mask"]), batch["attention_mask"]).stacked_indices()
    assert not torch.equal(free.long(), first.long())


def _mean_kl(trainer) -> float:
    loader = trainer.get_train_dataloader()
    values = []
    trainer.model.eval()
    with torch.no_grad():
        for batch in loader:
            inputs = {k: v for k, v in batch.items()}
            anchor_ids, anchor_mask = inputs.pop("anchor_input_ids"), inputs.pop("anchor_attention_mask")
            rows = inputs.pop("rasa_index")
            values.append(float(trainer._router_loss(trainer.model, inputs, anchor_ids, anchor_mask, rows, None)))
    return sum(values) / len(values)


def test_router_kl_falls_over_router_phase(tmp_path):
    # anchors route through the same routers, so the target moves too; the KL still falls over enough steps
    trainer = make_trainer(tmp_path, "olmoe", rasa_schedule="router_only", rasa_rounds=16, router_learning_rate=3e-2,
                           per_device_train_batch_size=6, logging_steps=100, router_loss="pooled")
    before = _mean_kl(trainer)
    trainer.train()
    after = _mean_kl(trainer)
    assert after < 0.7 * before, (before, after)


def test_router_loss_scaled_under_gradient_accumulation(tmp_path):
    trainer = make_trainer(tmp_path, "olmoe", rasa_schedule="router_only", gradient_accumulation_steps=2,
                           router_loss="pooled")  # the per-pair form normalises by the pairs of the step (contract tests)
    batch = next(iter(trainer.get_train_dataloader()))
    anchor_ids, anchor_mask, rows = batch.pop("anchor_input_ids"), batch.pop("anchor_attention_mask"), batch.pop("rasa_index")
    trainer.current_gradient_accumulation_steps = 2
    plain = trainer._router_loss(trainer.model, dict(batch), anchor_ids, anchor_mask, rows, None)
    scaled = trainer._router_loss(trainer.model, dict(batch), anchor_ids, anchor_mask, rows, torch.tensor(10))
    torch.testing.assert_close(scaled, plain / 2)


def test_prompt_and_padding_carry_no_loss(tmp_path):
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only")
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    labels, mask, ids = batch["labels"], batch["attention_mask"], batch["input_ids"]
    assert (labels[mask == 0] == -100).all()
    for b in range(ids.shape[0]):
        row = trainer.train_dataset[int(trainer.routing.positions(batch["rasa_index"][b:b + 1])[0])]
        prompt_len = len(tokenizer.apply_chat_template(
            tiny_pairs()[int(batch["rasa_index"][b])]["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"])
        assert (labels[b, :prompt_len] == -100).all()
        n_real = int(mask[b].sum())
        assert (labels[b, prompt_len:n_real] == ids[b, prompt_len:n_real]).all()
        assert len(row["input_ids"]) == n_real
    # the loss is the mean cross-entropy over completion tokens only
    model = trainer.model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        manual = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        trainer.phases.set_phase("full")
        model.train()
        loss = trainer.compute_loss(model, {k: v for k, v in batch.items()})
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-5)


def test_full_schedule_first_step_loss_matches_sft_trainer(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    base = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    rasa = RASATrainer(copy.deepcopy(base), args=make_args(tmp_path, rasa_schedule="full", max_grad_norm=0.0),
                       train_dataset=tiny_pairs(), processing_class=tokenizer)
    from rasa_trainer.training.trainer import _training_rows

    rows = _training_rows(tiny_pairs(), rasa.args).remove_columns(["rasa_anchor", "rasa_index"])
    sft = SFTTrainer(copy.deepcopy(base), args=SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to="none",
        logging_steps=1, save_strategy="no", learning_rate=1e-2, num_train_epochs=1, disable_tqdm=True, seed=0,
        weight_decay=0.1, lr_scheduler_type="constant", gradient_checkpointing_kwargs={"use_reentrant": False}),
        train_dataset=rows, processing_class=tokenizer)
    rasa.train()
    sft.train()
    first = lambda t: next(h["loss"] for h in t.state.log_history if "loss" in h)  # noqa: E731
    assert first(rasa) == pytest.approx(first(sft), rel=1e-5)


def test_save_reload_same_logits_both_modes(tmp_path):
    for tuning in ("delta", "lora"):
        trainer = make_trainer(tmp_path / tuning, "qwen3_moe", rasa_schedule="alternate", expert_tuning=tuning)
        trainer.train()
        out = tmp_path / tuning / "final"
        trainer.save_model(str(out))
        reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        x = torch.tensor([[5, 9, 12, 17, 3, 22]])
        model = trainer.model.eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-5)
        files = set(os.listdir(out))
        assert {"model.safetensors", "config.json", "README.md", "safety_critical_experts.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
        assert ("adapter" in files) is (tuning == "lora")
        assert "rasa_repairs" not in (out / "config.json").read_text()  # the experts implementation is not saved
        card = (out / "README.md").read_text()
        assert "| 0 | 0 | 1, 3 |" in card and "rasa" in card
        # the measured limit a user must know before publishing: attacks that steer around the repaired experts
        assert "routes around the repairs" in card and "--attacks routing,refusal_suppression,unsafe_steering" in card


def test_resume_gives_same_weights(tmp_path):
    full = make_trainer(tmp_path / "a", "qwen3_moe", rasa_schedule="alternate")
    full.train()
    interrupted = make_trainer(tmp_path / "b", "qwen3_moe", rasa_schedule="alternate", save_strategy="steps", save_steps=2)
    interrupted.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"  # mid expert phase (3 steps per epoch)
    assert (checkpoint / "rasa_routing_cache.safetensors").exists()
    resumed = make_trainer(tmp_path / "c", "qwen3_moe", rasa_schedule="alternate")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_another_selection_fails(tmp_path):
    first = make_trainer(tmp_path / "a", "qwen3_moe", rasa_schedule="expert_only", save_strategy="steps", save_steps=2)
    first.train()
    other = make_trainer(tmp_path / "b", "qwen3_moe", rasa_schedule="expert_only", selection={0: [4], 1: [2]})
    with pytest.raises(ValueError, match="belongs to another run: .*selection"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


def test_bf16_routers_train_in_fp32(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer)).to(torch.bfloat16)
    trainer = make_trainer(tmp_path, model=model, rasa_schedule="router_only", router_learning_rate=1e-6)
    routers = [l.router.weight for l in moe_layers(trainer.model)]
    assert all(w.dtype == torch.float32 for w in routers)
    before = [w.detach().clone() for w in routers]
    trainer.train()
    # an update of 1e-6 survives in fp32 master weights (it would round away in bf16)
    assert all(not torch.equal(a, b) for a, b in zip(before, routers))
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(before, routers))
    assert next(trainer.model.model.embed_tokens.parameters()).dtype == torch.bfloat16


def test_config_errors():
    base = dict(output_dir="/tmp/x", use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match="num_train_epochs=5 conflicts with rasa_rounds=3"):
        RASAConfig(**base, num_train_epochs=5)
    assert RASAConfig(**base).num_train_epochs == 6
    assert RASAConfig(**base, rasa_schedule="full", rasa_rounds=2).num_train_epochs == 2
    with pytest.raises(ValueError, match="packing and padding_free are not supported"):
        RASAConfig(**base, packing=True)
    with pytest.raises(ValueError, match="use_reentrant"):
        RASAConfig(**base, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match=r"kl_direction='sideways' is not one of"):
        RASAConfig(**base, kl_direction="sideways")
    with pytest.raises(ValueError, match="max_steps=10"):
        RASAConfig(**base, max_steps=10)
    config = RASAConfig(**base)
    assert (config.expert_learning_rate, config.router_learning_rate, config.kl_direction) == (5e-5, 1e-6, "forward")
    assert config.ddp_find_unused_parameters is True


def test_trainer_errors(tmp_path):
    from peft import LoraConfig

    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="expert_tuning='lora'"):
        RASATrainer(model, args=make_args(tmp_path), train_dataset=tiny_pairs(), processing_class=tokenizer,
                    peft_config=LoraConfig(r=2))
    with pytest.raises(TypeError, match="RASAConfig"):
        RASATrainer(model, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
                    train_dataset=tiny_pairs(), processing_class=tokenizer)
    bad = tiny_pairs()
    del bad[3]["anchor_prompt"]
    with pytest.raises(ValueError, match="row 3, column 'anchor_prompt'"):
        RASATrainer(model, args=make_args(tmp_path), train_dataset=bad, processing_class=tokenizer)
    with pytest.raises(ValueError, match="exceed max_length=8"):
        make_trainer(tmp_path, "qwen3_moe", max_length=8)
    wrong = make_selection(tiny_model("olmoe"))
    with pytest.raises(ValueError):
        RASATrainer(model, args=make_args(tmp_path), train_dataset=tiny_pairs(), processing_class=tokenizer,
                    safety_critical_experts=wrong)


def test_trainer_detects_experts_when_none_are_given(tmp_path):
    from rasa_trainer.safety_world import load_safety_world_model, load_world_metadata, make_world

    model, tokenizer = load_safety_world_model()
    pairs = make_world(seed=0).train_pairs()[::8]  # 32 pairs, every aligned family
    trainer = RASATrainer(model, args=make_args(tmp_path, detection_max_new_tokens=16, detection_batch_size=32,
                                                detection_judge="keyword"),
                          train_dataset=pairs, processing_class=tokenizer)
    assert trainer.selection is None  # detection runs at the start of train(), on the training device
    trainer.train()
    planted = {tuple(e) for e in load_world_metadata()["planted_experts"]}
    chosen = {(e.moe_layer, e.expert) for e in trainer.selection.experts}
    assert chosen == planted  # K = 12.5% of 64 routed experts = 8, and detection finds the planted ones
    assert (tmp_path / "out" / "safety_critical_experts.json").exists()
    assert any(h.get("grad_norm_experts", 0) > 0 for h in trainer.state.log_history)  # their repairs trained


def test_router_logits_setting_restored_after_training(tmp_path):
    """TRL turns output_router_logits on for its aux loss; left on, it would be saved and break batched generation."""
    for schedule in ("full", "alternate"):
        trainer = make_trainer(tmp_path / schedule, "qwen3_moe", rasa_schedule=schedule)
        trainer.train()
        assert trainer.model.config.output_router_logits is False
        batch = trainer.processing_class(["how do i", "tell me step one two"], return_tensors="pt", padding=True)
        trainer.model.eval().generate(**batch, max_new_tokens=2, do_sample=False)


def test_caches_keep_weights_only_when_replayed(tmp_path):
    cached = make_trainer(tmp_path / "c", "qwen3_moe", rasa_schedule="expert_only")
    cached.train()
    assert cached.routing.cache.weights is not None and cached.routing.initial.weights is None
    recompute = make_trainer(tmp_path / "r", "qwen3_moe", rasa_schedule="expert_only", replay_weights="recompute")
    recompute.train()
    assert recompute.routing.cache.weights is None
    assert recompute.routing.cache.nbytes_per_token() == 2 * 2 * 2  # 2 MoE layers x top-2 x int16
    assert any(h.get("completion_loss", 9) < cached.state.log_history[0]["completion_loss"] for h in recompute.state.log_history)


def test_completion_loss_is_the_step_mean_under_gradient_accumulation(tmp_path):
    """``completion_loss`` is logged as the optimiser step's mean cross-entropy, as Trainer logs ``loss``: with 3
    accumulation steps it used to be a third of it (each micro-batch's share of the step's token-normalised mean)."""
    trainer = make_trainer(tmp_path, rasa_schedule="expert_only", gradient_accumulation_steps=3,
                           per_device_train_batch_size=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completion_loss" in h]
    assert logs
    for h in logs:
        assert h["completion_loss"] == pytest.approx(h["loss"], rel=1e-4)


def test_drop_last_with_a_batch_larger_than_the_data_is_refused_at_construction(tmp_path):
    """Trainer would fail later on ``max_steps`` without naming the cause; the message names the pairs and the batch."""
    with pytest.raises(ValueError, match=r"dataloader_drop_last=True drops every batch: \d+ training pairs are fewer "
                                         r"than one batch of 64"):
        make_trainer(tmp_path, per_device_train_batch_size=64, dataloader_drop_last=True)
    make_trainer(tmp_path, per_device_train_batch_size=64)  # without drop_last the last, partial batch runs


def test_every_process_detects_with_the_output_folder(tmp_path, monkeypatch):
    """Detection inside train() gives every process the output folder, so each keeps its own share's progress there
    and an interrupted multi-process run resumes on every rank (process 0 alone writes the artifacts and holds the
    lock: detection's own rule). Before, only process 0 did, and the others regenerated their shares on resume."""
    from rasa_trainer.detection import detect as detection

    class Stop(Exception):
        pass

    seen = []

    def fake_detect(model, tokenizer, pairs, **kwargs):
        seen.append(kwargs["output_dir"])
        raise Stop

    monkeypatch.setattr(detection, "detect_safety_critical_experts", fake_detect)
    for zero in (True, False):
        trainer = make_trainer(tmp_path, selection=None, rasa_schedule="expert_only")
        monkeypatch.setattr(trainer, "is_world_process_zero", lambda zero=zero: zero)
        with pytest.raises(Stop):
            trainer.train()
    assert seen == [str(tmp_path / "out")] * 2
