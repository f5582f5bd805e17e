"""``rasa-trainer evaluate --attacks ... --attack_budget N``: the options are checked before any model loads (or,
for the budget's per-layer limits, before anything is generated), and results.json reports each attack with its
budget."""

from __future__ import annotations

import importlib
import json

import pytest

from rasa_trainer.cli import UsageError


def evaluate(*argv):
    from rasa_trainer.cli import evaluate as module

    return module.main([str(a) for a in argv])


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the attack options were checked")

    # import both first: evaluate binds common's load_model at import, which must be the real one to restore
    modules = [importlib.import_module(f"rasa_trainer.cli.{name}") for name in ("evaluate", "common")]
    for module in modules:
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture
def world_sets(tmp_path):
    from rasa_trainer.safety_world import make_world

    sets = make_world(seed=0).eval_sets()
    small = {"attacks": sets["attacks"][::16], "anchors": sets["anchors"][::2], "over_refusal": sets["over_refusal"][::4]}
    path = tmp_path / "sets.json"
    path.write_text(json.dumps(small))
    return path


def test_attack_options_fail_before_the_model_loads(tmp_path, world_sets, no_model_loading):
    common = ("--model_name_or_path", "safety_world", "--eval_sets", world_sets, "--output_dir", tmp_path / "out")
    cases = [
        (("--attacks", "gatebreaker"), "unknown attack\\(s\\) \\['gatebreaker'\\]"),
        (("--attacks", "base"), "--attacks base needs --base_model"),
        (("--attacks", "routing"), "--attacks routing needs --attack_experts"),
        (("--attacks", "refusal_suppression"), "--attacks refusal_suppression needs --attack_budget"),
        (("--attacks", "unsafe_steering", "--attack_budget", "0"), "--attack_budget 0: must be at least 1"),
        (("--attack_budget_scope", "model"), "--attack_budget_scope model: expected one of"),
        (("--attack_positions", "prompt"), "--attack_positions prompt"),
        (("--attack_margin", "-1"), "--attack_margin -1.0: must be at least 0"),
        (("--attacks", "routing", "--attack_experts", tmp_path / "missing"), "--attack_experts .*no such file"),
    ]
    for extra, match in cases:
        with pytest.raises(UsageError, match=match):
            evaluate(*common, *extra)


def test_budget_beyond_the_model_is_refused_before_generation(tmp_path, world_sets, monkeypatch):
    import rasa_trainer.evaluation.evaluate as evaluation

    monkeypatch.setattr(evaluation, "evaluate_safety", lambda *a, **k: pytest.fail("evaluation started"))
    common = ("--model_name_or_path", "safety_world", "--eval_sets", world_sets, "--output_dir", tmp_path / "out")
    with pytest.raises(UsageError, match="unsafe_steering can steer toward at most 2 experts in MoE layer 0"):
        evaluate(*common, "--attacks", "unsafe_steering", "--attack_budget", "3")
    with pytest.raises(UsageError, match="attack_budget is given but no attack that uses it"):
        evaluate(*common, "--attack_budget", "1")
    with pytest.raises(UsageError, match="refusal_suppression can switch off at most 56 experts over"):
        evaluate(*common, "--attacks", "refusal_suppression", "--attack_budget", "57", "--attack_budget_scope", "total")


def test_results_report_each_attack_and_its_budget(tmp_path, world_sets):
    out = tmp_path / "out"
    results = evaluate("--model_name_or_path", "safety_world", "--eval_sets", world_sets, "--output_dir", out,
                       "--judge", "safety_world", "--attacks", "refusal_suppression,unsafe_steering",
                       "--attack_budget", "8", "--attack_budget_scope", "total", "--max_new_tokens", "16",
                       "--batch_size", "64", "--no_progress", "true")
    written = json.loads((out / "results.json").read_text())
    assert written["report"] == json.loads(json.dumps(results["report"]))
    report = written["report"]
    for name in ("refusal_suppression", "unsafe_steering"):
        assert report[name]["budget"] == {"experts": 8, "scope": "total"} and report[name]["experts"] == 8
        assert report[name]["profile"]["refused_replies"] == 16
    assert report["refusal_suppression"]["positions"] == "all"
    assert report["unsafe_steering"]["positions"] == "decision"
    assert report["asr"] == 1.0 and report["unsafe_steering_asr"] == 1.0  # the base model follows every jailbreak
    assert report["refusal_suppression_anchor_asr"] is not None and report["forced_asr"] is None
