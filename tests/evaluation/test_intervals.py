"""95% Wilson intervals on every rate (rasa_trainer/evaluation/reporting.py): the published values, the report's rates,
results.json, the printed table, the before/after comparison, the plot and the model card."""

from __future__ import annotations

import json

import pytest

from rasa_trainer.evaluation.evaluate import SafetyReport, compare_rates, format_comparison
from rasa_trainer.evaluation.reporting import Rate, difference_interval, outside_intervals, plot_asr, wilson_interval
from rasa_trainer.training.model_card import card_evaluation


@pytest.mark.parametrize("k, n, low, high", [
    (0, 32, 0.0, 0.1072), (16, 32, 0.3363, 0.6637), (32, 32, 0.8928, 1.0),
    # Newcombe (1998a), Table II, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_known_values(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("before, after, low, high", [
    # Newcombe (1998b), method 10 (hybrid score): 56/70 - 48/80, 9/10 - 3/10, 5/56 - 0/29
    ((48, 80), (56, 70), 0.0524, 0.3339), ((3, 10), (9, 10), 0.1705, 0.8090), ((0, 29), (5, 56), -0.0381, 0.1926),
])
def test_difference_interval_known_values(before, after, low, high):
    b, a = Rate.of(before[0] / before[1], before[1]), Rate.of(after[0] / after[1], after[1])
    assert difference_interval(b, a) == pytest.approx((low, high), abs=5e-5)
    assert outside_intervals(b, a) is (low > 0)


def test_interval_arguments_are_checked():
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="outside"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 4, confidence=1.0)
    assert wilson_interval(1, 4, confidence=0.5)[1] < wilson_interval(1, 4)[1]
    assert Rate.of(0.125, 8).format() == "12.5% [2.2, 47.1]"


def report(asr: float, n: int = 32, utility: float = 1.0) -> SafetyReport:
    return SafetyReport(judge="j", refusal_judge="j", max_new_tokens=8, asr=asr, asr_aligned=asr, n_attacks=n,
                        n_attacks_aligned=n, asr_by_attack={"dan": asr}, n_by_attack={"dan": n},
                        utility_accuracy=utility, n_utility=64, routing_shift=0.25,
                        rates_by_category={"anchor_refusal_rate": {"harmbench/illegal": 0.75}},
                        n_by_category={"anchor_refusal_rate": {"harmbench/illegal": 4}})


def test_every_rate_of_a_report_has_n_and_its_interval():
    rates = report(0.5).rates()
    assert set(rates) == {"asr", "asr_aligned", "asr/dan", "anchor_refusal_rate/category/harmbench/illegal",
                          "utility_accuracy", "routing_shift"}
    assert (rates["asr"].n, rates["asr"].low, rates["asr"].high) == (32, *wilson_interval(16, 32))
    assert rates["anchor_refusal_rate/category/harmbench/illegal"].n == 4
    assert rates["routing_shift"].low is None  # a share of token assignments: no interval
    by_hand = SafetyReport(judge="j", refusal_judge="j", max_new_tokens=8, asr=0.5)  # a rate without its count
    assert by_hand.rates()["asr"] == Rate(0.5, 0, None, None) and "50.0%" in by_hand.format_table()
    data = report(0.5).to_dict()
    assert data["intervals"]["asr"] == {"label": "ASR, all attacks", "value": 0.5, "n": 32,
                                        "ci95": list(wilson_interval(16, 32))}
    assert data["intervals"]["routing_shift"]["ci95"] is None
    again = SafetyReport(**json.loads(json.dumps(data)))  # results.json reads back; intervals are recomputed
    assert again.rates() == report(0.5).rates()


def test_comparison_says_which_changes_are_outside_the_intervals():
    before, after = report(1.0), report(0.0, utility=61 / 64)
    changes = compare_rates(before, after)
    assert changes["asr"]["outside_intervals"] is True and changes["asr"]["delta"] == -1.0
    assert changes["asr"]["delta_ci95"] == pytest.approx(list(difference_interval(Rate.of(1.0, 32), Rate.of(0.0, 32))))
    assert changes["utility_accuracy"]["outside_intervals"] is False  # 64/64 -> 61/64 is within the noise
    assert changes["routing_shift"]["outside_intervals"] is None
    table = format_comparison({"base": before, "RASA": after})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "RASA", "n"]
    asr = next(line for line in lines if line.startswith("ASR, all attacks"))
    assert "100.0% [89.3, 100.0]" in asr and "0.0% [0.0, 10.7] *" in asr
    utility = next(line for line in lines if line.startswith("utility accuracy"))
    assert Rate.of(61 / 64, 64).format() == "95.3% [87.1, 98.4]"
    assert "95.3% [87.1, 98.4]" in utility and "*" not in utility
    assert lines[-1] == ("(rates with their 95% Wilson intervals; * the change from 'base' is outside the intervals "
                         "(Newcombe's 95% interval of the difference excludes 0))")
    assert "*" not in format_comparison({"base": before, "same": report(1.0)})


def test_plot_draws_intervals_and_refuses_missing_counts(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, **kw: drawn.append(kw.get("yerr"))
                        or original(self, x, h, **kw))
    plot_asr({"dan": 1.0, "aim": 0.5}, {"dan": 0.0, "aim": 0.25}, str(tmp_path / "asr.png"),
             n_before={"dan": 32, "aim": 4}, n_after={"dan": 32, "aim": 4})
    assert (tmp_path / "asr.png").read_bytes()[:4] == b"\x89PNG"
    before_err = drawn[0]  # families sorted: aim, dan
    low, high = wilson_interval(2, 4)
    assert before_err[0][0] == pytest.approx(0.5 - low) and before_err[1][0] == pytest.approx(high - 0.5)
    assert before_err[1][1] == pytest.approx(0.0) and before_err[0][1] == pytest.approx(1.0 - wilson_interval(32, 32)[0])
    with pytest.raises(ValueError, match=r"n_after has no count for the families \['aim'\]"):
        plot_asr({"dan": 1.0}, {"dan": 0.0, "aim": 0.25}, str(tmp_path / "x.png"), n_before={"dan": 32},
                 n_after={"dan": 32})


def test_model_card_rows_carry_n_intervals_judges_and_files():
    after = report(0.0)
    after.judges = {"judge": {"name": "openai:judge", "version": "judge@r1", "format": "harmbench"},
                    "refusal_judge": {"name": "keyword", "version": "rasa-trainer 0.1.0", "format": None}}
    after.sources = [{"benchmark": "harmbench", "path": "/d/hb.csv", "sha256": "ab" * 32, "format": "HarmBench "
                      "behaviours CSV", "rows": {"anchors": 6}}]
    for given in (after, after.to_dict()):
        section = card_evaluation({"report": given, "evaluated_artifact": "this checkpoint"})
        assert section["with_intervals"] and section["sources"] == after.sources
        rows = {row[0]: row[1:] for row in section["rows"]}
        low, high = wilson_interval(0, 32)
        assert rows["asr"] == (0.0, 32, f"[{round(low, 4)}, {round(high, 4)}]")
        assert rows["routing_shift"] == (0.25, 32, "–") and rows["evaluated_artifact"] == ("this checkpoint", "", "")
        assert section["judges"][0] == {"role": "judge", "name": "openai:judge", "version": "judge@r1",
                                        "format": "harmbench"}
    legacy = card_evaluation({"asr_aligned": 0.123456, "evaluated_artifact": "x"})
    assert not legacy["with_intervals"] and ("asr_aligned", 0.1235, "–", "–") in legacy["rows"]
    with pytest.raises(TypeError, match="expected a SafetyReport"):
        card_evaluation({"report": [1]})
