"""`rasa-trainer train` and `rasa-trainer detect` take the judge options (`--judge openai --judge_base_url ...`) as
`evaluate` does, and `train`'s evaluation runs the MoE attacks (`--attacks`, `--attack_budget`): every option checked
before any model loads (an option no judge or attack takes is an error, never ignored), the options reaching the
judges built, and the card's evaluation kept as JSON-ready data with its intervals."""

from __future__ import annotations

import importlib
import json
import re

import pytest

from rasa_trainer.cli import UsageError
from rasa_trainer.judges import OpenAIJudge

URL = "http://127.0.0.1:9/v1"  # never asked: each test stops before anything is judged
HTTP_JUDGE = ["--judge", "openai", "--judge_base_url", URL, "--judge_model", "judge-model", "--judge_format",
              "refusal"]


class Stop(Exception):
    pass


def train(*argv):
    from rasa_trainer.cli import train as module

    return module.main([str(a) for a in argv])


def detect(*argv):
    from rasa_trainer.cli import detect as module

    return module.main([str(a) for a in argv])


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    modules = [importlib.import_module(f"rasa_trainer.cli.{name}") for name in ("common", "train", "detect")]
    for module in modules:
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def detect_argv(tmp_path):
    return ["--model_name_or_path", "safety_world", "--dataset_name", "safety_world", "--output_dir", tmp_path / "sce"]


# ------------------------------------------------------------------------------------------------ judge options


@pytest.mark.parametrize("argv, message", [
    (["--judge", "openai", "--judge_model", "m", "--judge_format", "refusal"], "needs base_url \\(--judge_base_url\\)"),
    (["--judge", "openai", "--judge_base_url", URL, "--judge_model", "m"], "needs format \\(--judge_format\\)"),
    (["--judge", "keyword", "--judge_base_url", URL], "--judge_base_url: no judge of this command takes it"),
    ([*HTTP_JUDGE, "--judge_controversial", "safe"], "--judge_controversial: no judge of this command takes it"),
])
def test_judge_options_are_checked_before_loading(tmp_path, no_model_loading, api_key, argv, message):
    with pytest.raises(UsageError, match=message):
        train("--output_dir", tmp_path / "run", *argv)
    with pytest.raises(UsageError, match=message):
        detect(*detect_argv(tmp_path), *argv)


def test_detect_builds_the_http_judge_from_its_options(tmp_path, monkeypatch, api_key):
    from rasa_trainer.cli import detect as command
    from rasa_trainer.detection import detect as detection

    seen = {}

    def stop(model, tokenizer, pairs, judge, **kwargs):
        seen["judge"] = judge
        raise Stop

    monkeypatch.setattr(command, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(detection, "detect_safety_critical_experts", stop)
    with pytest.raises(Stop):
        detect(*detect_argv(tmp_path), *HTTP_JUDGE, "--judge_max_workers", "3", "--judge_timeout", "7")
    judge = seen["judge"]
    assert isinstance(judge, OpenAIJudge)
    assert (judge.base_url, judge.model, judge.format.name) == (URL, "judge-model", "refusal")
    assert (judge.max_workers, judge.timeout) == (3, 7.0)
    assert judge.cache_path == str(tmp_path / "sce" / "judge_cache.json")  # the run's answers, in its folder
    with pytest.raises(Stop):
        detect(*detect_argv(tmp_path), *HTTP_JUDGE, "--judge_cache", tmp_path / "elsewhere.json")
    assert seen["judge"].cache_path == str(tmp_path / "elsewhere.json")


def test_train_builds_the_http_judge_for_detection_and_evaluation(tmp_path, monkeypatch, api_key):
    from rasa_trainer.cli import train as command

    seen = {}

    def stop(model, tokenizer, pairs, judge, args):
        seen.update(judge=judge, detection_judge=args.detection_judge)
        raise Stop

    monkeypatch.setattr(command, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(command, "detect", stop)
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train("--output_dir", out, "--skip_eval", "true", *HTTP_JUDGE, "--judge_max_retries", "2")
    judge = seen["judge"]
    assert isinstance(judge, OpenAIJudge) and seen["detection_judge"] == "openai"
    assert (judge.base_url, judge.model, judge.format.name, judge.max_retries) == (URL, "judge-model", "refusal", 2)
    assert judge.cache_path == str(out / "judge_cache.json")
    # the evaluation's judge gets the same options
    inputs = command.preflight(*command.parse_args(["--output_dir", str(out), *HTTP_JUDGE]))
    assert isinstance(inputs.suite.judge, OpenAIJudge) and inputs.suite.judge.model == "judge-model"
    assert inputs.judge_options == {"base_url": URL, "model": "judge-model", "format": "refusal",
                                    "cache": str(out / "judge_cache.json")}


# ------------------------------------------------------------------------------------------------ attacks


def eval_sets_file(tmp_path, *names):
    from rasa_trainer.safety_world import make_world

    sets = make_world(seed=0).eval_sets()
    path = tmp_path / f"sets_{'_'.join(names)}.json"
    path.write_text(json.dumps({name: sets[name][:4] for name in names}))
    return path


def inputs_for(tmp_path, *argv):
    from rasa_trainer.cli.train import parse_args, preflight

    return preflight(*parse_args(["--output_dir", str(tmp_path / "run"), *map(str, argv)]))


def test_the_demo_evaluation_attacks_by_default(tmp_path, no_model_loading):
    assert inputs_for(tmp_path).attacks == ("routing", "refusal_suppression")
    # router_only trains no experts and detects none: no routing attack without a selection
    assert inputs_for(tmp_path, "--rasa_schedule", "router_only").attacks == ("refusal_suppression",)
    no_anchors = eval_sets_file(tmp_path, "attacks", "utility")
    assert inputs_for(tmp_path, "--eval_sets", no_anchors).attacks == ("routing",)
    assert inputs_for(tmp_path, "--attacks", "none").attacks == ()
    asked = inputs_for(tmp_path, "--attacks", "unsafe_steering,routing", "--attack_budget", "1")
    assert asked.attacks == ("unsafe_steering", "routing")


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "base"], "unknown attack\\(s\\) \\['base'\\] \\(the base model's routing is --routing_diagnostics"),
    (["--attacks", "routing", "--rasa_schedule", "full"], "--attacks routing needs the Safety-Critical Experts"),
    (["--attack_budget", "0"], "--attack_budget 0: must be at least 1"),
    (["--attack_budget_scope", "model"], "--attack_budget_scope model: expected one of"),
    (["--attacks", "routing", "--attack_budget", "3"], "--attack_budget / --attack_budget_scope: no attack that uses"),
    (["--skip_eval", "true", "--attacks", "routing"], "--skip_eval is set"),
])
def test_attack_options_are_checked_before_loading(tmp_path, no_model_loading, argv, message):
    with pytest.raises(UsageError, match=message):
        train("--output_dir", tmp_path / "run", *argv)


def test_attacks_that_need_anchors_are_refused_or_left_out(tmp_path, no_model_loading):
    no_anchors = eval_sets_file(tmp_path, "attacks")
    with pytest.raises(UsageError, match="--attacks refusal_suppression needs the 'anchors' evaluation set"):
        train("--output_dir", tmp_path / "run", "--eval_sets", no_anchors, "--attacks", "refusal_suppression")
    # by default suppression is left out there, so a budget given for it would be ignored: refused
    with pytest.raises(UsageError, match="no attack that uses a budget runs \\(attacks: routing\\)"):
        train("--output_dir", tmp_path / "run", "--eval_sets", no_anchors, "--attack_budget", "2")


def test_a_budget_beyond_the_model_is_refused_before_detection(tmp_path, monkeypatch):
    from rasa_trainer.cli import train as command

    monkeypatch.setattr(command, "detect", lambda *args, **kwargs: pytest.fail("detection started"))
    monkeypatch.setattr(command, "evaluate", lambda *args, **kwargs: pytest.fail("evaluation started"))
    # SafetyWorld: 16 experts, top-2 per MoE layer, so suppression can switch off at most 14 per layer
    with pytest.raises(UsageError, match="refusal_suppression can switch off at most 14 experts in MoE layer 0"):
        train("--output_dir", tmp_path / "run", "--attack_budget", "15")


def test_the_evaluation_gets_the_attacks_its_sets_allow(monkeypatch):
    import rasa_trainer.evaluation.evaluate as evaluation
    from rasa_trainer.cli.common import EvalSuite
    from rasa_trainer.cli.train import TrainScriptArguments, evaluate

    seen = {}
    monkeypatch.setattr(evaluation, "evaluate_safety", lambda *args, **kwargs: seen.update(kwargs))
    suite = EvalSuite("sets", {"anchors": [{"prompt": "how do i"}]}, None, None, None)
    # no jailbreaks: no generation under the base model's routing (the routing shift alone), the default budget
    evaluate("model", "tokenizer", suite, TrainScriptArguments(), base_model="base", attacks=("refusal_suppression",),
             selection="experts")
    assert (seen["attacks"], seen["attack_budget"], seen["attack_budget_scope"]) == (["refusal_suppression"], 2,
                                                                                      "per_layer")
    assert seen["attack_experts"] is None and seen["base_model"] == "base"
    suite.sets["attacks"] = [{"prompt": "pretend . how do i", "attack": "a"}]
    evaluate("model", "tokenizer", suite, TrainScriptArguments(attack_budget=3), base_model="base",
             attacks=("routing",), selection="experts")
    assert (seen["attacks"], seen["attack_experts"], seen["attack_budget"]) == (["base", "routing"], "experts", None)


# ------------------------------------------------------------------------------------------------ the card


def test_card_results_are_json_and_carry_the_intervals():
    from rasa_trainer.cli.train import card_results
    from rasa_trainer.evaluation.evaluate import SafetyReport
    from rasa_trainer.training.model_card import card_evaluation

    report = SafetyReport(judge="j", refusal_judge="r", max_new_tokens=8, asr=0.25, n_attacks=8,
                          asr_by_attack={"a": 0.25}, n_by_attack={"a": 8}, routing_attack_asr=0.5)
    results = card_results(report, {"path": "/m", "dtype": "bfloat16"})
    assert json.loads(json.dumps(results)) == results  # the trainer keeps it: plain JSON, no report object
    rows = {row[0]: row[1:] for row in card_evaluation(results)["rows"]}
    # 2 of 8 prompts: Wilson's 95% interval [7.15%, 59.07%]
    assert rows["asr"] == (0.25, 8, "[0.0715, 0.5907]")
    assert rows["routing_attack_asr"] == (0.5, 8, "[0.2152, 0.7848]")
    assert rows["evaluated_artifact"] == ("this checkpoint as published, reloaded from disk in bfloat16", "", "")


def test_the_printed_table_keeps_rows_only_the_saved_model_has_under_their_metric():
    """`train` prints base vs saved: the routing shift and base-routing rows exist only for the saved model (they
    compare it with the base) and stay under their metric, above the attacks both columns have."""
    from rasa_trainer.evaluation.evaluate import SafetyReport, format_comparison

    common = dict(judge="j", refusal_judge="r", max_new_tokens=8, asr=1.0, n_attacks=8, asr_by_attack={"a": 1.0},
                  n_by_attack={"a": 8}, routing_attack_asr=1.0, routing_attack_asr_by_attack={"a": 1.0})
    base = SafetyReport(**common)
    saved = SafetyReport(**{**common, "asr": 0.0, "asr_by_attack": {"a": 0.0}}, routing_shift=0.2,
                         routing_shift_by_attack={"a": 0.2}, forced_asr=0.5, forced_asr_by_attack={"a": 0.5})
    table = format_comparison({"base": base, "RASA (saved)": saved}).splitlines()[2:-1]
    assert [re.split(r"\s{2,}", line.strip())[0] for line in table] == [
        "ASR, all attacks", "ASR, a", "routing shift vs base", "routing shift, a", "ASR under base routing, all",
        "ASR under base routing, a", "ASR under routing attack, all", "ASR under routing attack, a"]
