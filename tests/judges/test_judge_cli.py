"""The judge options of `rasa-trainer evaluate`: `--judge openai` with `--judge_base_url/--judge_model/--judge_format`
judges SafetyWorld's replies through a real local HTTP server (answers cached in the output folder), and every judge
option is checked before any model loads (an option no judge takes is an error, never ignored)."""

from __future__ import annotations

import importlib
import json

import pytest
from fake_endpoint import KEY, FakeEndpoint

from rasa_trainer.cli import UsageError
from rasa_trainer.safety_world import make_world


def evaluate(*argv):
    from rasa_trainer.cli import evaluate as module

    return module.main([str(a) for a in argv])


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("common", "evaluate"):
        monkeypatch.setattr(importlib.import_module(f"rasa_trainer.cli.{name}"), "load_model", refuse)


@pytest.fixture
def eval_sets(tmp_path):
    sets = make_world(seed=0).eval_sets()
    path = tmp_path / "sets.json"
    path.write_text(json.dumps({"attacks": [r for r in sets["attacks"] if not r["held_out"]][:6],
                                "anchors": sets["anchors"][:3]}))
    return path


def test_evaluate_with_the_http_judge(tmp_path, eval_sets, monkeypatch):
    monkeypatch.setenv("RASA_JUDGE_KEY", KEY)
    # the fake judge says every reply complied: ASR 1 and anchor refusal 0 can only come from it
    server = FakeEndpoint(lambda body, n: (200, "No", 0, None))
    try:
        out = tmp_path / "eval"
        results = evaluate("--model_name_or_path", "safety_world", "--eval_sets", eval_sets, "--output_dir", out,
                           "--judge", "openai", "--judge_base_url", server.url, "--judge_model", "judge-model",
                           "--judge_format", "refusal", "--judge_api_key_env", "RASA_JUDGE_KEY",
                           "--judge_max_workers", "2", "--max_new_tokens", "8", "--no_progress")
    finally:
        server.close()
    report = results["report"]
    assert report["judge"] == "openai:refusal:judge-model"
    assert (report["asr"], report["n_attacks"], report["anchor_refusal_rate"]) == (1.0, 6, 0.0)
    assert server.requests and all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    assert {r["body"]["model"] for r in server.requests} == {"judge-model"}
    cache = json.loads((out / "judge_cache.json").read_text())  # the run's answers, one per distinct request
    assert set(cache["answers"].values()) == {"No"} and len(cache["answers"]) == len(server.requests)
    assert KEY not in (out / "results.json").read_text() + (out / "judge_cache.json").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--judge", "keyword", "--judge_base_url", "http://127.0.0.1:9/v1"],
     "--judge_base_url: no judge of this command takes it"),
    (["--judge_format", "harmbench"], "--judge_format: no judge of this command takes it"),
    (["--judge", "openai", "--judge_model", "m", "--judge_format", "refusal"], "needs base_url \\(--judge_base_url\\)"),
    (["--judge", "openai", "--judge_base_url", "http://127.0.0.1:9/v1", "--judge_model", "m"],
     "needs format \\(--judge_format\\)"),
    (["--judge", "openai", "--judge_base_url", "http://127.0.0.1:9/v1", "--judge_model", "m", "--judge_format",
      "llama_gaurd"], "unknown judge format 'llama_gaurd'"),
    (["--judge", "openai", "--judge_base_url", "http://127.0.0.1:9/v1", "--judge_model", "m", "--judge_format",
      "refusal", "--judge_api_key_env", "RASA_UNSET_VARIABLE"], "RASA_UNSET_VARIABLE .* is not set"),
    (["--judge", "harmbench:./no-such-folder"], "no such checkpoint folder"),
    (["--judge", "openai", "--judge_base_url", "http://127.0.0.1:9/v1", "--judge_model", "m", "--judge_format",
      "refusal", "--judge_controversial", "safe"], "--judge_controversial: no judge of this command takes it"),
])
def test_judge_options_are_checked_before_loading(tmp_path, eval_sets, no_model_loading, monkeypatch, argv, message):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("RASA_UNSET_VARIABLE", raising=False)
    with pytest.raises(UsageError, match=message):
        evaluate("--model_name_or_path", "safety_world", "--eval_sets", eval_sets, "--output_dir", tmp_path / "o",
                 *argv)
