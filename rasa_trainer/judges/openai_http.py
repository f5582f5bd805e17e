"""The OpenAI-compatible HTTP judge: any judge format (`harmbench`, `llama_guard`, `wildguard`, `qwen3guard`,
`strongreject`, `refusal`, ...) asked of a model behind a chat-completions endpoint (a vLLM or SGLang server, LiteLLM,
any provider). Registered as the named judge `openai`:

    rasa-trainer evaluate ... --judge openai --judge_base_url http://localhost:8000/v1 \\
        --judge_model meta-llama/Llama-Guard-3-8B --judge_format llama_guard

Requests run concurrently (a thread pool), are retried with exponential backoff on 429, 5xx, timeouts and dropped
connections, and their answers are cached per run (a JSON file keyed by a hash of format, model and request, written
atomically). A request that still fails, a malformed response or an answer the format cannot read raises
[`JudgeError`]; nothing is ever counted as safe by default. The API key is read from an environment variable
(`OPENAI_API_KEY` unless told otherwise) and is never logged, written or described. Standard library only (urllib).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from .base import JudgeError, Prompt
from .formats import JudgeFormat, Verdict, judge_format
from .registry import register_judge

__all__ = ["OpenAIJudge"]

_CACHE_SCHEMA = "rasa_trainer.judge_cache/1"
_MAX_BACKOFF_S = 60.0
_RETRYABLE_ERRORS = (TimeoutError, socket.timeout, ConnectionError, http.client.RemoteDisconnected,
                     http.client.IncompleteRead, urllib.error.URLError)


def check_openai(checkpoint: Any = None, base_url: str | None = None, model: str | None = None,
                 format: str | None = None, api_key_env: str = "OPENAI_API_KEY", api: str = "chat",
                 max_workers: int = 8, timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0,
                 cache: str | None = None, temperature: float = 0.0, max_tokens: int | None = None) -> JudgeFormat:
    """Every option checked before anything is sent (ValueError naming the option and its command-line flag);
    returns the format."""
    parsed = urllib.parse.urlparse(base_url) if isinstance(base_url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"the openai judge needs base_url (--judge_base_url), the endpoint's URL such as "
                         f"http://localhost:8000/v1; got {base_url!r}")
    if not isinstance(model, str) or not model.strip():
        raise ValueError("the openai judge needs model (--judge_model), the model name the endpoint serves")
    if format is None:
        raise ValueError("the openai judge needs format (--judge_format): one of "
                         + ", ".join(sorted(_formats())))
    fmt = judge_format(format)
    if api not in ("chat", "completions"):
        raise ValueError(f"api (--judge_api) must be 'chat' or 'completions', got {api!r}")
    if api == "completions" and fmt.text is None:
        raise ValueError(f"the {fmt.name} format is the judge model's own chat template: use api 'chat' (the server "
                         "applies the template), not 'completions'")
    if not isinstance(api_key_env, str) or not api_key_env:
        raise ValueError("api_key_env (--judge_api_key_env) must name an environment variable")
    if api_key_env not in os.environ:
        raise ValueError(f"the environment variable {api_key_env} holding the judge endpoint's API key is not set; "
                         f"export it (any value, e.g. EMPTY, for a local server without a key) or name another "
                         f"variable with --judge_api_key_env")
    for key, value, low in (("max_workers", max_workers, 1), ("max_retries", max_retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} (--judge_{key}) must be an integer >= {low}, got {value!r}")
    for key, value, positive in (("timeout", timeout, True), ("backoff", backoff, False),
                                 ("temperature", temperature, False)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (value > 0 if positive else value >= 0):
            raise ValueError(f"{key} (--judge_{key}) must be a number {'>' if positive else '>='} 0, got {value!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens (--judge_max_tokens) must be a positive integer, got {max_tokens!r}")
    if cache is not None:
        _read_cache(cache)  # an unreadable or foreign cache file fails now, not after the first requests
    return fmt


def _formats() -> list[str]:
    from .formats import JUDGE_FORMATS

    return list(JUDGE_FORMATS)


@register_judge("openai", check=check_openai,
                about="a model behind an OpenAI-compatible endpoint asked in a judge format (--judge_base_url, "
                      "--judge_model, --judge_format)")
class OpenAIJudge:
    """A judge format asked of a model behind an OpenAI-compatible endpoint.

    Args:
        base_url: the API root, e.g. `http://localhost:8000/v1` (requests go to `{base_url}/chat/completions`).
        model: the model name the endpoint serves.
        format: a registered judge format (`rasa_trainer.judges.formats.JUDGE_FORMATS`).
        api_key_env: the environment variable holding the API key (sent as a Bearer token).
        api: `"chat"` (messages; the server applies the judge's chat template) or `"completions"` (the format's raw
            prompt, for a classifier served as a plain completion model, e.g. HarmBench's or WildGuard's).
        max_workers: concurrent requests.
        timeout: seconds per request.
        max_retries: retries of a request after a 429, a 5xx, a timeout or a dropped connection.
        backoff: the first retry's wait in seconds, doubled at each retry (a `Retry-After` header is honoured; at
            most 60 s).
        cache: a JSON file of the answers of this run (read when it exists, written atomically after each call);
            None keeps them in memory only. Under a launcher with several processes (``WORLD_SIZE`` > 1) process
            ``r`` > 0 writes ``<cache stem>.rank<r><suffix>`` beside it, so no process overwrites another's answers,
            and every process reads them all.
        temperature: sampling temperature (0: the judge's most likely answer).
        max_tokens: the answer budget; default the format's.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, format: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", api: str = "chat", max_workers: int = 8,
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0, cache: str | None = None,
                 temperature: float = 0.0, max_tokens: int | None = None):
        self.format = check_openai(None, base_url, model, format, api_key_env, api, max_workers, timeout,
                                   max_retries, backoff, cache, temperature, max_tokens)
        self.base_url, self.model, self.api = str(base_url).rstrip("/"), model, api
        self.api_key_env = api_key_env
        self._api_key = os.environ[api_key_env]  # private; never in a message, a log, describe() or a file
        self.max_workers, self.timeout, self.max_retries, self.backoff = max_workers, timeout, max_retries, backoff
        self.temperature = temperature
        self.max_tokens = max_tokens or self.format.max_new_tokens
        self.cache_path = None if cache is None else _process_cache_path(os.fspath(cache))
        self._cache: dict[str, str] = {} if cache is None else _read_caches(os.fspath(cache))
        self.name = f"openai:{self.format.name}:{model}"
        self.requests_sent = 0  # HTTP requests made (retries included), for reports and tests

    # ------------------------------------------------------------------------------------------------ identity

    def describe(self) -> dict[str, Any]:
        """The judge's identity for results and model cards (the endpoint without credentials; never the key)."""
        url = urllib.parse.urlparse(self.base_url)
        host = url.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{url.port}" if url.port else ""
        return {"name": self.name, "kind": "openai", **self.format.describe(), "model": self.model,
                "base_url": urllib.parse.urlunparse(url._replace(netloc=netloc)), "api": self.api,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "api_key_env": self.api_key_env}

    # ------------------------------------------------------------------------------------------------ judging

    def __call__(self, prompts: list[Prompt], replies: list[str]) -> list[bool]:
        return [v.refused for v in self.verdicts(prompts, replies)]

    def verdicts(self, prompts: list[Prompt], replies: list[str]) -> list[Verdict]:
        """The parsed verdict of every reply (categories and scores included), asking only what the cache lacks."""
        if len(prompts) != len(replies):
            raise JudgeError(f"{self.name}: got {len(prompts)} prompts but {len(replies)} replies")
        bodies = [self._body(p, r) for p, r in zip(prompts, replies)]
        keys = [self._key(body) for body in bodies]
        todo: dict[str, int] = {}  # key -> first row asking it (a repeated request is sent once)
        for row, key in enumerate(keys):
            if key not in self._cache:
                todo.setdefault(key, row)
        try:
            self._ask_all({key: bodies[row] for key, row in todo.items()}, keys)
        finally:
            if todo and self.cache_path is not None:
                from ..utils import atomic_write_json

                atomic_write_json({"schema": _CACHE_SCHEMA, "answers": self._cache}, self.cache_path)
        return [self._parse(self._cache[key], row) for row, key in enumerate(keys)]

    def _ask_all(self, bodies: dict[str, dict[str, Any]], keys: list[str]) -> None:
        """Send `bodies` (key -> request) concurrently; cache every readable answer; then raise the first failure
        (a request that failed, or an answer the format cannot read), by row."""
        if not bodies:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(bodies)), thread_name_prefix="judge")
        errors: dict[int, str] = {}
        try:
            futures = {pool.submit(self._ask, body): key for key, body in bodies.items()}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                pool.shutdown(wait=True, cancel_futures=True)  # stop sending; keep what already came back
            for future, key in futures.items():
                row = keys.index(key)
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    errors[row] = f"{self.name}: row {row}: {future.exception()}"
                    continue
                try:
                    self._parse(future.result(), row)
                except JudgeError as err:  # an unreadable answer is not cached: a rerun asks again
                    errors[row] = str(err)
                    continue
                self._cache[key] = future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if errors:
            first = min(errors)
            more = f" ({len(errors) - 1} more failed)" if len(errors) > 1 else ""
            raise JudgeError(errors[first] + more)

    def _parse(self, answer: str, row: int) -> Verdict:
        try:
            return self.format.parse(answer)
        except JudgeError as err:
            raise JudgeError(f"{self.name}: row {row}: {err}") from None

    def _body(self, prompt: Prompt, reply: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.api == "chat":
            body["messages"] = self.format.messages(prompt, reply)
        else:
            body["prompt"] = self.format.text(prompt, reply)
        return body

    def _key(self, body: dict[str, Any]) -> str:
        identity = {"format": self.format.version, "api": self.api, **body}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------------------------------ HTTP

    def _ask(self, body: dict[str, Any]) -> str:
        """One request, retried on 429 / 5xx / timeouts / dropped connections; returns the answer's text."""
        url = f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"
        data = json.dumps(body).encode("utf-8")
        last, last_retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._wait(attempt, last_retry_after))
            last_retry_after = None
            request = urllib.request.Request(url, data=data, method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self._api_key}"})
            self.requests_sent += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                excerpt = _excerpt(err)
                if err.code == 429 or err.code >= 500:
                    last, last_retry_after = f"HTTP {err.code}: {excerpt}", err.headers.get("Retry-After")
                    continue
                hint = " (check the API key's environment variable)" if err.code in (401, 403) else ""
                raise JudgeError(f"HTTP {err.code} from {url}{hint}: {excerpt}") from None
            except _RETRYABLE_ERRORS as err:
                reason = getattr(err, "reason", err)
                last = f"{type(reason).__name__}: {reason}"
                continue
            return _answer(raw, self.api, url)
        raise JudgeError(f"{url}: no answer after {self.max_retries + 1} attempts; last: {last}")

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        wait_s = self.backoff * 2 ** (attempt - 1)
        try:
            wait_s = max(wait_s, float(retry_after)) if retry_after is not None else wait_s
        except ValueError:
            pass  # an HTTP-date Retry-After: keep the exponential wait
        return min(wait_s, _MAX_BACKOFF_S)


def _excerpt(err: urllib.error.HTTPError) -> str:
    try:
        return err.read()[:300].decode("utf-8", "replace").strip() or err.reason
    except Exception:  # the body of an error response is only for the message
        return str(err.reason)


def _answer(raw: bytes, api: str, url: str) -> str:
    """The answer text of a completion response; a malformed response is a [`JudgeError`]."""
    try:
        data = json.loads(raw.decode("utf-8"))
        choice = data["choices"][0]
        text = choice["message"]["content"] if api == "chat" else choice["text"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise JudgeError(f"malformed response from {url} ({type(err).__name__}: {err}): {raw[:200]!r}") from None
    if not isinstance(text, str):
        raise JudgeError(f"the response from {url} holds no answer text (content is {text!r})")
    return text


def _process_cache_path(path: str) -> str:
    """Where this process writes its answers: ``path`` for process 0, ``<stem>.rank<r><suffix>`` for process r > 0
    (each process writes its own file, atomically: the processes of one launch never overwrite each other's)."""
    from ..run_lock import launch_rank

    rank = launch_rank()
    if rank == 0:
        return path
    root, suffix = os.path.splitext(path)
    return f"{root}.rank{rank}{suffix}"


def _read_caches(path: str) -> dict[str, str]:
    """The answers of ``path`` and of every process's file beside it (see :func:`_process_cache_path`)."""
    import glob

    answers = _read_cache(path)
    root, suffix = os.path.splitext(path)
    for other in sorted(glob.glob(f"{glob.escape(root)}.rank*{glob.escape(suffix)}")):
        if other[len(root) + len(".rank"):len(other) - len(suffix)].isdigit():
            answers.update(_read_cache(other))
    return answers


def _read_cache(path: str | os.PathLike) -> dict[str, str]:
    """The answers of a cache file, {} when it does not exist; a file of another shape is a ValueError."""
    path = os.fspath(path)
    if os.path.islink(path):
        raise ValueError(f"judge cache {path} is a symbolic link; give the path of a regular file")
    if not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ValueError(f"judge cache {path}: {parent} is not a folder")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"judge cache {path} cannot be read as JSON ({err}); delete it or give another path") from None
    answers = data.get("answers") if isinstance(data, dict) and data.get("schema") == _CACHE_SCHEMA else None
    if not isinstance(answers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in answers.items()):
        raise ValueError(f"judge cache {path} is not a rasa-trainer judge cache ({_CACHE_SCHEMA}); delete it or give "
                         "another path")
    return dict(answers)
