"""Resumable detection: an interrupted run (Ctrl-C in the process, or SIGKILL in a `rasa-trainer detect` subprocess at
a write point of tests/fault_injection.py) resumed with the same call ends with the statistics of an uninterrupted
run, bit for bit, and the same selection, without generating the shards it had finished; a folder holding another
run's progress, or held by another run, is refused before any generation, naming what differs."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_model
from test_detection import MAX_NEW, MarkerJudge, pair_rows
from rasa_trainer.detection import detect as detection
from rasa_trainer.detection.progress import (
    FINGERPRINT_FILE,
    PROGRESS_DIR,
    DetectionProgressError,
    detection_fingerprint,
    progress_differences,
)
from rasa_trainer.run_lock import LOCK_FILE, OutputFolderError

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "jobs" / "detection_job.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# 14 pairs of every outcome; batches of 2, shards of 4 pairs: shards of 4, 4, 4 and 2 pairs
OUTCOMES = [(True, False), (False, False), (True, True), (True, False), (False, True), (True, False),
            (True, False), (True, True), (True, False), (False, False), (True, False), (True, False),
            (False, True), (True, False)]
SETTINGS = {"batch_size": 2, "shard_size": 4, "max_new_tokens": MAX_NEW}


@pytest.fixture(scope="module")
def model():
    return tiny_model("olmoe")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return pair_rows(OUTCOMES, seed=7)


def detect(model, tokenizer, rows, **kwargs):
    kwargs = {"judge": MarkerJudge(), "progress": False, "policy": "batch_union", "num_experts": 2, **SETTINGS,
              **kwargs}
    return detection.detect_safety_critical_experts(model, tokenizer, rows, **kwargs)


@pytest.fixture(scope="module")
def reference(model, tokenizer, rows):
    """The uninterrupted run (batch_union: per-batch votes are part of the statistics compared)."""
    return detect(model, tokenizer, rows)


def assert_same_statistics(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    different = [k for k in expected
                 if not (actual[k].dtype == expected[k].dtype and torch.equal(actual[k], expected[k]))]
    assert not different, f"statistics differ in {different}"


class GenerateCounter:
    """Counts ``model.generate`` calls and the conversations they generated for (both sides of a pair count)."""

    def __init__(self, model, monkeypatch):
        self.calls = self.rows = 0
        generate = model.generate

        def counted(*args, **kwargs):
            self.calls += 1
            self.rows += int(kwargs["input_ids"].shape[0])
            return generate(*args, **kwargs)

        monkeypatch.setattr(model, "generate", counted, raising=False)


def interrupt_after(monkeypatch, batches: int):
    """Ctrl-C once ``batches`` generation batches have been judged (detection judges once per batch)."""
    judged = 0
    run_judge = detection.run_judge

    def judge_then_interrupt(*args, **kwargs):
        nonlocal judged
        verdicts = run_judge(*args, **kwargs)
        judged += 1
        if judged == batches:
            raise KeyboardInterrupt
        return verdicts

    monkeypatch.setattr(detection, "run_judge", judge_then_interrupt)


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / PROGRESS_DIR).glob("shard-*.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# in one process: interrupted, resumed


def test_interrupted_detection_resumes_bit_identical_without_regenerating_finished_shards(
        model, tokenizer, rows, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 5)  # shards 0 and 1 (2 batches each) written, shard 2 interrupted after one batch
        with pytest.raises(KeyboardInterrupt):
            detect(model, tokenizer, rows, output_dir=out)
    assert shard_files(out) == ["shard-rank000-000000.safetensors", "shard-rank000-000001.safetensors"]
    assert not (out / LOCK_FILE).exists()  # the lock is given back however the run ends
    assert not (out / "safety_critical_experts.json").exists()

    counter = GenerateCounter(model, monkeypatch)
    capsys.readouterr()
    resumed = detect(model, tokenizer, rows, output_dir=out, progress=True)
    assert (counter.calls, counter.rows) == (2 * 3, 2 * 6)  # shards 2 and 3 only: 3 batches of both sides, 6 pairs
    assert_same_statistics(resumed.statistics.state_tensors(), reference.statistics.state_tensors())
    assert resumed == reference and resumed.pairs == reference.pairs
    assert resumed.statistics.num_batches == reference.statistics.num_batches > 0
    assert not (out / PROGRESS_DIR).exists() and not (out / LOCK_FILE).exists()
    assert json.loads((out / "safety_critical_experts.json").read_text())["experts"] == reference.to_dict()["experts"]
    bar = capsys.readouterr().err
    assert "8/14" in bar and re.search(r"14/14 \[[^\]]*pair/s", bar)  # starts at the resumed pairs; rate and ETA


def test_unreadable_shard_is_generated_again_with_a_warning(model, tokenizer, rows, reference, tmp_path,
                                                            monkeypatch, caplog):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 7)  # shards 0 to 2 written, shard 3 (one batch) interrupted
        with pytest.raises(KeyboardInterrupt):
            detect(model, tokenizer, rows, output_dir=out)
    damaged = out / PROGRESS_DIR / "shard-rank000-000001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:40])  # as a disk that lost the file's end would leave it
    counter = GenerateCounter(model, monkeypatch)
    resumed = detect(model, tokenizer, rows, output_dir=out)
    assert f"detection shard {damaged} cannot be read" in caplog.text
    assert counter.rows == 2 * 4 + 2 * 2  # shard 1 again (4 pairs), then shard 3 (2 pairs), both sides
    assert_same_statistics(resumed.statistics.state_tensors(), reference.statistics.state_tensors())


# ----------------------------------------------------------------------------------------------------------------
# refusals, before any generation


def test_another_runs_partial_detection_is_refused_naming_what_differs(model, tokenizer, rows, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            detect(model, tokenizer, rows, output_dir=out)
    counter = GenerateCounter(model, monkeypatch)
    fix = re.escape(f"delete {out / PROGRESS_DIR} or choose another output_dir")
    with pytest.raises(DetectionProgressError, match=r"max_new_tokens: partial detection 6, now 5\. .*" + fix):
        detect(model, tokenizer, rows, output_dir=out, max_new_tokens=5)
    with pytest.raises(DetectionProgressError, match="pairs: partial detection 14 pairs, now 13 pairs"):
        detect(model, tokenizer, rows[:13], output_dir=out)
    with pytest.raises(DetectionProgressError, match="shard_size: partial detection 4, now 8"):
        detect(model, tokenizer, rows, output_dir=out, shard_size=8)
    with pytest.raises(DetectionProgressError, match="vote_k: partial detection 2, now None"):
        detect(model, tokenizer, rows, output_dir=out, policy="global_topk")  # no per-batch votes
    with pytest.raises(DetectionProgressError, match="model weights: same tensors and shapes, different content: "
                                                     "the partial detection was made from another base model"):
        detect(tiny_model("olmoe", seed=1), tokenizer, rows, output_dir=out)
    assert counter.calls == 0
    assert shard_files(out) == ["shard-rank000-000000.safetensors"]  # nothing of the refused runs was written


def test_the_model_folder_a_backend_generates_from_is_part_of_the_fingerprint(model, tokenizer, rows, tmp_path):
    """vLLM generates from the model's folder (``model`` may be an empty skeleton): another checkpoint of the same
    architecture there is another run."""
    model.save_pretrained(tmp_path / "model")
    settings = {"batch_size": 2}
    before = detection_fingerprint(model, tokenizer, rows, judge=MarkerJudge(), settings=settings,
                                   weights_folder=tmp_path / "model")
    assert progress_differences(before, before) == []
    tiny_model("olmoe", seed=1).save_pretrained(tmp_path / "model")  # same shapes, other weights
    after = detection_fingerprint(model, tokenizer, rows, judge=MarkerJudge(), settings=settings,
                                  weights_folder=tmp_path / "model")
    assert progress_differences(before, after) == [
        f"model files the backend generates from: partial detection {tmp_path / 'model'} (2 weights and config "
        f"files), now {tmp_path / 'model'} (2 weights and config files), different content"]


def test_output_folder_held_by_another_process_is_refused(model, tokenizer, rows, cli_inputs, tmp_path, monkeypatch):
    from rasa_trainer.cli import detect as command
    from rasa_trainer.cli.common import UsageError

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from rasa_trainer.run_lock import hold_run_lock\n"
         "lock = hold_run_lock(sys.argv[1]); print('held', flush=True); sys.stdin.read()", str(out)],
        cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        counter = GenerateCounter(model, monkeypatch)
        with pytest.raises(OutputFolderError, match=f"in use by another run \\(pid {holder.pid} "):
            detect(model, tokenizer, rows, output_dir=out)
        assert counter.calls == 0 and not (out / PROGRESS_DIR).exists()
        monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        with pytest.raises(UsageError, match=f"--output_dir {out} is in use by another run \\(pid {holder.pid} "):
            command.main(cli_argv(cli_inputs, out))  # the command refuses before loading the model
    finally:
        holder.communicate("", timeout=60)


def test_shard_size_must_be_whole_batches(model, tokenizer, rows):
    with pytest.raises(ValueError, match="shard_size=5 must be a positive multiple of the batch size 2"):
        detect(model, tokenizer, rows, shard_size=5)


# ----------------------------------------------------------------------------------------------------------------
# `rasa-trainer detect` killed (SIGKILL, in a process of its own) and run again as typed


@pytest.fixture(scope="module")
def cli_inputs(model, tokenizer, rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    with open(folder / "pairs.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def cli_argv(folder: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(folder / "model"), "--dataset_name", str(folder / "pairs.jsonl"),
            "--output_dir", str(out), "--dtype", "float32", "--policy", "batch_union", "--num_experts", "2",
            "--batch_size", "2", "--shard_size", "4", "--max_new_tokens", str(MAX_NEW), "--no_progress", "True"]


def run_command(argv: list[str], monkeypatch) -> tuple:
    """`rasa-trainer detect` in this process, with the marker judge; returns the result and a generate counter."""
    from rasa_trainer.cli import detect as command

    counter = {}
    load_model = command.load_model

    def counting_load_model(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        counter["generate"] = GenerateCounter(model, monkeypatch)
        return model, tokenizer

    monkeypatch.setattr(command, "load_model", counting_load_model)
    monkeypatch.setattr(command, "build_judge", lambda name, labels=None, options=None: MarkerJudge())
    return command.main(argv), counter["generate"]


def test_killed_detect_command_resumes_bit_identical(cli_inputs, tmp_path, monkeypatch, caplog):
    """Killed while renaming shard 1 into place (the hardest case: a finished shard lost, its temporary file left),
    then the same command again. One process is killed (the job, tests/jobs/detection_job.py); the uninterrupted and
    the resumed commands run here, to keep the test cheap. Kills between shards and within a batch: the tests above."""
    out = tmp_path / "out"
    armed = ["--fault", "detection_shard_rename", "--occurrence", "2"]
    killed = subprocess.run([sys.executable, str(JOB), *armed, "--", *cli_argv(cli_inputs, out)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = sorted(p.name for p in (out / PROGRESS_DIR).iterdir())
    # shard 0 in place; shard 1 only as the temporary file the kill left behind
    assert left[1:] == [FINGERPRINT_FILE, "shard-rank000-000000.safetensors"], left
    assert left[0].startswith(".shard-rank000-000001.safetensors.") and left[0].endswith(".tmp"), left
    assert (out / LOCK_FILE).exists()  # a killed process cleans nothing up

    reference, _ = run_command(cli_argv(cli_inputs, tmp_path / "uninterrupted"), monkeypatch)
    with caplog.at_level(logging.INFO):
        resumed, counter = run_command(cli_argv(cli_inputs, out), monkeypatch)  # the same command
    assert "taking over the lock" in caplog.text
    assert "resuming detection" in caplog.text and "1 of 4 shards done (4 pairs" in caplog.text
    assert (counter.calls, counter.rows) == (2 * 5, 2 * 10)  # shards 1 to 3: 5 batches of 2 pairs, both sides
    assert_same_statistics(resumed.statistics.state_tensors(), reference.statistics.state_tensors())
    assert resumed.to_dict() == reference.to_dict()
    assert sorted(p.name for p in out.iterdir()) == ["expert_stats.csv", "risk_difference.png",
                                                     "safety_critical_experts.json"]


def test_a_judge_with_tuple_options_resumes(model, tokenizer, rows):
    """The default keyword judge keeps its phrases in tuples; fingerprint.json holds lists. The fingerprint compared
    must be the one read back, or every resume (and every rank reading rank 0's fresh fingerprint) is refused."""
    from rasa_trainer.detection.progress import detection_fingerprint, progress_differences
    from rasa_trainer.judges import RefusalKeywordJudge

    judge = RefusalKeywordJudge()
    assert any(isinstance(v, tuple) for v in vars(judge).values())
    current = detection_fingerprint(model, tokenizer, rows, judge=judge, settings=SETTINGS)
    assert progress_differences(json.loads(json.dumps(current)), current) == []


# ----------------------------------------------------------------------------------------------------------------
# two processes: every rank keeps and resumes its own share


def _two_rank_worker(rank, init_file, rows, out_dir, result_dir, interrupt):
    import pytest as _pytest

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = tiny_model("olmoe")
        with _pytest.MonkeyPatch.context() as patch:
            counter = GenerateCounter(model, patch)
            if interrupt:
                interrupt_after(patch, 3)  # shard 0 of this rank (2 batches) written, shard 1 interrupted
            try:
                result = detect(model, tiny_chat_tokenizer(), rows, output_dir=out_dir)
            except KeyboardInterrupt:
                result = None
        state = {"calls": counter.calls, "shards": shard_files(out_dir) if (out_dir / PROGRESS_DIR).exists() else [],
                 "result": None if result is None else result.to_dict()}
        (result_dir / f"{'first' if interrupt else 'resumed'}-rank{rank}.json").write_text(json.dumps(state))
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_resumes_its_own_share(rows, reference, tmp_path):
    """Rank r counts rows r::2 (7 pairs: shards of 4 and 3); both are interrupted in their second shard, then resumed:
    each generates only that shard again, and the result is the one-process run's."""
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    for interrupt in (True, False):
        mp.start_processes(_two_rank_worker, args=(str(tmp_path / f"init-{interrupt}"), rows, out, tmp_path, interrupt),
                           nprocs=2, start_method="fork")
    first = [json.loads((tmp_path / f"first-rank{r}.json").read_text()) for r in range(2)]
    resumed = [json.loads((tmp_path / f"resumed-rank{r}.json").read_text()) for r in range(2)]
    assert first[1]["shards"] == ["shard-rank000-000000.safetensors", "shard-rank001-000000.safetensors"]
    assert [r["calls"] for r in first] == [2 * 3, 2 * 3] and first[0]["result"] is None
    assert [r["calls"] for r in resumed] == [2 * 2, 2 * 2]  # shard 1 only (batches of 2 and 1 pairs), both sides
    assert resumed[0]["result"] == resumed[1]["result"]
    assert resumed[0]["result"]["experts"] == reference.to_dict()["experts"]
    assert resumed[0]["result"]["pairs"] == reference.pairs
    assert not (out / PROGRESS_DIR).exists()
