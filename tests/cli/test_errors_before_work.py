"""Errors before work (issue 21, item 8): the ``rasa-trainer`` subcommands refuse a value they cannot use with exit
status 2 and a message saying what to change, before any model is loaded or anything generated."""

from __future__ import annotations

import json

import pytest

import rasa_trainer.cli.detect as detect_cli
import rasa_trainer.cli.evaluate as evaluate_cli
from rasa_trainer.cli import UsageError, main
from rasa_trainer.cli.common import SAFETY_WORLD_CONFIG
from rasa_trainer.cli.arguments import check_dataset_has_model


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a subcommand gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad value was refused")

    monkeypatch.setattr(detect_cli, "load_model", refuse)
    monkeypatch.setattr(evaluate_cli, "load_model", refuse)


@pytest.mark.parametrize("flag", ["--sce_threshold", "--threshold"])
def test_detect_threshold_outside_the_risk_difference_range(tmp_path, no_model, capsys, flag):
    argv = ["detect", "--model_name_or_path", "safety_world", "--dataset_name", "safety_world",
            "--output_dir", str(tmp_path / "out"), flag, "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--threshold 2.0: risk differences lie in [-1, 1]" in err
    assert "the threshold must be in [-1, 1)" in err


def test_detect_takes_trains_names_of_the_selection_flags(tmp_path, no_model, capsys):
    argv = ["detect", "--model_name_or_path", "safety_world", "--dataset_name", "safety_world",
            "--output_dir", str(tmp_path / "out"), "--sce_num_experts", "1.5"]
    assert main(argv) == 2
    assert "--num_experts 1.5: give a fraction in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("sets, fragment", [
    ({}, "no evaluation set has any row"),
    ({"attacks": []}, "set 'attacks' has no rows"),
    ({"attacks": [{"prompt": "", "attack": "dan"}]}, "set 'attacks', row 0, column 'prompt': empty text"),
    ({"attacks": [{"prompt": [{"role": "bot", "content": "hi"}], "attack": "dan"}]}, "unknown role 'bot'"),
    ({"anchors": [{"prompt": [{"role": "user"}]}]}, "set 'anchors', row 0, column 'prompt': message 0 has no 'content'"),
])
def test_evaluate_refuses_bad_evaluation_sets_before_loading_the_model(tmp_path, no_model, capsys, sets, fragment):
    path = tmp_path / "eval_sets.json"
    path.write_text(json.dumps(sets))
    argv = ["evaluate", "--model_name_or_path", "safety_world", "--eval_sets", str(path),
            "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--eval_sets {path}: rows break the evaluation-set contract" in err and fragment in err


@pytest.mark.parametrize("argv, dataset, model, refused", [
    (["--dataset_name", "pairs.jsonl"], "pairs.jsonl", None, True),
    (["--config", str(SAFETY_WORLD_CONFIG), "--dataset_name=pairs.jsonl"], "pairs.jsonl", "safety_world", True),
    (["--config", "my.yaml"], "pairs.jsonl", None, True),
    (["--config", "my.yaml"], "pairs.jsonl", "./my-moe", False),
    (["--dataset_name", "pairs.jsonl", "--model_name_or_path", "safety_world"], "pairs.jsonl", "safety_world", False),
    (["--dataset_name", "pairs.jsonl", "--model_name_or_path=./my-moe"], "pairs.jsonl", "./my-moe", False),
    ([], None, "safety_world", False),
    (["--dataset_name", "safety_world"], "safety_world", "safety_world", False),
])
def test_a_dataset_without_a_model_is_refused(argv, dataset, model, refused):
    """``rasa-trainer train --dataset_name pairs.jsonl`` alone would train the demo model on the user's pairs."""
    if not refused:
        check_dataset_has_model(argv, dataset, model)
        return
    with pytest.raises(UsageError, match=r"--dataset_name pairs\.jsonl: .* SafetyWorld's demo model would be trained "
                                         r"on your pairs; add --model_name_or_path"):
        check_dataset_has_model(argv, dataset, model)
