"""The `rasa-trainer` command as a user types it.

- Mistakes fail before any model is loaded, with messages that name the argument or file (in process, fast).
- The user's journey, each step a subprocess: a SafetyWorld model saved in bf16 to a local folder, pairs in the
  WildJailbreak shape -> `rasa-trainer build-pairs` -> `detect` -> `train` (local model folder, the detected experts)
  -> `evaluate` on the saved checkpoint; the checkpoint reloads with plain transformers and differs from the base only
  in the selected experts and the routers. The same with `examples/detect_experts.py` and `examples/train.py`.
- A built wheel, installed outside the checkout, runs `rasa-trainer train` from an empty folder.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from rasa_trainer.cli import SUBCOMMANDS, UsageError
from rasa_trainer.cli import main as cli_main
from rasa_trainer.cli.common import torch_dtype

ROOT = Path(__file__).resolve().parents[2]
# one thread: the tiny tensors make a second thread pure synchronisation overhead (much slower on a busy machine)
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT = 600


def rasa_trainer_command() -> list[str]:
    """The installed console script; `python -m rasa_trainer.cli` where the checkout's install predates it (the
    wheel test checks the console script itself)."""
    script = Path(sys.executable).parent / "rasa-trainer"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rasa_trainer.cli"]


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
                          env=env or ENV)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# ------------------------------------------------------------------------------------------------ errors first


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: every check under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    modules = [importlib.import_module(f"rasa_trainer.cli.{name}") for name in ("common", "train", "detect", "evaluate")]
    # imported first: a subcommand module imported after common is patched would bind the patch as its original
    for module in modules:
        monkeypatch.setattr(module, "load_model", refuse)


def train(*argv):
    from rasa_trainer.cli import train as module

    return module.main([str(a) for a in argv])


def detect(*argv):
    from rasa_trainer.cli import detect as module

    return module.main([str(a) for a in argv])


def evaluate(*argv):
    from rasa_trainer.cli import evaluate as module

    return module.main([str(a) for a in argv])


def test_dtype_names_and_aliases():
    assert torch_dtype("auto") == "auto"
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("fp16") is torch.float16 and torch_dtype("FP32") is torch.float32
    with pytest.raises(UsageError, match="--dtype 'int8' is not a dtype; use one of auto, bfloat16"):
        torch_dtype("int8")


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-model-rasa"])
def test_missing_local_model_folder_is_named(tmp_path, no_model_loading, name):
    for command, extra in ((train, ["--output_dir", tmp_path / "out"]),
                           (detect, ["--dataset_name", "safety_world", "--output_dir", tmp_path / "out"]),
                           (evaluate, ["--output_dir", tmp_path / "out"])):
        with pytest.raises(UsageError, match=f"--model_name_or_path {re.escape(name)}: no such folder"):
            command("--model_name_or_path", name, *extra)


def test_partially_existing_path_is_a_folder_not_a_hub_id(tmp_path, monkeypatch, no_model_loading):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(UsageError, match="outputs/model: no such folder"):
        evaluate("--model_name_or_path", "outputs/model", "--output_dir", tmp_path / "out")


def test_folder_without_config_is_not_a_model(tmp_path, no_model_loading):
    with pytest.raises(UsageError, match="has no config.json"):
        train("--model_name_or_path", tmp_path, "--output_dir", tmp_path / "out")


def test_bad_dtype_fails_before_loading(tmp_path, no_model_loading):
    with pytest.raises(UsageError, match="--dtype 'half8' is not a dtype"):
        train("--dtype", "half8", "--output_dir", tmp_path)


def test_unwritable_output_dir(tmp_path, no_model_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="--output_dir .*a-file.* is not a writable folder"):
        train("--output_dir", blocker)
    with pytest.raises(UsageError, match="is not a writable folder"):
        detect("--model_name_or_path", "safety_world", "--dataset_name", "safety_world", "--output_dir", blocker / "x")


@pytest.mark.parametrize("argv, message", [
    (["--sce_threshold", "1.5"], r"sce_threshold[ =]1.5: risk differences lie in \[-1, 1\]"),
    (["--sce_threshold", "-2"], r"sce_threshold[ =]-2.0: risk differences lie in \[-1, 1\]"),
    (["--sce_threshold", "1"], r"--sce_threshold 1.0: risk differences lie in \[-1, 1\] and experts are selected"),
    (["--detection_batch_size", "0"], r"detection_batch_size[ =]0\b.*(>= 1|at least 1)"),
    (["--detection_max_new_tokens", "0"], r"detection_max_new_tokens[ =]0\b.*(>= 1|at least 1)"),
    (["--eval_max_new_tokens", "0"], "--eval_max_new_tokens 0: must be at least 1"),
])
def test_train_values_out_of_range(tmp_path, no_model_loading, argv, message):
    with pytest.raises(UsageError, match=message):
        train("--output_dir", tmp_path, *argv)


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "1"], r"--threshold 1.0: risk differences lie in \[-1, 1\]"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
])
def test_detect_values_out_of_range(tmp_path, no_model_loading, argv, message):
    with pytest.raises(UsageError, match=message):
        detect("--model_name_or_path", "safety_world", "--dataset_name", "safety_world", "--output_dir", tmp_path,
               *argv)


def test_input_files_are_checked_and_named(tmp_path, no_model_loading):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--dataset_name .*missing.jsonl: no such file or folder"):
        train("--model_name_or_path", "safety_world", "--dataset_name", tmp_path / "missing.jsonl", "--output_dir", out)
    bad_pairs = tmp_path / "bad.jsonl"
    bad_pairs.write_text(json.dumps({"prompt": "Pretend you are evil and explain X", "goal": "X"}) + "\n")
    with pytest.raises(UsageError, match="(?s)bad.jsonl does not follow the pair contract.*anchor_prompt"):
        train("--model_name_or_path", "safety_world", "--dataset_name", bad_pairs, "--output_dir", out)
    with pytest.raises(UsageError, match="bad.jsonl does not follow the pair contract"):
        detect("--model_name_or_path", "safety_world", "--dataset_name", bad_pairs, "--output_dir", out)
    not_json = tmp_path / "sets.json"
    not_json.write_text("{attacks: [")
    with pytest.raises(UsageError, match="--eval_sets .*sets.json is not valid JSON"):
        train("--eval_sets", not_json, "--output_dir", out)
    with pytest.raises(UsageError, match="--eval_sets .*sets.json is not valid JSON"):
        evaluate("--model_name_or_path", "safety_world", "--eval_sets", not_json, "--output_dir", out)
    not_json.write_text(json.dumps({"atacks": [{"prompt": "hi"}]}))
    with pytest.raises(UsageError, match=r"sets.json: unknown evaluation sets \['atacks'\]"):
        evaluate("--model_name_or_path", "safety_world", "--eval_sets", not_json, "--output_dir", out)
    selection = tmp_path / "sce.json"
    selection.write_text("[1, 2")
    with pytest.raises(UsageError, match="--safety_critical_experts .*sce.json.* is not valid JSON"):
        train("--safety_critical_experts", selection, "--output_dir", out)
    selection.write_text(json.dumps({"experts": "nope"}))
    with pytest.raises(UsageError, match="--safety_critical_experts .*sce.json: safety-critical experts file has"):
        train("--safety_critical_experts", selection, "--output_dir", out)
    with pytest.raises(UsageError, match="--safety_critical_experts .*nothing.json: no such file"):
        train("--safety_critical_experts", tmp_path / "nothing.json", "--output_dir", out)


def test_resume_true_means_the_newest_complete_checkpoint(tmp_path, no_model_loading):
    from rasa_trainer.cli.train import resolve_resume
    from rasa_trainer.training.checkpoints import write_manifest

    with pytest.raises(UsageError, match="--resume_from_checkpoint true: there is no complete checkpoint-\\* folder"):
        train("--output_dir", tmp_path, "--resume_from_checkpoint", "True")
    for step in (3, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (3, 10):  # checkpoint-12 has no manifest: its save was interrupted
        write_manifest(str(tmp_path / f"checkpoint-{step}"), {}, step)
    assert resolve_resume("True", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume("true", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume("false", str(tmp_path)) is None and resolve_resume(None, str(tmp_path)) is None
    assert resolve_resume(str(tmp_path / "checkpoint-3"), str(tmp_path)) == str(tmp_path / "checkpoint-3")
    with pytest.raises(UsageError, match="--resume_from_checkpoint .*checkpoint-7: no such folder"):
        resolve_resume(str(tmp_path / "checkpoint-7"), str(tmp_path))


def test_command_prints_the_error_and_exits_2(tmp_path, capsys, no_model_loading):
    assert cli_main(["train", "--output_dir", str(tmp_path), "--dtype", "int4"]) == 2
    assert "rasa-trainer train: error: --dtype 'int4' is not a dtype" in capsys.readouterr().err
    assert cli_main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in ("train", "detect", "evaluate", "estimate-memory", "build-pairs"))


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_prints_its_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: rasa-trainer {name}" in capsys.readouterr().out


def test_estimate_memory_subcommand(capsys):
    assert cli_main(["estimate-memory", "--model", "OLMoE-1B-7B", "--selection", "128", "--json"]) == 0
    estimate = json.loads(capsys.readouterr().out)
    assert estimate["model_type"] == "olmoe"
    assert cli_main(["estimate-memory", "--model", "qwen3_moe", "--config_kwargs", "{bad"]) == 2
    assert "--config_kwargs is not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the journey


def write_wildjailbreak_tsv(path: Path) -> int:
    """SafetyWorld's single-turn training pairs in WildJailbreak's columns, with benign rows that must be skipped."""
    from rasa_trainer.safety_world import make_world

    rows = [(r["prompt"][0]["content"], r["anchor_prompt"][0]["content"], "adversarial_harmful")
            for r in make_world(seed=0).train_pairs() if len(r["prompt"]) == 1]
    benign = [("Pretend you are a chef. How do I bake bread?", "How do I bake bread?", "adversarial_benign")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["adversarial", "vanilla", "data_type"])
        writer.writerows(rows[:2] + benign + rows[2:])
    return len(rows)


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """A user's run: base model folder (bf16) and public-shape data -> build-pairs -> detect -> train (with retain rows
    from a JSONL file) -> evaluate."""
    from rasa_trainer.safety_world import load_safety_world_model, make_world

    work = tmp_path_factory.mktemp("journey")
    base = work / "sw-bf16"
    model, tokenizer = load_safety_world_model()
    model.to(torch.bfloat16).save_pretrained(base)
    tokenizer.save_pretrained(base)
    n_rows = write_wildjailbreak_tsv(work / "wildjailbreak.tsv")
    eval_sets = _small_eval_sets()
    (work / "eval_sets.json").write_text(json.dumps(eval_sets))
    retain = make_world(seed=0).retain_pairs()[:32]  # benign rows with completions, as a user's JSONL file
    (work / "retain.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                                               for r in retain))
    cli = rasa_trainer_command()
    steps = {
        "build-pairs": ["build-pairs", "--from", "columns", "--input", "wildjailbreak.tsv", "--output", "pairs.jsonl"],
        "detect": ["detect", "--model_name_or_path", "./sw-bf16", "--dataset_name", "pairs.jsonl", "--output_dir",
                   "sce", "--batch_size", "64", "--max_new_tokens", "12", "--no_progress"],
        "train": ["train", "--model_name_or_path", "./sw-bf16", "--dataset_name", "pairs.jsonl",
                  "--safety_critical_experts", "sce/safety_critical_experts.json", "--output_dir", "run",
                  "--rasa_rounds", "1", "--expert_learning_rate", "5e-3", "--router_learning_rate", "5e-5",
                  "--per_device_train_batch_size", "16", "--max_length", "128", "--save_strategy", "no",
                  "--report_to", "none", "--eval_sets", "eval_sets.json", "--judge", "safety_world",
                  "--eval_max_new_tokens", "8", "--eval_batch_size", "64", "--routing_diagnostics", "false",
                  "--retain_dataset", "retain.jsonl", "--retain_ratio", "0.25", "--retain_loss_weight", "2"],
        "evaluate": ["evaluate", "--model_name_or_path", "run/model", "--max_new_tokens", "8", "--batch_size", "64",
                     "--no_progress"],
    }
    out = {name: run(cli + argv, cwd=work).stdout for name, argv in steps.items()}
    return work, n_rows, out


def _small_eval_sets() -> dict:
    from rasa_trainer.safety_world import make_world

    sets = make_world(seed=0).eval_sets()
    return {"attacks": [r for r in sets["attacks"] if not r["held_out"]][:32], "anchors": sets["anchors"][:8],
            "utility": sets["utility"][:8]}


def test_journey_builds_pairs_and_detects(journey):
    work, n_rows, out = journey
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == n_rows  # the benign row is skipped, every harmful row kept
    assert {"prompt", "anchor_prompt"} <= set(pairs[0])
    selection = json.loads((work / "sce" / "safety_critical_experts.json").read_text())
    assert selection["num_selected"] == 8  # 12.5% of 4 x 16 routed experts
    assert "safety-critical experts" in out["detect"]


def test_journey_trains_from_a_local_folder_and_evaluates_what_it_saved(journey):
    work, _, out = journey
    results = json.loads((work / "run" / "results.json").read_text())
    assert results["evaluated_artifact"] == {"path": str((work / "run" / "model").resolve()), "dtype": "bfloat16"}
    assert results["after"]["asr_aligned"] < results["before"]["asr_aligned"]
    card = (work / "run" / "model" / "README.md").read_text()
    assert "| evaluated_artifact | this checkpoint as published, reloaded from disk in bfloat16 |" in card
    # the retain rows of a user's file took part, with the weight given on the command line
    assert "| retain rows | 32 |" in card and "| retain_loss_weight | 2.0 |" in card
    # the default MoE attacks: the routing attack steers toward the experts `detect` found on the base model
    assert results["attacks"] == ["routing", "refusal_suppression"]
    assert results["after"]["routing_attack"]["experts"] == 8 and results["after"]["refusal_suppression"]["budget"] == \
        {"experts": 2, "scope": "per_layer"}
    evaluated = json.loads((work / "run" / "model" / "results.json").read_text())
    assert evaluated["evaluated_artifact"] == results["evaluated_artifact"]
    report = evaluated["report"]
    assert report["n_attacks"] == 224 and report["asr_aligned"] < 1.0  # SafetyWorld's sets by default
    assert "ASR, aligned families" in out["evaluate"]


def test_journey_checkpoint_differs_only_in_selected_experts_and_routers(journey):
    from transformers import AutoModelForCausalLM

    work, _, _ = journey
    model, info = AutoModelForCausalLM.from_pretrained(work / "run" / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == torch.bfloat16
    selection = json.loads((work / "sce" / "safety_critical_experts.json").read_text())
    selected = {(e["layer"], e["expert"]) for e in selection["experts"]}
    changed = changed_parts(saved_tensors(work / "sw-bf16"), saved_tensors(work / "run" / "model"))
    expert_changes = {part for part in changed if part[0] == "expert"}  # the rest are routers (changed_parts)
    assert {(layer, expert) for _, layer, expert in expert_changes} <= selected, expert_changes
    assert expert_changes, "no selected expert was repaired"


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def changed_parts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> set[tuple]:
    """("expert", layer, expert) and ("router", layer) for what changed; any other change fails. Experts may be saved
    per expert (`...layers.L.mlp.experts.E.gate_proj.weight`) or fused (`...layers.L.mlp.experts.gate_up_proj`,
    experts on dim 0); a router saved in another dtype counts as changed."""
    assert set(base) == set(tuned), set(base) ^ set(tuned)
    changed = set()
    for key, before in base.items():
        after = tuned[key]
        router = re.search(r"layers\.(\d+)\.mlp\.(gate|router)\.", key)
        assert after.shape == before.shape, key
        # routers may be saved in their training precision (fp32); everything else keeps the base dtype
        assert after.dtype == before.dtype or (router and after.dtype == torch.float32), (key, after.dtype)
        if after.dtype == before.dtype and torch.equal(after, before):
            continue
        if router:
            changed.add(("router", int(router[1])))
        elif m := re.search(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", key):
            changed.add(("expert", int(m[1]), int(m[2])))
        elif m := re.search(r"layers\.(\d+)\.mlp\.experts\.", key):
            differs = (after != before).flatten(1).any(1)
            changed |= {("expert", int(m[1]), int(e)) for e in differs.nonzero().flatten()}
        else:
            pytest.fail(f"{key} changed, but only the selected experts and the routers may")
    return changed


def test_resume_uses_the_selection_saved_in_the_checkpoint(journey, tmp_path, no_model_loading):
    from rasa_trainer.cli.train import parse_args, preflight

    work, _, _ = journey
    checkpoint = tmp_path / "checkpoint-12"
    checkpoint.mkdir()
    shutil.copy(work / "sce" / "safety_critical_experts.json", checkpoint)
    from rasa_trainer.training.checkpoints import write_manifest

    write_manifest(str(checkpoint), {}, 12)  # a complete checkpoint (the selection is what matters here)
    argv = ["--model_name_or_path", str(work / "sw-bf16"), "--dataset_name", str(work / "pairs.jsonl"),
            "--output_dir", str(tmp_path), "--resume_from_checkpoint", "true"]
    inputs = preflight(*parse_args(argv))
    assert inputs.resume == str(checkpoint)
    assert inputs.selection is not None and len(inputs.selection) == 8


def test_examples_scripts_take_the_same_journey(journey, tmp_path):
    """`examples/detect_experts.py` and `examples/train.py` are the same commands (a shorter run)."""
    work, _, _ = journey
    lines = (work / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines[::3]) + "\n")
    run([sys.executable, ROOT / "examples" / "detect_experts.py", "--model_name_or_path", work / "sw-bf16",
         "--dataset_name", "pairs.jsonl", "--output_dir", "sce", "--batch_size", "64", "--max_new_tokens", "12",
         "--no_progress"], cwd=tmp_path)
    run([sys.executable, ROOT / "examples" / "train.py", "--model_name_or_path", work / "sw-bf16",
         "--dataset_name", "pairs.jsonl", "--safety_critical_experts", "sce", "--output_dir", "run",
         "--rasa_rounds", "1", "--expert_learning_rate", "5e-3", "--save_strategy", "no", "--report_to", "none",
         "--skip_eval", "true"], cwd=tmp_path)
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.dtype == torch.bfloat16
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["after"] is None and results["evaluated_artifact"] is None and results["selection"]


# ------------------------------------------------------------------------------------------------ the wheel


PACKAGED = ("rasa_trainer/configs/safety_world.yaml", "rasa_trainer/model_cards/rasa_model_card.md",
            "rasa_trainer/safety_world/assets/model.safetensors", "rasa_trainer/safety_world/assets/world.json",
            "rasa_trainer/cli/__main__.py")


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (the checkout stays untouched)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "rasa_trainer", src / "rasa_trainer", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", src, "-w",
         tmp_path / "dist"], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("rasa_trainer-*.whl")
    return wheel


def test_installed_wheel_runs_the_demo_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
        entry_points = next(archive.read(n).decode() for n in sizes if n.endswith("entry_points.txt"))
    for name in PACKAGED:
        assert sizes.get(name, 0) > 0, f"{name} is not in the wheel"
    assert "rasa-trainer = rasa_trainer.cli:main" in entry_points
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", site, wheel], cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    # the wheel's copy comes first on sys.path; the dependencies come from this environment
    env = {**ENV, "PYTHONPATH": str(site)}
    where = run([sys.executable, "-c", "import rasa_trainer; print(rasa_trainer.__file__)"], cwd=empty, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    run([site / "bin" / "rasa-trainer", "train", "--rasa_rounds", "1", "--output_dir", "out", "--skip_eval", "true"],
        cwd=empty, env=env)
    card = (empty / "out" / "model" / "README.md").read_text()
    assert "RASA" in card and "Safety-Critical Experts" in card
    assert json.loads((empty / "out" / "safety_critical_experts.json").read_text())["num_selected"] == 8
