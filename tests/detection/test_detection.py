"""Safety-Critical Expert detection on tiny random MoE models with a deterministic judge."""

import csv
import json
import random
import shutil
import struct

import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_model, word_text
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.data.contract import DatasetContractError, as_messages
from rasa_trainer.detection.detect import PairCounts, detect_safety_critical_experts, pair_outcome
from rasa_trainer.detection.generation import generate_replies
from rasa_trainer.detection.progress import DetectionProgressError
from rasa_trainer.judges import JudgeError
from rasa_trainer.moe.routing import Routing
from rasa_trainer.detection.selection import (
    CSV_COLUMNS,
    SCHEMA_VERSION,
    EmptySelectionError,
    SafetyCriticalExperts,
    SelectionConfig,
    select_experts,
)
from rasa_trainer.detection.statistics import ExpertStatistics, layer_expert_counts, top_ranked

MAX_NEW = 6


class MarkerJudge:
    """Refused exactly when the last user turn of the context holds the word ``refuse`` (replies are ignored)."""

    name = "marker"

    def __call__(self, prompts, replies):
        return ["refuse" in as_messages(p)[-1]["content"].split() for p in prompts]


def marker(refused: bool) -> str:
    return "refuse" if refused else "go"


def pair_rows(outcomes=None, seed=0, attacks=("roleplay", "cipher")):
    """Rows with multi-turn adversarial prompts (system + history) and plain anchors. ``outcomes`` lists per row
    ``(anchor_refused, attack_refused)``; by default every pair is a successful jailbreak of a refused anchor."""
    rng = random.Random(seed)
    outcomes = outcomes or [(True, False)] * 6
    rows = []
    for i, (anchor_refused, attack_refused) in enumerate(outcomes):
        history = [{"role": "system", "content": word_text(rng)}] if i % 2 else []
        history += [{"role": "user", "content": word_text(rng)}, {"role": "assistant", "content": word_text(rng)}]
        row = {
            "prompt": history + [{"role": "user", "content": f"{word_text(rng)} {marker(attack_refused)}"}],
            "anchor_prompt": f"{word_text(rng)} {marker(anchor_refused)}",
        }
        if attacks[i % len(attacks)] is not None:
            row["attack"] = attacks[i % len(attacks)]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def model():
    return tiny_model("olmoe")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def detect(model, tokenizer, rows, **kwargs):
    kwargs = {"judge": MarkerJudge(), "batch_size": 4, "max_new_tokens": MAX_NEW, "progress": False, **kwargs}
    return detect_safety_critical_experts(model, tokenizer, rows, **kwargs)


def brute_force(model, tokenizer, rows):
    """Counts, token totals and probability sums from routings recorded one pair at a time, with Python loops."""
    layers = moe_layers(model)
    L, E = len(layers), layers[0].num_experts
    judge = MarkerJudge()
    counts = {c: [[0] * E for _ in range(L)] for c in ("adversarial", "anchor")}
    probs = {c: [[0.0] * E for _ in range(L)] for c in ("adversarial", "anchor")}
    tokens = {"adversarial": 0, "anchor": 0}
    for row in rows:
        contexts = {"adversarial": as_messages(row["prompt"]), "anchor": as_messages(row["anchor_prompt"])}
        batches = {c: next(generate_replies(model, tokenizer, [ctx], batch_size=1, max_new_tokens=MAX_NEW,
                                            with_routing=True, progress=False)) for c, ctx in contexts.items()}
        refused = {c: judge([contexts[c]], batches[c].replies)[0] for c in contexts}
        if not refused["anchor"] or refused["adversarial"]:
            continue
        for c, batch in batches.items():
            routing = batch.routing
            for t in range(routing.num_tokens):
                tokens[c] += 1
                for l in range(L):
                    for e in routing.indices[l][t].tolist():
                        counts[c][l][e] += 1
                    for e in range(E):
                        probs[c][l][e] += float(routing.probabilities[l][t, e])
    return counts, tokens, probs


# ----------------------------------------------------------------------------------------------------------------
# statistics against brute force


def test_risk_difference_equals_brute_force_count(model, tokenizer):
    rows = pair_rows([(True, False), (True, True), (True, False), (False, False), (True, False), (False, True),
                      (True, False)])
    result = detect(model, tokenizer, rows, batch_size=3)
    counts, tokens, probs = brute_force(model, tokenizer, rows)
    stats = result.statistics
    assert stats.adversarial_tokens == tokens["adversarial"] > 0 and stats.anchor_tokens == tokens["anchor"] > 0
    assert stats.adversarial_counts.tolist() == counts["adversarial"]
    assert stats.anchor_counts.tolist() == counts["anchor"]
    L, E = stats.num_layers, stats.num_experts
    rd = [[counts["adversarial"][l][e] / tokens["adversarial"] - counts["anchor"][l][e] / tokens["anchor"]
           for e in range(E)] for l in range(L)]
    torch.testing.assert_close(stats.risk_difference(), torch.tensor(rd, dtype=torch.float64))
    mean_adv, mean_anc = stats.mean_probabilities()
    for mean, c in ((mean_adv, "adversarial"), (mean_anc, "anchor")):
        torch.testing.assert_close(mean, torch.tensor(probs[c], dtype=torch.float64) / tokens[c])
    for expert in result.experts:  # the JSON values are those of the brute-force count
        assert expert.risk_difference == pytest.approx(rd[expert.moe_layer][expert.expert])
        assert expert.rate_adversarial == pytest.approx(counts["adversarial"][expert.moe_layer][expert.expert]
                                                        / tokens["adversarial"])
    # global top-K with K = 12.5% of 16 routed experts = 2, threshold 0
    expected = sorted(((l, e) for l in range(L) for e in range(E) if rd[l][e] > 0),
                      key=lambda le: -rd[le[0]][le[1]])[:2]
    assert [(x.moe_layer, x.expert) for x in result.experts] == expected


def test_batched_and_one_at_a_time_give_the_same_statistics(model, tokenizer):
    rows = pair_rows(seed=1)
    batched = detect(model, tokenizer, rows, batch_size=6)
    single = detect(model, tokenizer, rows, batch_size=1)
    for name in ("adversarial_counts", "anchor_counts"):
        assert torch.equal(getattr(batched.statistics, name), getattr(single.statistics, name))
    assert batched.tokens == single.tokens
    torch.testing.assert_close(batched.statistics.adversarial_prob_sum, single.statistics.adversarial_prob_sum,
                               rtol=1e-5, atol=1e-5)
    assert batched.experts == single.experts
    assert single.statistics.num_batches == 6 and batched.statistics.num_batches == 1


def test_hf_dataset_input_with_multi_turn_prompts(model, tokenizer):
    from datasets import Dataset

    rows = pair_rows(seed=2)
    from_list = detect(model, tokenizer, rows)
    from_dataset = detect(model, tokenizer, Dataset.from_list(rows))
    assert from_list.experts == from_dataset.experts
    assert torch.equal(from_list.statistics.adversarial_counts, from_dataset.statistics.adversarial_counts)


def test_layer_expert_counts_match_a_loop():
    g = torch.Generator().manual_seed(0)
    L, E, k, N = 3, 10, 3, 50
    indices = [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]) for _ in range(L)]
    expected = torch.zeros(L, E, dtype=torch.int64)
    for l in range(L):
        for row in indices[l].tolist():
            for e in row:
                expected[l, e] += 1
    assert torch.equal(layer_expert_counts(indices, E), expected)
    assert torch.equal(layer_expert_counts([i.to(torch.int16) for i in indices], E), expected)
    for shift in (1, -1):  # one index out of range in the middle layer, above or below
        bad = [i.clone() for i in indices]
        bad[1][3, 0] = E if shift > 0 else -1
        for dtype in (torch.int64, torch.int16):
            with pytest.raises(ValueError, match="outside"):
                layer_expert_counts([b.to(dtype) for b in bad], E)
    with pytest.raises(ValueError, match="outside"):
        layer_expert_counts([indices[0] - 1] + indices[1:], E)


def test_top_ranked_breaks_ties_by_position():
    scores = torch.tensor([0.5, 1.0, 0.5, 0.5, 0.2, 0.5])
    assert top_ranked(scores, 2).tolist() == [0, 1]
    assert top_ranked(scores, 4).tolist() == [0, 1, 2, 3]
    assert top_ranked(scores, 3, threshold=0.6).tolist() == [1]
    assert top_ranked(scores, 10, threshold=0.3).tolist() == [0, 1, 2, 3, 5]


def routing_of(rows_per_layer):
    """A Routing from per-layer lists of top-k rows (weights unused by the statistics)."""
    indices = [torch.tensor(rows, dtype=torch.int16) for rows in rows_per_layer]
    return Routing(indices, [torch.ones(i.shape) for i in indices])


def test_update_merge_and_per_batch_votes():
    # batch 1: expert 0 of layer 0 is the jailbreak expert; batch 2: expert 3 of layer 1
    b1 = (routing_of([[[0, 1]], [[0, 1]]]), routing_of([[[1, 2]], [[0, 1]]]))
    b2 = (routing_of([[[1, 2], [1, 2]], [[3, 2], [3, 2]]]), routing_of([[[1, 2]], [[0, 2]]]))
    whole = ExpertStatistics(2, 4, vote_k=1)
    rd1 = whole.update(*b1)
    assert rd1[0].tolist() == [1.0, 0.0, -1.0, 0.0] and rd1[1].tolist() == [0.0] * 4
    whole.update(*b2)
    assert whole.batch_votes.nonzero().tolist() == [[0, 0], [1, 3]]
    assert whole.adversarial_tokens == 3 and whole.anchor_tokens == 2
    halves = ExpertStatistics(2, 4, vote_k=1)
    halves.update(*b1)
    other = ExpertStatistics(2, 4, vote_k=1)
    other.update(*b2)
    halves.merge(other)
    for name in ("adversarial_counts", "anchor_counts", "batch_votes", "totals", "batch_rd_sum"):
        assert torch.equal(getattr(halves, name), getattr(whole, name))
    mean, std = whole.batch_risk_difference()
    assert mean[0, 0] == pytest.approx(0.5) and std[0, 0] == pytest.approx(0.5)
    restored = ExpertStatistics.from_state_dict(json.loads(json.dumps(whole.state_dict())))
    assert torch.equal(restored.risk_difference(), whole.risk_difference())
    union = select_experts(whole, SelectionConfig("batch_union", num_experts=1))
    assert union.nonzero().tolist() == [[0, 0], [1, 3]]
    with pytest.raises(ValueError, match="vote_k"):
        select_experts(whole, SelectionConfig("batch_union", num_experts=2))


# ----------------------------------------------------------------------------------------------------------------
# selection policies on known risk differences

RD = torch.tensor([[0.5, 0.1, -0.2, 0.3], [0.4, 0.0, 0.2, -0.1]], dtype=torch.float64)


def stats_with_rd(rd=RD, kept=1):
    """Statistics whose RD is ``rd`` exactly: 10 tokens per class, anchors at rate 0.3."""
    stats = ExpertStatistics(*rd.shape)
    stats.anchor_counts += 3
    stats.adversarial_counts += (3 + rd * 10).round().long()
    stats.totals += torch.tensor([10, 10, 0, 0, 1])
    return stats


def selected(mask):
    return [tuple(x) for x in mask.nonzero().tolist()]


@pytest.mark.parametrize("config, expected", [
    (SelectionConfig(), [(0, 0)]),  # 12.5% of 8 experts = 1
    (SelectionConfig(num_experts=3), [(0, 0), (0, 3), (1, 0)]),
    (SelectionConfig(num_experts=0.5, threshold=0.25), [(0, 0), (0, 3), (1, 0)]),  # K = 4, threshold leaves 3
    (SelectionConfig(num_experts=7), [(0, 0), (0, 1), (0, 3), (1, 0), (1, 2)]),  # only 5 have RD > 0
    (SelectionConfig("per_layer_topk", num_experts=2), [(0, 0), (0, 3), (1, 0), (1, 2)]),
    (SelectionConfig("per_layer_topk", num_experts=0.5, threshold=0.25), [(0, 0), (0, 3), (1, 0)]),
    (SelectionConfig("per_layer_top_p", top_p_experts=0.5), [(0, 0), (1, 0)]),  # shares .56 and .67
    (SelectionConfig("per_layer_top_p", top_p_experts=0.6), [(0, 0), (0, 3), (1, 0)]),
    (SelectionConfig("per_layer_top_p", top_p_experts=1.0), [(0, 0), (0, 1), (0, 3), (1, 0), (1, 2)]),
    (SelectionConfig("per_layer_top_p", top_p_experts=1.0, threshold=0.15), [(0, 0), (0, 3), (1, 0), (1, 2)]),
])
def test_selection_policies(config, expected):
    assert selected(select_experts(stats_with_rd(), config)) == expected


def test_random_policy_is_seeded_and_ignores_rd():
    stats = stats_with_rd(-RD.abs())  # no positive RD at all: only the random ablation selects anything
    first = select_experts(stats, SelectionConfig("random", num_experts=3, seed=5))
    assert torch.equal(first, select_experts(stats, SelectionConfig("random", num_experts=3, seed=5)))
    expected = torch.randperm(8, generator=torch.Generator().manual_seed(5))[:3].sort().values
    assert first.view(-1).nonzero().view(-1).tolist() == expected.tolist()
    seeds = {tuple(selected(select_experts(stats, SelectionConfig("random", num_experts=3, seed=s)))) for s in range(6)}
    assert len(seeds) > 1


def test_empty_selection_error_shows_the_pair_statistics():
    pairs = {"total": 5, "kept": 2, "dropped": 3, "dropped_by_reason": {"anchor_complied": 1, "attack_refused": 2,
                                                                        "both": 0}, "by_attack": {}}
    with pytest.raises(EmptySelectionError, match=r"(?s)2 kept.*attack_refused.*max RD = -0\.1000.*threshold"):
        select_experts(stats_with_rd(-RD.abs() - 0.1), SelectionConfig(), pairs=pairs)
    with pytest.raises(EmptySelectionError, match="no pair survived"):
        select_experts(stats_with_rd(), SelectionConfig("random"), pairs={**pairs, "kept": 0})


def test_selection_config_errors():
    with pytest.raises(ValueError, match="policy"):
        SelectionConfig("top")
    with pytest.raises(ValueError, match="whole count"):
        SelectionConfig(num_experts=2.5)
    with pytest.raises(ValueError, match="only 8"):
        select_experts(stats_with_rd(), SelectionConfig(num_experts=9))
    with pytest.raises(ValueError, match="top_p_experts"):
        SelectionConfig("per_layer_top_p", top_p_experts=0.0)


# ----------------------------------------------------------------------------------------------------------------
# pairs, judges, dataset contract


def test_pair_filter_counts_by_reason_and_attack(model, tokenizer):
    outcomes = [(True, False), (False, False), (True, True), (False, True), (True, False), (True, True),
                (False, False), (True, False)]
    rows = pair_rows(outcomes, attacks=("roleplay", "cipher", None, "roleplay"))
    result = detect(model, tokenizer, rows, batch_size=3)
    reasons = [pair_outcome(a, b) for a, b in outcomes]
    assert reasons == ["kept", "anchor_complied", "attack_refused", "both", "kept", "attack_refused",
                       "anchor_complied", "kept"]
    assert result.pairs["total"] == 8 and result.pairs["kept"] == 3 and result.pairs["dropped"] == 5
    assert result.pairs["dropped_by_reason"] == {"anchor_complied": 2, "attack_refused": 2, "both": 1}
    assert result.pairs["by_attack"] == {
        "cipher": {"total": 2, "kept": 0, "anchor_complied": 1, "attack_refused": 1, "both": 0},
        "roleplay": {"total": 4, "kept": 3, "anchor_complied": 0, "attack_refused": 0, "both": 1},
        "unknown": {"total": 2, "kept": 0, "anchor_complied": 1, "attack_refused": 1, "both": 0},
    }
    counts = PairCounts()
    for i, reason in enumerate(reasons[:4]):
        counts.add(rows[i].get("attack"), reason)
    merged = PairCounts().merge(counts).merge(PairCounts.from_dict(counts.to_dict()))
    assert merged.total == 8 and merged.kept == 2


def test_no_kept_pair_raises_with_counts(model, tokenizer):
    rows = pair_rows([(False, False), (True, True), (False, True)])
    with pytest.raises(EmptySelectionError, match=r"(?s)no pair survived.*0 kept.*'anchor_complied': 1"):
        detect(model, tokenizer, rows)


def test_default_judge_is_the_keyword_judge(model, tokenizer):
    # random tiny models never write a refusal: every anchor "complied", nothing is kept, nothing counted as safe
    with pytest.raises(EmptySelectionError, match="'anchor_complied': 2"):
        detect(model, tokenizer, pair_rows([(True, False)] * 2), judge=None)


def test_a_failing_judge_raises(model, tokenizer):
    class Broken:
        name = "broken"

        def __call__(self, prompts, replies):
            raise RuntimeError("guard model out of memory")

    class Short:
        name = "short"

        def __call__(self, prompts, replies):
            return [True]

    with pytest.raises(JudgeError, match="out of memory"):
        detect(model, tokenizer, pair_rows(), judge=Broken())
    with pytest.raises(JudgeError, match="verdicts"):
        detect(model, tokenizer, pair_rows(), judge=Short())


def test_pairs_are_validated_before_any_model_work(tokenizer):
    class Untouchable(torch.nn.Module):
        def __getattr__(self, name):
            raise AssertionError(f"the model was used ({name}) before the dataset was validated")

    rows = pair_rows()
    del rows[2]["anchor_prompt"]
    with pytest.raises(DatasetContractError, match="row 2"):
        detect_safety_critical_experts(Untouchable(), tokenizer, rows, judge=MarkerJudge())


# ----------------------------------------------------------------------------------------------------------------
# artifacts, JSON round trip, validation


def test_artifacts_and_json_round_trip(model, tokenizer, tmp_path):
    result = detect(model, tokenizer, pair_rows(seed=3), policy="per_layer_topk", num_experts=2, output_dir=tmp_path)
    assert len(result) == sum(len(v) for v in result.by_moe_layer().values())
    data = json.loads((tmp_path / "safety_critical_experts.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["model"] == {"name_or_path": None, "revision": None, "model_type": "olmoe", "num_moe_layers": 2,
                             "num_experts": 8, "top_k": 2, "moe_layer_indices": [0, 1]}
    assert data["selection"]["policy"] == "per_layer_topk" and data["selection"]["k"] == 2
    assert data["judge"] == "marker" and data["generation"]["max_new_tokens"] == MAX_NEW
    assert data["pairs"]["kept"] == 6 and data["package_version"]
    assert set(data["experts"][0]) == {"layer", "moe_layer", "expert", "risk_difference", "rate_adversarial",
                                       "rate_anchor"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files

    with open(tmp_path / "expert_stats.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 8 and tuple(table[0]) == CSV_COLUMNS
    assert sum(int(r["selected"]) for r in table) == len(result)
    row = next(r for r in table if (int(r["moe_layer"]), int(r["expert"])) == (1, 3))
    assert float(row["risk_difference"]) == pytest.approx(float(result.statistics.risk_difference()[1, 3]), abs=1e-5)

    png = (tmp_path / "risk_difference.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100

    for source in (tmp_path, tmp_path / "safety_critical_experts.json"):
        loaded = SafetyCriticalExperts.load(source)
        assert loaded == result and loaded.statistics is None
        assert loaded.by_moe_layer() == result.by_moe_layer()
    assert SafetyCriticalExperts.from_dict(result.to_dict()) == result
    loaded.validate(model)
    loaded.save(tmp_path / "copy")  # no statistics after loading: JSON only
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["safety_critical_experts.json"]


def test_schema_and_validation_errors(model, tokenizer, tmp_path):
    result = detect(model, tokenizer, pair_rows(seed=4), num_experts=4)
    data = result.to_dict()
    with pytest.raises(ValueError, match="schema_version 99"):
        SafetyCriticalExperts.from_dict({**data, "schema_version": 99})
    with pytest.raises(ValueError, match="schema_version None"):
        SafetyCriticalExperts.from_dict({k: v for k, v in data.items() if k != "schema_version"})
    bad = json.loads(json.dumps(data))
    bad["experts"][0]["expert"] = 8
    with pytest.raises(ValueError, match="outside the recorded shape"):
        SafetyCriticalExperts.from_dict(bad)
    with pytest.raises(FileNotFoundError):
        SafetyCriticalExperts.load(tmp_path)

    with pytest.raises(ValueError, match=r"(?s)experts per MoE layer: model \[4\].*Run detection on this model"):
        result.validate(tiny_model("olmoe", num_experts=4))
    with pytest.raises(ValueError, match="top-k: model"):
        result.validate(tiny_model("olmoe", num_experts_per_tok=3))
    with pytest.raises(ValueError, match="3 MoE layers"):
        result.validate(tiny_model("olmoe", num_hidden_layers=3))
    with pytest.raises(ValueError, match="model_type is 'qwen3_moe'"):
        result.validate(tiny_model("qwen3_moe"))


# ----------------------------------------------------------------------------------------------------------------
# sharding over ranks


def test_shards_merge_to_the_single_process_result(model, tokenizer, monkeypatch):
    """Rank r of 2 takes rows r::2; summing both ranks' statistics gives the single-process statistics."""
    import rasa_trainer.detection.detect as detection

    rows = pair_rows([(True, False), (False, False), (True, False), (True, True), (True, False)])
    whole = detect(model, tokenizer, rows, batch_size=2)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(detection, "distributed_world", lambda group=None, rank=rank: (rank, 2))
        monkeypatch.setattr(ExpertStatistics, "all_reduce", lambda self, group=None: self)
        monkeypatch.setattr(PairCounts, "all_gather", lambda self, group=None: self)
        settings = detection.GenerationSettings(batch_size=2, max_new_tokens=MAX_NEW)
        shards.append(detection.collect_expert_statistics(model, tokenizer, rows, judge=MarkerJudge(),
                                                          generation=settings, progress=False))
    assert shards[0][1].total == 3 and shards[1][1].total == 2
    stats = shards[0][0].merge(shards[1][0])
    pairs = shards[0][1].merge(shards[1][1])
    for name in ("adversarial_counts", "anchor_counts"):
        assert torch.equal(getattr(stats, name), getattr(whole.statistics, name))
    assert pairs.to_dict() == whole.pairs


def _distributed_worker(rank, init_file, rows, out_dir, result_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        result = detect(tiny_model("olmoe"), tiny_chat_tokenizer(), rows, batch_size=2, policy="random",
                        num_experts=3, output_dir=out_dir)
        state = {"result": result.to_dict(), "stats": result.statistics.state_dict()}
        (result_dir / f"rank{rank}.json").write_text(json.dumps(state))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_hold_the_identical_selection(model, tokenizer, tmp_path):
    import torch.multiprocessing as mp

    rows = pair_rows([(True, False), (False, False), (True, False), (True, False), (False, True)])
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers in each)
    mp.start_processes(_distributed_worker, args=(str(tmp_path / "init"), rows, tmp_path / "out", tmp_path), nprocs=2,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    single = detect(model, tokenizer, rows, batch_size=2, policy="random", num_experts=3)
    merged = ranks[0]["result"]
    assert merged["pairs"] == single.pairs and merged["experts"] == single.to_dict()["experts"]
    assert ranks[0]["stats"]["adversarial_counts"] == single.statistics.adversarial_counts.tolist()
    assert merged["generation"]["world_size"] == 2
    assert SafetyCriticalExperts.load(tmp_path / "out").experts == single.experts


# ----------------------------------------------------------------------------------------------------------------
# the script


def test_detect_subcommand_with_yaml_config(model, tokenizer, tmp_path, monkeypatch):
    from rasa_trainer.cli import detect as command

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for row in pair_rows(seed=5):
            f.write(json.dumps(row) + "\n")
    (tmp_path / "detect.yaml").write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ndataset_name: {tmp_path / 'pairs.jsonl'}\n"
        f"policy: per_layer_topk\nnum_experts: 1\nmax_new_tokens: {MAX_NEW}\ndtype: float32\n"
    )
    argv = ["--config", str(tmp_path / "detect.yaml"), "--output_dir", str(tmp_path / "out"), "--no_progress", "True"]
    # the keyword judge finds no refusal in a random model's replies: the command must fail loudly, with counts
    with pytest.raises(EmptySelectionError, match="no pair survived"):
        command.main(argv)
    monkeypatch.setattr(command, "build_judge", lambda name, labels=None, options=None: MarkerJudge())
    # the failed run kept its statistics, judged by the keyword judge: another judge cannot resume them
    with pytest.raises(DetectionProgressError, match=r"judge: partial detection 'keyword' .*, now 'marker'"):
        command.main(argv)
    shutil.rmtree(tmp_path / "out" / "detection_progress")
    result = command.main(argv)
    assert not (tmp_path / "out" / "detection_progress").exists()  # removed once the artifacts are written
    assert len(result) == 2 and sorted(result.by_moe_layer()) == [0, 1]
    assert SafetyCriticalExperts.load(tmp_path / "out") == result
