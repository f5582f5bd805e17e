"""Two-process CPU (gloo) runs: detection shards pairs and agrees on the selection; parameters stay identical; routing
records are split across the processes and DDP all-reduces only the active group's gradients, bit-identical to one
process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=ROOT)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _check_report(output_dir):
    with open(os.path.join(output_dir, "ddp_report.json")) as f:
        report = json.load(f)
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["wrapped"] == "DistributedDataParallel"
    assert report["selections"][0] == report["selections"][1] and report["selections"][0]
    assert [e["phase"] for e in report["epochs"]] == ["expert", "router"]
    assert all(e["identical"] for e in report["epochs"])
    # the router KL is computed per rank on each rank's own batch (documented): the ranks see different values
    kl0, kl1 = report["router_kl"]
    assert len(kl0) == len(kl1) > 0 and kl0 != kl1
    # a checkpoint is complete only with every rank's RNG state: the manifest waits for the late rank 1
    manifests = report["checkpoint_manifests"]
    assert len(manifests) == 2 and all({"rng_state_0.pth", "rng_state_1.pth"} <= set(f) for f in manifests.values())
    return report


@pytest.mark.timeout(600)
def test_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(ROOT, "tests", "jobs", "ddp_rasa.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_report(tmp_path)


@pytest.mark.timeout(600)
def test_accelerate_launch_multi_gpu_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(ROOT, "tests", "jobs", "ddp_rasa.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_report(tmp_path)


def _train_py(launcher: list[str], output_dir) -> None:
    cmd = [*launcher, os.path.join(ROOT, "examples", "train.py"), "--output_dir", str(output_dir), "--rasa_rounds", "1"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    # one process evaluated and wrote the results; both trained under DDP with the same selection
    assert result.stdout.count("ASR, all attacks") == 1
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)
    assert results["after"]["asr_aligned"] < results["before"]["asr_aligned"]
    assert os.path.isfile(os.path.join(output_dir, "model", "model.safetensors"))


@pytest.mark.timeout(900)
def test_train_py_under_torchrun(tmp_path):
    _train_py([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port())], tmp_path)


@pytest.mark.timeout(900)
def test_train_py_under_accelerate_launch(tmp_path):
    _train_py([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port())], tmp_path)


@pytest.mark.timeout(600)
def test_trainer_contract_under_two_processes(tmp_path):
    """Per-pair router loss and the retain-weighted expert loss: 2 processes x batch 4 give the loss and gradient of 1
    process x batch 8. Detection without
    a given selection runs in train() on every rank, before the optimiser and DDP, and the repairs train under DDP."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           os.path.join(ROOT, "tests", "jobs", "ddp_contract.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(os.path.join(tmp_path, "ddp_contract.json")) as f:
        report = json.load(f)
    assert report["world_size"] == 2

    import torch
    from test_trainer_contract import per_pair_step

    loss, delta = per_pair_step(tmp_path / "reference", 8, 1)
    for rank in range(2):
        assert report["per_pair"]["loss"][rank] == pytest.approx(loss, rel=1e-5)
        torch.testing.assert_close(torch.tensor(report["per_pair"]["delta"][rank]), delta, rtol=1e-4, atol=1e-7)
    from test_retain import retain_step

    retain_delta = retain_step(tmp_path / "retain_reference", 8, 1)
    for rank in range(2):
        torch.testing.assert_close(torch.tensor(report["retain"][rank]), retain_delta, rtol=1e-4, atol=1e-7)

    detection = report["detection"]
    for seen in detection["seen"]:
        assert torch.device(seen["device"]).type == torch.device(seen["training_device"]).type  # the training device
        assert seen["initialized"] and not seen["optimizer_built"]
        assert seen["wrapped"] != "DistributedDataParallel"  # before DDP wraps the model
    assert detection["selections"][0] == detection["selections"][1] == detection["planted"]
    assert detection["wrapped_after"] == "DistributedDataParallel" and detection["repairs_in_ddp_module"] > 0
    assert detection["identical_after_training"] and detection["phases"] == [1, 2] and detection["selection_file"]


@pytest.mark.timeout(600)
def test_sharded_recording_and_active_group_reduction_match_one_process(tmp_path):
    """tests/jobs/ddp_sharded.py: 2 processes x 2 pairs against 1 process x 2 pairs x 2 accumulation steps (the same
    global batch of 4), two rounds on 16 pairs."""
    job = os.path.join(ROOT, "tests", "jobs", "ddp_sharded.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    # the two runs at once: the one-process run uses one core
    runs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for cmd in ([sys.executable, job, str(tmp_path), "single"], [*launch, job, str(tmp_path), "ddp"])]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-4000:]
    with open(tmp_path / "report_single.json") as f:
        single = json.load(f)
    with open(tmp_path / "report_ddp.json") as f:
        ddp = json.load(f)
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo" and ddp["wrapped"] == "DistributedDataParallel"

    # the trained weights equal the one-process run's bit for bit (and training moved them)
    from safetensors.torch import load_file
    import torch

    one, two = load_file(tmp_path / "weights_single.safetensors"), load_file(tmp_path / "weights_ddp.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert single["moved_from_base"] > 1e-3 and ddp["ranks_identical"]
    # the metrics over all rows are the one-process values (the second expert phase's shift is not zero)
    assert ddp["routing_shift_phase_start"] == [single["routing_shift_phase_start"]] * 2
    assert single["routing_shift_phase_start"][1] > 0

    # each process ran only its half of every record (run start, two expert phases) and holds the whole cache
    assert [r["forward_rows"] for r in single["recorded"]] == [16, 16, 16]
    for rank in range(2):
        assert [(r["forward_rows"], r["recorded_rows"], r["cache_rows"]) for r in ddp["recorded"][rank]] == [
            (8, 8, 16)] * 3
    # records that do not split evenly: 5 pairs + 3 retain rows in batches of 2 (2 batches and 3), and 1 batch
    # (nothing to record on rank 0): equal to one process's record; every process runs as many forwards
    uneven = ddp["uneven"]
    assert [u["recorded_rows"] for u in uneven[0]] == [4, 0] and [u["recorded_rows"] for u in uneven[1]] == [4, 2]
    assert [u["forward_rows"] for u in uneven[0]] == [6, 2] and [u["forward_rows"] for u in uneven[1]] == [4, 2]
    assert all(u["equal"] for rank in uneven for u in rank)

    # gradient traffic: each phase all-reduces only its group (8 steps per phase over the two rounds) ...
    repairs, routers = ddp["group_elements"]["experts"], ddp["group_elements"]["routers"]
    for rank in range(2):
        reduced = ddp["allreduced"][rank]
        assert reduced["expert"]["elements"] == 8 * repairs and reduced["expert"]["bytes"] == 8 * repairs * 4
        assert reduced["router"]["elements"] == 8 * routers and reduced["router"]["bytes"] == 8 * routers * 4
    # ... where torch's stock all-reduce (kept when found) reduces both groups every step, to the same weights
    stock = ddp["stock"]
    for rank in range(2):
        for phase in ("expert", "router"):
            assert stock["allreduced"][rank][phase]["elements"] == 8 * (repairs + routers)
    assert stock["weights_equal"] == [True, True]
