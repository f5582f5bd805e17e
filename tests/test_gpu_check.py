"""The CPU mode of the GPU check (benchmarks/gpu_check.py --device cpu --tiny): every row runs and reports."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
def test_gpu_check_cpu_tiny_mode_prints_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu", "--tiny",
           "--threads", "1", "--json", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out) as f:
        report = json.load(f)
    rows = {r["check"]: r for r in report["rows"]}
    table = result.stdout
    assert report["header"] in table
    assert not [r for r in report["rows"] if r.get("result") in ("ERROR", "skipped (time budget)")]

    def row(prefix: str) -> dict:
        found = [r for name, r in rows.items() if name.startswith(prefix)]
        assert len(found) == 1, (prefix, list(rows))
        assert found[0]["check"] in table
        return found[0]

    exact = row("zero repairs exact (bf16, experts 'grouped_mm')")
    assert exact["result"] == "exact"
    assert exact["detail"].count("bit-identical") == 3
    trainable = {}
    for prefix in ("RASA expert phase, delta", "RASA expert phase, LoRA r8", "RASA router phase",
                   "full-parameter SFT (SFTTrainer)", "PEFT LoRA r8 on all experts (anchor)"):
        r = row(prefix)
        assert r["time"].endswith(" s/step") and float(r["time"].split()[0]) > 0
        assert r["peak"].endswith("MiB") or r["peak"].endswith("GiB")
        trainable[prefix] = int(r["detail"].split()[0].replace(",", ""))
    # trainable parameters: the selected experts' LoRA factors < their deltas < every parameter
    assert 0 < trainable["RASA expert phase, LoRA r8"] < trainable["RASA expert phase, delta"]
    assert trainable["RASA expert phase, delta"] < trainable["full-parameter SFT (SFTTrainer)"]
    assert 0 < trainable["RASA router phase"] < trainable["RASA expert phase, delta"]
    qwen = row("Qwen3-30B-A3B expert phase, 1-GPU config, tiny shape")
    assert qwen["result"] == "within 15%", qwen["detail"]
    for batch in (1, 8, 32):
        r = row(f"detection generation, batch {batch},")
        assert "tok/s bare" in r["time"] and "tok/s with capture" in r["time"]
    # what CPU tests cannot see on a GPU, here in its CPU form: each row must pass its own check
    assert row("repairs attached on cpu")["result"] == "ok"
    assert row("load_rasa_adapter on cpu")["result"] == "exact"
    save = row("mid-training save peak vs plan")
    assert save["result"] == "within plan", save["detail"]
    syncs = row("host waits per expert step, 2 vs 4 MoE layers")
    assert syncs["result"] == "flat", syncs["detail"]
