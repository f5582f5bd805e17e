"""Trust in the user's folders, as a user meets them:

- nothing we write opens a file to others: the permission fix of transformers' temporary files never follows a link,
  and a save into a folder that holds a symbolic link is refused before anything is written (transformers' writers
  open files by name, so a planted ``config.json -> ~/.ssh/id_rsa`` would be overwritten);
- one run per output folder: a second run on a folder is refused naming the run that holds it; a lock left by a
  killed run is taken over with a warning; the lock is gone after the run, also after a failed one;
- a new run never touches another run's checkpoints: it is refused (``--overwrite_output_dir`` replaces them).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import make_trainer
from rasa_trainer.training import saving
from rasa_trainer.training.output_folder import LOCK_FILE, OutputFolderError, hold_run_lock
from rasa_trainer.training.checkpoints import write_manifest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SECRET = "-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n"


def cli(*argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rasa_trainer.cli", *map(str, argv)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def secret(tmp_path):
    """A private file outside the output folder (mode 0600), as a private key would be."""
    path = tmp_path / "private" / "id_rsa"
    path.parent.mkdir()
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


def assert_untouched(secret):
    assert secret.read_text() == SECRET
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# ------------------------------------------------------------------------------------------------ links


def test_permission_fix_never_follows_a_link(tmp_path, secret, umask_022):
    folder = tmp_path / "model"
    folder.mkdir()
    shard = folder / "model.safetensors"
    shard.write_bytes(b"weights")
    shard.chmod(0o600)  # as transformers leaves its private temporary files
    (folder / "model-00002-of-00002.safetensors").symlink_to(secret)
    saving._respect_umask(str(folder))
    assert stat.S_IMODE(shard.stat().st_mode) == 0o644
    assert_untouched(secret)


@pytest.mark.parametrize("planted", ["config.json", "tokenizer.json", "adapter/adapter_config.json"])
def test_save_into_a_folder_holding_a_link_is_refused_before_writing(tmp_path, secret, umask_022, planted):
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only")
    target = tmp_path / "final"
    (target / planted).parent.mkdir(parents=True)
    (target / planted).symlink_to(secret)
    with pytest.raises(OutputFolderError, match=f"holds symbolic links \\({planted} -> .*id_rsa\\).*Remove the links"):
        trainer.save_model(str(target))
    assert_untouched(secret)
    assert sorted(p.name for p in target.iterdir()) == [Path(planted).parts[0]]  # nothing was written
    (target / planted).unlink()
    trainer.save_model(str(target))  # without the link the same save goes through
    assert (target / "model.safetensors").is_file()


def test_links_to_other_folders_are_left_alone(tmp_path, secret):
    """Nothing writes into a linked folder beside the files of a save (a dataset linked into the run folder, say)."""
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only")
    target = tmp_path / "final"
    target.mkdir()
    (target / "data").symlink_to(secret.parent)
    trainer.save_model(str(target))
    assert (target / "model.safetensors").is_file() and os.listdir(secret.parent) == ["id_rsa"]
    assert_untouched(secret)


def test_checkpoint_folder_that_is_a_link_is_refused(tmp_path):
    """A resumed run that is about to write a checkpoint where a link now stands refuses, writing nothing there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only", rasa_rounds=2, save_strategy="epoch")
    first.train()
    out = Path(first.args.output_dir)
    shutil.rmtree(out / "checkpoint-6")
    (out / "checkpoint-6").symlink_to(elsewhere)
    resumed = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only", rasa_rounds=2, save_strategy="epoch")
    with pytest.raises(OutputFolderError, match=r"checkpoint-6 is a symbolic link \(\. -> .*elsewhere\)"):
        resumed.train(resume_from_checkpoint=True)
    assert list(elsewhere.iterdir()) == []
    assert not (out / LOCK_FILE).exists()


def test_cli_refuses_a_link_in_the_model_folder_before_loading(tmp_path, secret):
    model_dir = tmp_path / "out" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "tokenizer.json").symlink_to(secret)
    proc = cli("train", "--output_dir", "out", "--rasa_rounds", "1", "--skip_eval", "true", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "rasa-trainer train: error: --output_dir:" in proc.stderr
    assert "holds symbolic links (tokenizer.json ->" in proc.stderr and "Remove the links" in proc.stderr
    assert "Loading weights" not in proc.stderr  # refused before the model loads
    assert_untouched(secret)


# ------------------------------------------------------------------------------------------------ one run per folder


HOLDER = ("import sys, time\nfrom rasa_trainer.training.output_folder import hold_run_lock\n"
          "lock = hold_run_lock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)\n")


@pytest.fixture
def other_run(tmp_path):
    """Another process holding ``tmp_path/out`` as a run would."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_run_on_a_folder_is_refused_naming_the_holder(tmp_path, other_run):
    out, holder = other_run
    proc = cli("train", "--output_dir", out, "--rasa_rounds", "1", "--skip_eval", "true", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"is in use by another run (pid {holder.pid} on host {socket.gethostname()}, started" in proc.stderr
    assert "wait for it to finish, or choose another --output_dir" in proc.stderr
    assert "Loading weights" not in proc.stderr
    # the library refuses too, before any step, and leaves the holder's lock alone
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only", output_dir=str(out))
    with pytest.raises(OutputFolderError, match=f"in use by another run \\(pid {holder.pid} on host"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid


def test_only_process_zero_holds_the_lock(tmp_path, other_run, monkeypatch):
    """Under several processes, rank 0 holds the folder; the others never refuse themselves (rank 0 refuses for the
    run)."""
    out, _ = other_run
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only", output_dir=str(out))
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)
    trainer._resolve_resume_checkpoint(None)
    assert trainer._run_lock is None


def test_only_the_launchs_process_zero_refuses_before_loading(tmp_path, other_run, monkeypatch):
    """Under a launcher, process 0 may take the lock before the other ranks have finished their checks: they must not
    take their own process 0's lock for another run's (CI saw rank 1 exit with status 2 that way). Process 0 looks and
    refuses for the launch; the others leave it to process 0."""
    from types import SimpleNamespace

    from rasa_trainer.cli.common import UsageError
    from rasa_trainer.cli.train import check_run_folder
    from rasa_trainer.run_lock import run_lock_holder

    out, holder = other_run
    args = SimpleNamespace(output_dir=str(out), overwrite_output_dir=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_lock_holder(str(out)) is None
    check_run_folder(args, None)
    monkeypatch.setenv("RANK", "0")
    assert f"pid {holder.pid}" in run_lock_holder(str(out))
    with pytest.raises(UsageError, match=f"is in use by another run \\(pid {holder.pid} "):
        check_run_folder(args, None)


def test_lock_is_held_during_the_run_and_gone_after_it_even_after_an_error(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class LookAtTheLock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(json.loads((Path(args.output_dir) / LOCK_FILE).read_text()))

    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only")
    trainer.add_callback(LookAtTheLock())
    trainer.train()
    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not (tmp_path / "out" / LOCK_FILE).exists()

    class Fail(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    failing = make_trainer(tmp_path / "again", "qwen3_moe", rasa_schedule="expert_only")
    failing.add_callback(Fail())
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.train()
    assert not (tmp_path / "again" / "out" / LOCK_FILE).exists()


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    killed = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "held"
    killed.send_signal(signal.SIGKILL)  # as an OOM killer or a preempted node would: nothing cleans up
    killed.wait()
    assert (out / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="rasa_trainer.training.saving"):
        with hold_run_lock(str(out)):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of output_dir {out} from a run that is no longer running (pid {killed.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(OutputFolderError, match=f"pid 1 on host node-17.*if that run has ended, delete {out / LOCK_FILE}"):
        hold_run_lock(str(out))


def test_holds_in_one_process_share_the_lock(tmp_path):
    """`rasa-trainer train` holds the folder for the whole command; the trainer inside joins that hold."""
    out = tmp_path / "out"
    with hold_run_lock(str(out)) as command:
        trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only")
        trainer.train()
        assert command.held and (out / LOCK_FILE).exists()  # the trainer's release left the command's hold
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ another run's checkpoints


def earlier_run(out: Path) -> dict[str, str]:
    """checkpoint-6 and checkpoint-12 of an earlier run (complete, as the trainer writes them); their contents."""
    contents = {}
    for step in (6, 12):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "rasa_state.json").write_text(json.dumps({"phase": "router", "step": step}))
        write_manifest(str(folder), {"args": {}}, step)
        contents[folder.name] = (folder / "rasa_state.json").read_text()
    return contents


def test_new_run_in_a_folder_with_another_runs_checkpoints_is_refused(tmp_path):
    out = tmp_path / "out"
    contents = earlier_run(out)
    proc = cli("train", "--output_dir", out, "--rasa_rounds", "1", "--skip_eval", "true", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "already holds checkpoints of another run (checkpoint-6, checkpoint-12)" in proc.stderr
    assert "--overwrite_output_dir" in proc.stderr and "use a new output_dir" in proc.stderr
    assert "Loading weights" not in proc.stderr
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only", save_strategy="epoch")
    with pytest.raises(OutputFolderError, match="overwrite_output_dir=True"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert {p.name: (p / "rasa_state.json").read_text() for p in out.glob("checkpoint-*")} == contents


def test_overwrite_output_dir_replaces_them_and_says_so(tmp_path, caplog):
    out = tmp_path / "out"
    earlier_run(out)
    trainer = make_trainer(tmp_path, "qwen3_moe", rasa_schedule="expert_only", save_strategy="epoch",
                           overwrite_output_dir=True)
    with caplog.at_level(logging.WARNING, logger="rasa_trainer.training.saving"):
        trainer.train()
    assert "removing 2 checkpoint folders of an earlier run" in caplog.text and "checkpoint-6, checkpoint-12" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # this run's only


def test_cli_overwrite_output_dir_trains_over_another_runs_checkpoints(tmp_path):
    out = tmp_path / "out"
    earlier_run(out)
    proc = cli("train", "--output_dir", out, "--rasa_rounds", "1", "--skip_eval", "true", "--overwrite_output_dir",
               "true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "removing 2 checkpoint folders of an earlier run" in proc.stderr
    assert not list(out.glob("checkpoint-*")) and (out / "model" / "model.safetensors").is_file()
    assert not (out / LOCK_FILE).exists()
