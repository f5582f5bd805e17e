"""examples/compare.py: the summary over runs (mean and min-max), merging runs of separate invocations, subsampling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rasa_trainer.evaluation.evaluate import SafetyReport

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_example", ROOT / "examples" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(asr_aligned: float, utility: float, attack: float | None = None) -> SafetyReport:
    return SafetyReport(judge="j", refusal_judge="j", max_new_tokens=16, asr=asr_aligned, asr_aligned=asr_aligned,
                        asr_held_out=0.5, n_attacks=4, n_attacks_aligned=4, utility_accuracy=utility, n_utility=64,
                        routing_attack_asr=attack)


def test_summary_table_gives_mean_and_range_per_method(compare):
    runs = {"RASA": {"w0/s0": report(0.0, 0.9, 0.1), "w0/s1": report(0.5, 1.0, 0.3), "w3/s0": report(0.25, 0.95, 0.2)},
            "base": {"w0/s-": report(1.0, 1.0, 1.0)}}
    tables = compare.summarise(runs)
    lines = tables["summary_table"].splitlines()
    assert lines[0].startswith("| method | runs | ASR aligned | ASR held-out |")
    assert lines[0].endswith("| ASR under base routing | ASR under routing attack | ASR under refusal-expert suppression "
                             "| ASR under unsafe steering |")
    assert lines[2].startswith("| base | 1 | 100.0 | 50.0 |")  # base first, whatever the dict order
    rasa = lines[3].split(" | ")
    assert rasa[:4] == ["| RASA", "3", "25.0 (0.0–50.0)", "50.0"]  # every run agrees on held-out: no range
    assert rasa[6] == "95.0 (90.0–100.0)" and rasa[-3:] == ["20.0 (10.0–30.0)", "–", "– |"]
    assert rasa[7] == "–"  # no routing shift measured
    stats = tables["summary"]["RASA"]["asr_aligned"]
    assert stats["mean"] == pytest.approx(0.25) and (stats["min"], stats["max"], stats["n"]) == (0.0, 0.5, 3)
    assert stats["std"] == pytest.approx((((0.25) ** 2 * 2) / 3) ** 0.5)


def test_method_order(compare):
    names = ["RASA", "router only", "full SFT (lr 0.0003)", "base", "full SFT (lr 0.0001)", "steering", "expert only",
             "random experts", "expert phases only"]
    assert compare.ordered(names) == ["base", "steering", "full SFT (lr 0.0001)", "full SFT (lr 0.0003)",
                                      "expert only", "expert phases only", "router only", "random experts", "RASA"]


def test_evenly_keeps_every_family(compare):
    rows = [{"goal": g, "attack": f} for g in range(32) for f in range(7)]
    kept = compare.evenly(rows, 56)
    assert len(kept) == 56 and {r["attack"] for r in kept} == set(range(7))
    assert compare.evenly(rows, None) is rows and compare.evenly(rows[:10], 56) == rows[:10]


def _results(world: int, seeds: list[int], asr: float) -> dict:
    runs = {"RASA": {f"w{world}/s{s}": report(asr, 1.0).to_dict() for s in seeds}}
    return {"variant": "shared", "settings": {"rasa_rounds": 3}, "budget_epochs": 6, "full_learning_rates": [1e-4],
            "routing_attack": {"margin": 0.01, "positions": "decision"}, "eval_rows": None, "world_seeds": [world],
            "seeds": seeds, "runs": runs, "timings_s": {"RASA": [1.0] * len(seeds), "total": 10.0},
            "detected_experts": {str(world): {"0": [1, 2]}}, "random_experts": {}}


def test_merge_joins_runs_of_separate_invocations(compare, tmp_path):
    for world, asr in ((0, 0.0), (3, 0.5)):
        (tmp_path / f"w{world}").mkdir()
        (tmp_path / f"w{world}" / "compare_results.json").write_text(json.dumps(_results(world, [0, 1], asr)))
    out = compare.main(["--merge", str(tmp_path / "w*" / "compare_results.json"), "--output_dir", str(tmp_path / "all")])
    assert out["world_seeds"] == [0, 3] and out["seeds"] == [0, 1]
    assert sorted(out["runs"]["RASA"]) == ["w0/s0", "w0/s1", "w3/s0", "w3/s1"]
    assert out["summary"]["RASA"]["asr_aligned"]["mean"] == pytest.approx(0.25)
    assert out["timings_s"]["total"] == 20.0 and out["timings_s"]["RASA"] == [1.0] * 4
    assert set(out["detected_experts"]) == {"0", "3"}
    written = json.loads((tmp_path / "all" / "compare_results.json").read_text())
    assert written["summary_table"] == out["summary_table"]
    assert "25.0 (0.0–50.0)" in (tmp_path / "all" / "comparison.md").read_text()

    other = _results(4, [0], 0.0)
    other["budget_epochs"] = 2
    (tmp_path / "w4").mkdir()
    (tmp_path / "w4" / "compare_results.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="budget_epochs"):
        compare.main(["--merge", str(tmp_path / "w*" / "compare_results.json"), "--output_dir", str(tmp_path / "x")])


def test_also_attacks_group_by_budget_and_refuse_bad_specs(compare, capsys):
    args = compare.parse_args(["--also_attacks", "refusal_suppression:2", "unsafe_steering", "refusal_suppression:4"])
    assert args.also_attacks == {2: ["refusal_suppression", "unsafe_steering"], 4: ["refusal_suppression"]}
    assert compare.parse_args([]).also_attacks == {}
    for spec, message in [("routing:2", "'routing' is not one of ['refusal_suppression', 'unsafe_steering']"),
                          ("refusal_suppression:x", "the budget after ':' must be a whole number"),
                          ("unsafe_steering:0", "the budget must be at least 1 expert per MoE layer")]:
        with pytest.raises(SystemExit):
            compare.parse_args(["--also_attacks", spec])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--also_attacks", "unsafe_steering:2", "unsafe_steering"])
    assert "given twice" in capsys.readouterr().err


def test_summary_table_has_the_profiled_attacks_columns(compare):
    with_attack = SafetyReport(judge="j", refusal_judge="j", max_new_tokens=16, asr=0.0, n_attacks=4,
                               refusal_suppression_asr=0.25, unsafe_steering_asr=0.5)
    table = compare.summary_table({"RASA @refusal_suppression + unsafe_steering budget 2": compare.spread([with_attack])})
    header, _, row = table.splitlines()
    assert "ASR under refusal-expert suppression | ASR under unsafe steering |" in header
    assert row.endswith("| 25.0 | 50.0 |")
