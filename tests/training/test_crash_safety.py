"""Fault injection: a training process killed (SIGKILL) at each write point of a checkpoint save, then resumed with
resume_from_checkpoint=True, ends bit-identical to an uninterrupted run; a checkpoint that is incomplete, corrupt or
from another run is skipped or refused with a message that names the problem, never trained on silently.

The kills come from tests/fault_injection.py, armed by the jobs in tests/jobs/ (the library holds no kill code)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "jobs" / "checkpoint_job.py"


def run_job(out, *extra, fault=None, occurrence=1):
    """The job in a subprocess; ``fault``: killed at that write point (tests/fault_injection.py, armed by the job)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    armed = ["--fault", fault, "--occurrence", str(occurrence)] if fault is not None else []
    return subprocess.run([sys.executable, str(JOB), str(out), *extra, *armed], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def final_weights(out):
    return load_file(str(Path(out) / "final.safetensors"))


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not (actual[k].dtype == expected[k].dtype and (actual[k] == expected[k]).all())]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_job(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


# (write point, occurrence): every point is hit in the second or a later checkpoint save, so an earlier complete
# checkpoint exists to resume from. The routing cache is written in expert-phase saves only (steps 2 and 8).
KILLS = [("after_weights", 2), ("after_routing_cache", 2), ("before_manifest", 3)]


@pytest.mark.parametrize("point,occurrence", KILLS)
def test_kill_during_checkpoint_save_then_resume_is_bit_identical(tmp_path, reference, point, occurrence):
    killed = run_job(tmp_path, fault=point, occurrence=occurrence)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "final.safetensors").exists()
    resumed = run_job(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "skipping incomplete checkpoint" in resumed.stderr  # the interrupted one is recognised, not trained on
    assert_same_weights(final_weights(tmp_path), final_weights(reference))


def test_kill_during_rotation_keeps_the_last_complete_checkpoint(tmp_path, reference):
    killed = run_job(tmp_path, "--save_total_limit", "1", fault="rotation", occurrence=2)
    assert killed.returncode == -signal.SIGKILL
    complete = [p.name for p in sorted(tmp_path.glob("checkpoint-*")) if (p / "rasa_checkpoint.json").exists()]
    assert complete == ["checkpoint-6"]  # the newest; checkpoint-4 lost its manifest before its deletion began
    resumed = run_job(tmp_path, "--resume", "--save_total_limit", "1")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(final_weights(tmp_path), final_weights(reference))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-12"]


def test_reused_output_dir_of_another_run_is_refused(tmp_path, reference):
    out = tmp_path / "reused"
    shutil.copytree(reference, out)
    shorter = run_job(out, "--resume", "--rounds", "1")
    assert shorter.returncode != 0
    assert "belongs to another run" in shorter.stderr and "rasa_rounds: checkpoint 2, now 1" in shorter.stderr
    grown = run_job(out, "--resume", "--pairs", "16")
    assert grown.returncode != 0
    assert "training data: checkpoint 12 pairs, now 16 pairs" in grown.stderr


def test_corrupt_checkpoint_files_are_named(tmp_path, reference):
    from rasa_trainer.training.checkpoints import checkpoint_problem

    checkpoint = tmp_path / "checkpoint-12"
    shutil.copytree(reference / "checkpoint-12", checkpoint)
    assert checkpoint_problem(str(checkpoint)) is None
    trainable = checkpoint / "rasa_trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:100])
    assert "rasa_trainable.safetensors has 100 bytes" in checkpoint_problem(str(checkpoint))
    shutil.copy(reference / "checkpoint-12" / "rasa_trainable.safetensors", trainable)
    state = checkpoint / "trainer_state.json"
    state.write_text(state.read_text().replace("global_step", "global_stop"))  # same size, different content
    assert "trainer_state.json does not match its checksum" in checkpoint_problem(str(checkpoint))


def test_the_library_ships_no_kill_switch():
    """Fault injection lives in the tests: no module of the package kills its process or reads a fault variable."""
    package = ROOT / "rasa_trainer"
    offenders = [str(path.relative_to(ROOT)) for path in package.rglob("*.py")
                 if any(word in path.read_text(encoding="utf-8") for word in ("SIGKILL", "RASA_FAULT", "_fault_point"))]
    assert offenders == []


CLI_JOB = ROOT / "tests" / "jobs" / "cli_with_faults.py"
CONFIG = ROOT / "rasa_trainer" / "configs" / "safety_world.yaml"


def test_killed_command_resumes_taking_over_its_lock(tmp_path):
    """`rasa-trainer train` killed while writing its second checkpoint leaves its lock and an incomplete checkpoint;
    `--resume_from_checkpoint true` takes the lock over (the pid is gone), skips that checkpoint and finishes."""
    from rasa_trainer.safety_world import load_safety_world_model
    from test_trainer import make_selection

    model, _ = load_safety_world_model()
    make_selection(model, {0: [1, 3], 1: [2]}).save(tmp_path / "sce")
    command = ["train", "--config", str(CONFIG), "--safety_critical_experts", "sce", "--output_dir", "run",
               "--rasa_rounds", "1", "--save_strategy", "steps", "--save_steps", "8", "--skip_eval", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, str(CLI_JOB), "--fault", "before_manifest", "--occurrence", "2", "--",
                             *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    lock = json.loads((tmp_path / "run" / ".rasa-run.lock").read_text())
    assert lock["pid"] != os.getpid()
    assert not (tmp_path / "run" / "checkpoint-16" / "rasa_checkpoint.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "rasa_trainer.cli", *command, "--resume_from_checkpoint", "true"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"taking over the lock of output_dir run from a run that is no longer running (pid {lock['pid']}" in resumed.stderr
    assert "skipping incomplete checkpoint" in resumed.stderr and "checkpoint-16" in resumed.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / ".rasa-run.lock").exists()
