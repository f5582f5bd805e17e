"""Resume means the same run: a checkpoint is resumed only on the model it was trained from. The run fingerprint
holds the base model's identity (config shapes, a sampled hash of the weights taken before training changes them,
the load dtype, the tokenizer and its chat template); a difference is refused, listing it, before any evaluation or
step (exit status 2 on the command line), unless ``ignore_checkpoint_mismatch``.

As a user meets it: `rasa-trainer train` on a SafetyWorld model saved to a folder (fp32), checkpoints on, then
`--resume_from_checkpoint true` with another model folder of the same shapes, with `--dtype bfloat16`, with a changed
chat template, and with the same model (which resumes)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from test_trainer import make_args, make_selection
from tiny_chat import tiny_chat_tokenizer, tiny_pairs

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CONFIG = ROOT / "rasa_trainer" / "configs" / "safety_world.yaml"


def cli(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rasa_trainer.cli", *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=900)


def train_args(model: str, *extra) -> list[str]:
    """The SafetyWorld demo config on a model folder: one round (32 steps), a checkpoint every 16 steps."""
    return ["train", "--config", CONFIG, "--model_name_or_path", model, "--safety_critical_experts", "sce",
            "--output_dir", "run", "--rasa_rounds", "1", "--save_strategy", "steps", "--save_steps", "16",
            "--skip_eval", "true", *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A run of `rasa-trainer train` from a fp32 model folder that wrote checkpoint-16 and checkpoint-32."""
    from rasa_trainer.safety_world import load_safety_world_model

    work = tmp_path_factory.mktemp("resume")
    model, tokenizer = load_safety_world_model()
    model.save_pretrained(work / "sw")
    tokenizer.save_pretrained(work / "sw")
    make_selection(model, {0: [1, 3], 1: [2]}).save(work / "sce")
    proc = cli(*train_args("sw"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (work / "run").glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-32"]
    return work


def resume(work: Path, model: str, *extra) -> subprocess.CompletedProcess:
    return cli(*train_args(model, "--resume_from_checkpoint", "true", *extra), cwd=work)


def assert_refused_before_work(proc, *words):
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "rasa-trainer train: error: --resume_from_checkpoint" in proc.stderr
    assert "the checkpoint was trained from another model" in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr[-3000:]
    assert "--ignore_checkpoint_mismatch true" in proc.stderr
    assert "'loss'" not in proc.stdout + proc.stderr  # no step was taken


def test_resume_on_another_model_of_the_same_shapes_is_refused(first_run):
    from transformers import AutoConfig, AutoModelForCausalLM

    other = first_run / "other"
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(first_run / "sw")).save_pretrained(other)
    for name in os.listdir(first_run / "sw"):  # the same tokenizer
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(first_run / "sw" / name, other / name)
    assert_refused_before_work(resume(first_run, "other"),
                               "model weights: same tensors and shapes, different content")


def test_resume_in_another_dtype_is_refused(first_run):
    assert_refused_before_work(resume(first_run, "sw", "--dtype", "bfloat16"),
                               "model dtype: checkpoint float32, now bfloat16", "load the model in float32")


def test_resume_with_a_changed_chat_template_is_refused(first_run):
    from transformers import AutoTokenizer

    edited = first_run / "sw-template"
    shutil.copytree(first_run / "sw", edited)
    tokenizer = AutoTokenizer.from_pretrained(edited)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|assistant|>", "<|assistant|> ", 1)
    tokenizer.save_pretrained(edited)
    proc = resume(first_run, "sw-template")
    assert_refused_before_work(proc, "chat template: differs from the one the checkpoint was trained with")
    assert "model weights" not in proc.stderr and "training data" not in proc.stderr  # only what differs


def test_resume_with_other_arguments_is_refused_before_loading(first_run):
    """What needs no model (the arguments, the pairs, the selection) is compared before the model loads."""
    proc = resume(first_run, "sw", "--expert_learning_rate", "1e-3", "--world_seed", "1")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "the checkpoint belongs to another run: expert_learning_rate: checkpoint 0.005, now 0.001" in proc.stderr
    assert "training data: checkpoint 256 pairs, now " in proc.stderr
    assert "--ignore_checkpoint_mismatch true" in proc.stderr and "Loading weights" not in proc.stderr


def test_resume_on_the_same_model_goes_through(first_run):
    """The identity taken by the command right after loading, and by the trainer at the start of train(), agree with
    the one recorded from the base model (not the trained one) by the first run."""
    proc = resume(first_run, "sw")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "belongs to another run" not in proc.stderr and "another model" not in proc.stderr
    fingerprint = json.loads((first_run / "run" / "checkpoint-32" / "rasa_checkpoint.json").read_text())["fingerprint"]
    assert fingerprint["model"]["config"]["model_type"] == "qwen3_moe"
    assert fingerprint["model"]["dtype"] == "float32" and fingerprint["model"]["tokenizer"]["chat_template_sha256"]


# ------------------------------------------------------------------------------------------------ the library


def trainer_on(tmp_path, model, **overrides):
    from rasa_trainer import RASATrainer

    tokenizer = tiny_chat_tokenizer()
    args = make_args(tmp_path, rasa_schedule="alternate", save_strategy="epoch", **overrides)
    return RASATrainer(model, args=args, train_dataset=tiny_pairs(), processing_class=tokenizer,
                       safety_critical_experts=make_selection(model))


@pytest.fixture
def trained(tmp_path):
    vocab = len(tiny_chat_tokenizer())
    trainer_on(tmp_path, tiny_model("qwen3_moe", vocab_size=vocab)).train()
    return tmp_path, vocab


def test_trainer_refuses_another_base_model_before_any_step(trained):
    tmp_path, vocab = trained
    trainer = trainer_on(tmp_path, tiny_model("qwen3_moe", seed=1, vocab_size=vocab))
    with pytest.raises(ValueError, match="belongs to another run: model weights: same tensors and shapes, different "
                                         "content.*ignore_checkpoint_mismatch=True"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_trainer_refuses_another_family_listing_the_config(trained):
    tmp_path, vocab = trained
    trainer = trainer_on(tmp_path, tiny_model("qwen3_moe", vocab_size=vocab, moe_intermediate_size=8))
    with pytest.raises(ValueError, match="model config moe_intermediate_size: checkpoint 16, now 8"):
        trainer.train(resume_from_checkpoint=True)


def test_the_base_model_is_what_is_recorded_not_the_trained_one(trained):
    """The routers train in place, so a hash taken at save time would differ on every resume: the checkpoint records
    the base model as train() began, and the untouched base model resumes."""
    tmp_path, vocab = trained
    trainer = trainer_on(tmp_path, tiny_model("qwen3_moe", vocab_size=vocab))
    trainer.train(resume_from_checkpoint=True)  # nothing refused (training had ended: no further step)


def test_ignore_checkpoint_mismatch_resumes_with_a_warning(trained, caplog):
    tmp_path, vocab = trained
    trainer = trainer_on(tmp_path, tiny_model("qwen3_moe", seed=1, vocab_size=vocab), ignore_checkpoint_mismatch=True)
    with caplog.at_level(logging.WARNING, logger="rasa_trainer.training.saving"):
        trainer.train(resume_from_checkpoint=True)
    assert "belongs to another run (model weights: same tensors and shapes, different content" in caplog.text


def test_identity_is_unchanged_by_what_the_trainer_attaches():
    """Routers upcast to fp32 master weights and attached repairs leave the base model's identity as it was."""
    from rasa_trainer.repairs.layer import attach_repairs, upcast_routers
    from rasa_trainer.training.run_identity import model_differences, model_identity

    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer)).to(torch.bfloat16)
    before = model_identity(model, tokenizer)
    attach_repairs(model, {0: [1]}, "lora")
    upcast_routers(model)
    assert model_differences(before, model_identity(model, tokenizer)) == []
    assert model_differences(before, model_identity(model.float(), tokenizer)) == [
        "model dtype: checkpoint bfloat16, now float32 (load the model in bfloat16, as the run that wrote the "
        "checkpoint did)"]


def test_incomplete_checkpoint_given_explicitly_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from rasa_trainer.cli import common, main, train

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(train, "load_model", refuse)
    monkeypatch.setattr(common, "load_model", refuse)
    (tmp_path / "out" / "checkpoint-8").mkdir(parents=True)  # its save was interrupted: no manifest
    assert main(["train", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint",
                 str(tmp_path / "out" / "checkpoint-8")]) == 2
    error = capsys.readouterr().err
    assert "checkpoint-8: cannot resume from it: it has no rasa_checkpoint.json (the save was interrupted" in error
    assert "give a complete checkpoint-* folder" in error
