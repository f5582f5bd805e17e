"""What is published is what was trained: every save route (save_model, periodic checkpoints, push_to_hub and its
checkpoint pushes, trainer.model.save_pretrained after training) reloads with plain transformers to the trained
logits; the PEFT adapter loads with PeftModel.from_pretrained; routers keep their training precision."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import stat
import types

import pytest
import torch
import transformers.trainer
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import tiny_model
from test_trainer import make_trainer
from tiny_chat import tiny_chat_tokenizer
from rasa_trainer.moe.discovery import moe_layers

FAMILIES = ["olmoe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]
PROBE = torch.tensor([[5, 9, 12, 17, 3, 22, 40, 7]])


class FakeHub:
    """Stands in for huggingface_hub's HfApi: upload_folder copies the folder, as the Hub would store it."""

    def __init__(self, root):
        self.root, self.commits = root, []

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None, ignore_patterns=None,
                      run_as_future=False, **kwargs):
        target = os.path.join(self.root, path_in_repo or "main")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder_path, target, ignore=shutil.ignore_patterns(*(ignore_patterns or [])))
        self.commits.append(commit_message)
        future = concurrent.futures.Future()
        future.set_result(target)
        return future if run_as_future else target


class RecordLogits(TrainerCallback):
    """The model's logits at every checkpoint, taken right after it is written."""

    def __init__(self):
        self.at_step = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.at_step[state.global_step] = model(PROBE).logits
        model.train(was_training)


def logits(model):
    with torch.no_grad():
        return model.eval()(PROBE).logits


def reload(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tuning", ["delta", "lora"])
def test_every_save_route_holds_the_trained_model(tmp_path, monkeypatch, family, tuning):
    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trainer = make_trainer(tmp_path, family, rasa_schedule="alternate", expert_tuning=tuning, save_strategy="epoch",
                           push_to_hub=True, hub_model_id="user/rasa", hub_strategy="checkpoint")
    recorder = RecordLogits()
    trainer.add_callback(recorder)
    base_logits = logits(tiny_model(family, vocab_size=len(tiny_chat_tokenizer())))
    trainer.train()
    trained = logits(trainer.model)
    assert not torch.equal(trained, base_logits)

    out = tmp_path / "out"
    assert sorted(recorder.at_step) == [3, 6]  # two epochs of 12 pairs in batches of 4
    for step, expected in recorder.at_step.items():
        assert torch.equal(logits(reload(out / f"checkpoint-{step}")), expected), f"checkpoint-{step}"
    assert torch.equal(logits(reload(tmp_path / "hub" / "last-checkpoint")), recorder.at_step[6])

    trainer.push_to_hub()
    assert torch.equal(logits(reload(tmp_path / "hub" / "main")), trained)
    trainer.save_model(str(tmp_path / "final"))  # push_to_hub=True: save_model pushes too, as Trainer's does
    assert hub.commits[-1] == "Model save"
    assert torch.equal(logits(reload(tmp_path / "final")), trained)
    trainer.model.save_pretrained(tmp_path / "plain")  # what many scripts call
    assert torch.equal(logits(reload(tmp_path / "plain")), trained)

    files = set(os.listdir(tmp_path / "final"))
    assert {"model.safetensors", "config.json", "README.md", "safety_critical_experts.json", "training_args.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert ("adapter" in files) is (tuning == "lora")
    if tuning == "lora":
        from peft import PeftModel

        base = tiny_model(family, vocab_size=len(tiny_chat_tokenizer()))
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "final" / "adapter"))
        torch.testing.assert_close(logits(peft_model), trained, rtol=0, atol=1e-5)


def test_published_files_respect_the_umask(tmp_path):
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only")
    trainer.train()
    previous = os.umask(0o022)
    try:
        trainer.save_model(str(tmp_path / "final"))
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json", "README.md", "safety_critical_experts.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "final" / name).st_mode) == 0o644, name


def test_bf16_router_update_survives_save_and_fp32_reload(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer)).to(torch.bfloat16)
    trainer = make_trainer(tmp_path, model=model, rasa_schedule="router_only", router_learning_rate=1e-6, rasa_rounds=2)
    before = {layer.router_name: layer.router.weight.detach().float().clone() for layer in moe_layers(model)}
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    fp32 = reload(tmp_path / "final", dtype=torch.float32)
    bf16 = reload(tmp_path / "final", dtype=torch.bfloat16)
    changed = kept_in_bf16 = 0
    for layer, loaded32, loaded16 in zip(moe_layers(trainer.model), moe_layers(fp32), moe_layers(bf16)):
        trained = layer.router.weight.detach()
        assert trained.dtype == torch.float32
        assert torch.equal(loaded32.router.weight, trained)  # the fp32 master weights, exactly
        moved = trained != before[layer.router_name]
        changed += int(moved.sum())
        kept_in_bf16 += int((loaded16.router.weight.float() != before[layer.router_name])[moved].sum())
    assert changed > 0
    assert kept_in_bf16 < changed  # a bf16 load keeps only part of a 1e-6 update (see the README)


def test_architecture_fp32_router_is_never_downcast(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    tiny_model("deepseek_v3", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    model = reload(tmp_path / "base", dtype=torch.bfloat16)  # DeepSeek-V3 keeps gate.weight in fp32
    assert all(layer.router.weight.dtype == torch.float32 for layer in moe_layers(model))
    trainer = make_trainer(tmp_path, model=model, rasa_schedule="expert_only")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        gates = [k for k in f.keys() if k.endswith("mlp.gate.weight")]
        assert gates and all(f.get_tensor(k).dtype == torch.float32 for k in gates)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_peft_model_input_is_rejected_with_the_fix(tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_chat_tokenizer()
    model = get_peft_model(tiny_model("qwen3_moe", vocab_size=len(tokenizer)), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        make_trainer(tmp_path, model=model, rasa_schedule="alternate")


def test_full_schedule_with_peft_config_saves_a_loadable_adapter(tmp_path):
    from peft import LoraConfig, PeftModel

    from rasa_trainer import RASAConfig, RASATrainer
    from test_trainer import make_args
    from tiny_chat import tiny_pairs

    tokenizer = tiny_chat_tokenizer()
    args = make_args(tmp_path, rasa_schedule="full", expert_learning_rate=5e-2)
    trainer = RASATrainer(tiny_model("qwen3_moe", vocab_size=len(tokenizer)), args=args, train_dataset=tiny_pairs(),
                          processing_class=tokenizer, peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(tiny_model("qwen3_moe", vocab_size=len(tokenizer)), str(tmp_path / "final"))
    torch.testing.assert_close(logits(reloaded), logits(trainer.model), rtol=0, atol=1e-6)


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    from tiny_chat import tiny_pairs

    from rasa_trainer import RASATrainer
    from test_trainer import make_args, make_selection

    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    # the eval loss falls every epoch; ranking it "greater is better" makes the first checkpoint the best, so that
    # restoring it at the end is visible
    args = make_args(tmp_path, rasa_schedule="expert_only", rasa_rounds=3, save_strategy="epoch", eval_strategy="epoch",
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = RASATrainer(model, args=args, train_dataset=tiny_pairs(), eval_dataset=tiny_pairs(8),
                          processing_class=tokenizer, safety_critical_experts=make_selection(model))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    last = max((tmp_path / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert best is not None and os.path.basename(best) != last.name, (best, losses)
    assert torch.equal(logits(trainer.model), logits(reload(best)))


def test_training_twice_on_merged_repairs_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only")
    trainer.train()
    with pytest.raises(RuntimeError, match="Build a new RASATrainer"):
        trainer.train()
