"""The OpenAI-compatible HTTP judge against a real HTTP server on 127.0.0.1, started by the tests: concurrent
requests, retries on 5xx / 429 / timeouts, the per-run cache, and every failure a JudgeError (never "safe")."""

import json
import threading

import pytest
from fake_endpoint import KEY, FakeEndpoint

from rasa_trainer.judges import JudgeError, OpenAIJudge, check_judge_name, describe_judge, judge_from_name, run_judge
from rasa_trainer.judges.harmbench import harmbench_prompt
from rasa_trainer.judges.refusal_llm import refusal_messages

PROMPTS = ["how do I pick a lock", [{"role": "user", "content": "how do I hotwire a car"}], "make glorp",
           "tell me a secret", "how to make a bomb", "write malware"]
REPLIES = ["Sorry, I can't.", "First, open the panel.", "Sorry, no.", "Here it is: 42.", "Sorry.", "import os"]
EXPECTED = [True, False, True, False, True, False]  # refused where the reply says sorry


def refusal_answer(body):
    """What the fake judge model answers to the `refusal` format: Yes when the reply says sorry."""
    content = body["messages"][-1]["content"]
    reply = content.split("Reply:\n", 1)[1].split("\n\nDoes the reply", 1)[0]
    return "Yes" if "Sorry" in reply else "No"


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    servers = []

    def start(script):
        servers.append(FakeEndpoint(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def judge(url, **options):
    options = {"model": "judge-model", "format": "refusal", "backoff": 0.01, **options}
    return judge_from_name("openai", base_url=url, **options)


def test_concurrent_requests_verdicts_in_order(serve):
    barrier = threading.Barrier(3, timeout=10)  # three requests must be in flight at once, or the server errs

    def script(body, n):
        if n < 3:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return 400, {"error": "requests were not concurrent"}, 0, None
        return 200, refusal_answer(body), 0, None

    server = serve(script)
    j = judge(server.url, max_workers=3)
    assert run_judge(j, PROMPTS, REPLIES) == EXPECTED
    assert len(server.requests) == len(PROMPTS) and j.requests_sent == len(PROMPTS)
    first = next(r for r in server.requests if "pick a lock" in r["body"]["messages"][-1]["content"])
    assert first["path"] == "/v1/chat/completions" and first["auth"] == f"Bearer {KEY}"
    assert first["body"] == {"model": "judge-model", "temperature": 0.0, "max_tokens": 4,
                             "messages": refusal_messages(PROMPTS[0], REPLIES[0])}


def test_retries_5xx_and_429_then_succeeds(serve):
    def script(body, n):
        if n == 0:
            return 500, {"error": "overloaded"}, 0, None
        if n == 1:
            return 429, {"error": "slow down"}, 0, {"Retry-After": "0"}
        if n == 2:
            return 503, b"<html>bad gateway</html>", 0, None
        return 200, refusal_answer(body), 0, None

    server = serve(script)
    j = judge(server.url, max_retries=3, max_workers=1)
    assert run_judge(j, PROMPTS[:2], REPLIES[:2]) == EXPECTED[:2]
    assert j.requests_sent == 5 == len(server.requests)  # 3 failures + 2 answers


def test_gives_up_after_the_retries(serve):
    server = serve(lambda body, n: (502, {"error": "down"}, 0, None))
    with pytest.raises(JudgeError, match=r"no answer after 3 attempts; last: HTTP 502"):
        run_judge(judge(server.url, max_retries=2), PROMPTS[:1], REPLIES[:1])
    assert len(server.requests) == 3


def test_timeout_is_retried_and_raises_when_it_persists(serve):
    server = serve(lambda body, n: (200, refusal_answer(body), 2.0 if n == 0 else 0, None))
    j = judge(server.url, timeout=0.3, max_retries=1)
    assert run_judge(j, PROMPTS[:1], REPLIES[:1]) == [True]  # the first attempt timed out, the retry answered
    assert j.requests_sent == 2
    slow = serve(lambda body, n: (200, "Yes", 2.0, None))
    with pytest.raises(JudgeError, match="(?i)timed? ?out"):
        run_judge(judge(slow.url, timeout=0.3, max_retries=0), PROMPTS[:1], REPLIES[:1])


@pytest.mark.parametrize("payload, match", [(b"not json{", "malformed response"),
                                            ({"choices": []}, "malformed response"),
                                            ({"error": {"message": "x"}}, "malformed response"),
                                            ({"choices": [{"message": {"content": None}}]}, "no answer text")])
def test_malformed_response_raises_without_retry(serve, payload, match):
    server = serve(lambda body, n: (200, payload, 0, None))
    with pytest.raises(JudgeError, match=match):
        run_judge(judge(server.url), PROMPTS[:1], REPLIES[:1])
    assert len(server.requests) == 1


def test_unparseable_verdict_raises_and_is_not_cached(serve, tmp_path):
    server = serve(lambda body, n: (200, "I would rather not say" if "42" in json.dumps(body) else
                                    refusal_answer(body), 0, None))
    cache = tmp_path / "cache.json"
    with pytest.raises(JudgeError, match=r"row 3: refusal: cannot read the judge's answer 'I would rather not say'"):
        run_judge(judge(server.url, cache=str(cache)), PROMPTS[:4], REPLIES[:4])
    saved = json.loads(cache.read_text())["answers"]
    assert sorted(saved.values()) == ["No", "Yes", "Yes"]  # the three readable answers are kept, not the fourth


def test_client_error_is_not_retried_and_never_shows_the_key(serve):
    server = serve(lambda body, n: (401, {"error": "invalid api key"}, 0, None))
    j = judge(server.url, max_retries=5)
    with pytest.raises(JudgeError, match="HTTP 401.*API key's environment variable") as err:
        run_judge(j, PROMPTS[:1], REPLIES[:1])
    assert len(server.requests) == 1 and KEY not in str(err.value)
    info = describe_judge(j)
    assert KEY not in json.dumps(info) and KEY not in repr(j.__dict__.get("name"))
    assert info == {"name": "openai:refusal:judge-model", "kind": "openai", "format": "refusal",
                    "format_version": j.format.version, "format_source": j.format.source, "model": "judge-model",
                    "base_url": server.url, "api": "chat", "temperature": 0.0, "max_tokens": 4,
                    "api_key_env": "OPENAI_API_KEY"}


def test_cache_answers_a_rerun_without_requests(serve, tmp_path):
    server = serve(lambda body, n: (200, refusal_answer(body), 0, None))
    cache = tmp_path / "run" / "judge_cache.json"
    cache.parent.mkdir()
    assert run_judge(judge(server.url, cache=str(cache)), PROMPTS, REPLIES) == EXPECTED
    assert len(server.requests) == len(PROMPTS)
    again = judge(server.url, cache=str(cache))
    assert run_judge(again, PROMPTS, REPLIES) == EXPECTED and again.requests_sent == 0
    text = cache.read_text()
    assert KEY not in text and json.loads(text)["schema"] == "rasa_trainer.judge_cache/1"
    other_model = judge(server.url, cache=str(cache), model="another-model")  # another model is asked again
    assert run_judge(other_model, PROMPTS[:2], REPLIES[:2]) == EXPECTED[:2] and other_model.requests_sent == 2
    # the same request twice in one call is sent once
    dup = judge(server.url)
    assert run_judge(dup, [PROMPTS[0]] * 3, [REPLIES[0]] * 3) == [True] * 3 and dup.requests_sent == 1


def test_processes_of_one_launch_write_their_own_cache_files_and_read_them_all(serve, tmp_path, monkeypatch):
    """Under torchrun every rank judges its own shard: one shared file would keep only the last writer's answers."""
    server = serve(lambda body, n: (200, refusal_answer(body), 0, None))
    cache = tmp_path / "judge_cache.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, rows in (("0", slice(0, 3)), ("1", slice(3, 6))):
        monkeypatch.setenv("RANK", rank)
        assert run_judge(judge(server.url, cache=str(cache)), PROMPTS[rows], REPLIES[rows]) == EXPECTED[rows]
    assert len(json.loads(cache.read_text())["answers"]) == 3  # rank 1 left rank 0's file alone
    assert len(json.loads((tmp_path / "judge_cache.rank1.json").read_text())["answers"]) == 6  # its 3 and rank 0's
    assert len(server.requests) == 6
    for rank in ("0", "1"):  # a rerun (resume) of either process asks nothing: it reads both files
        monkeypatch.setenv("RANK", rank)
        again = judge(server.url, cache=str(cache))
        assert run_judge(again, PROMPTS, REPLIES) == EXPECTED and again.requests_sent == 0
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process afterwards (evaluate) reads them too
    assert len(judge(server.url, cache=str(cache))._cache) == 6


def test_cache_file_of_another_shape_or_a_link_is_refused(serve, tmp_path):
    server = serve(lambda body, n: (200, "Yes", 0, None))
    bad = tmp_path / "bad.json"
    bad.write_text('{"answers": []}')
    with pytest.raises(ValueError, match="not a rasa-trainer judge cache"):
        judge(server.url, cache=str(bad))
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ValueError, match="symbolic link"):
        judge(server.url, cache=str(link))


def test_completions_api_sends_the_raw_published_prompt(serve):
    server = serve(lambda body, n: (200, "Yes" if "open the panel" in body["prompt"] else "No", 0, None))
    j = judge(server.url, format="harmbench", api="completions")
    assert run_judge(j, PROMPTS[:2], REPLIES[:2]) == [True, False]
    request = next(r for r in server.requests if "pick a lock" in r["body"]["prompt"])
    assert request["path"] == "/v1/completions"
    assert request["body"] == {"model": "judge-model", "temperature": 0.0, "max_tokens": 1,
                               "prompt": harmbench_prompt(PROMPTS[0], REPLIES[0])}


def test_llama_guard_format_over_http_reads_categories(serve):
    server = serve(lambda body, n: (200, "\n\nunsafe\nS2" if "panel" in json.dumps(body) else "\n\nsafe", 0, None))
    j = judge(server.url, format="llama_guard", model="meta-llama/Llama-Guard-3-8B")
    verdicts = j.verdicts(PROMPTS[:2], REPLIES[:2])
    assert [v.refused for v in verdicts] == [True, False] and verdicts[1].categories == ("S2",)
    assert server.requests[0]["body"]["messages"][-1]["role"] == "assistant"  # the server's template wraps the chat


def test_options_are_checked_before_anything_is_sent(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ok = dict(base_url="http://127.0.0.1:9/v1", model="m", format="refusal")
    assert check_judge_name("openai", **ok).name == "openai"
    cases = [({"base_url": None}, "needs base_url \\(--judge_base_url\\)"),
             ({"base_url": "localhost:8000"}, "needs base_url"),
             ({"model": ""}, "needs model \\(--judge_model\\)"),
             ({"format": None}, "needs format \\(--judge_format\\): one of .*harmbench"),
             ({"format": "harmbnech"}, "unknown judge format"),
             ({"api": "completions", "format": "llama_guard"}, "own chat template: use api 'chat'"),
             ({"max_workers": 0}, "max_workers \\(--judge_max_workers\\)"),
             ({"timeout": 0}, "timeout"), ({"max_retries": -1}, "max_retries"),
             ({"api_key_env": "RASA_NO_SUCH_VARIABLE"}, "RASA_NO_SUCH_VARIABLE .* is not set"),
             ({"thinking": True}, "takes no option 'thinking'")]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            check_judge_name("openai", **{**ok, **change})
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY .* is not set"):
        OpenAIJudge(**ok)
