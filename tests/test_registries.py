"""One registry per extension point: selection policies (``rasa_trainer.detection.policies``), judges
(``rasa_trainer.judges.registry``) and scoring-rule kinds (``rasa_trainer.moe.discovery``). Registering an
implementation makes it reachable by name everywhere the names are read (config validation, CLI choices,
``judge_from_name``, router identification); an unknown name is an error that lists the registered ones. Each test
registers into a copy of the registry, so the process's registries are left as they were."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from rasa_trainer.detection import policies
from rasa_trainer.detection.selection import SelectionConfig, select_experts
from rasa_trainer.detection.statistics import ExpertStatistics, top_ranked
from rasa_trainer.judges import registry
from rasa_trainer.moe import discovery

# ------------------------------------------------------------------------------------------------------------ policies


@pytest.fixture
def policy_registry(monkeypatch):
    monkeypatch.setattr(policies, "POLICY_REGISTRY", dict(policies.POLICY_REGISTRY))
    return policies.POLICY_REGISTRY


def rd_statistics(rd: torch.Tensor) -> ExpertStatistics:
    """Statistics whose risk difference is ``rd`` exactly (10 tokens per class, anchors at rate 0.3)."""
    stats = ExpertStatistics(*rd.shape)
    stats.anchor_counts += 3
    stats.adversarial_counts += (3 + rd * 10).round().long()
    stats.totals += torch.tensor([10, 10, 0, 0, 1])
    return stats


RD = torch.tensor([[0.5, 0.1, -0.2, 0.3], [0.4, -0.1, 0.2, 0.0]])


def register_last_layer_topk():
    @policies.register_policy("last_layer_topk", k_pool="layer")
    def last_layer_topk(stats, config):
        """The K experts of highest RD in the last MoE layer."""
        mask = torch.zeros(stats.num_layers, stats.num_experts, dtype=torch.bool)
        rd = stats.risk_difference()
        mask[-1, top_ranked(rd[-1], config.resolve_k(stats.num_experts), config.threshold)] = True
        return mask

    return last_layer_topk


def test_a_registered_policy_is_reachable_everywhere(policy_registry, tmp_path):
    import rasa_trainer.detection as detection
    import rasa_trainer.detection.selection as selection
    from rasa_trainer.cli.common import ModelArguments, parse
    from rasa_trainer.cli.detect import DetectionArguments
    from rasa_trainer.training.config import SELECTION_POLICIES, RASAConfig

    register_last_layer_topk()
    # the names: every compatibility tuple and every list of choices reads the registry
    for names in (selection.POLICIES, detection.POLICIES, SELECTION_POLICIES, policies.POLICY_NAMES):
        assert "last_layer_topk" in names and list(names)[-1] == "last_layer_topk"
    # the selection
    config = SelectionConfig("last_layer_topk", num_experts=0.5)
    assert config.pool(2, 4) == 4 and config.k(2, 4) == 2 and config.vote_k(2, 4) is None
    mask = select_experts(rd_statistics(RD), config)
    assert mask.nonzero().tolist() == [[1, 0], [1, 2]]
    # RASAConfig and both commands' choices
    args = RASAConfig(output_dir=str(tmp_path), sce_policy="last_layer_topk", report_to="none", use_cpu=True)
    assert args.sce_policy == "last_layer_topk"
    detect_args, _ = parse((DetectionArguments, ModelArguments), ["--policy", "last_layer_topk"], "rasa-trainer detect")
    assert detect_args.policy == "last_layer_topk"
    from rasa_trainer.cli.train import parse_args

    _, train_args, _ = parse_args(["--output_dir", str(tmp_path), "--sce_policy", "last_layer_topk"])
    assert train_args.sce_policy == "last_layer_topk"


def test_an_unknown_policy_lists_the_registered_ones(policy_registry, tmp_path, capsys):
    from rasa_trainer.cli.common import ModelArguments, parse
    from rasa_trainer.cli.detect import DetectionArguments
    from rasa_trainer.training.config import RASAConfig

    register_last_layer_topk()
    with pytest.raises(ValueError, match=r"policy='lowest' is not a registered.*global_topk.*random, last_layer_topk"):
        SelectionConfig("lowest")
    with pytest.raises(ValueError, match=r"sce_policy='lowest' is not one of \[.*'random', 'last_layer_topk'\]"):
        RASAConfig(output_dir=str(tmp_path), sce_policy="lowest", report_to="none", use_cpu=True)
    with pytest.raises(SystemExit):
        parse((DetectionArguments, ModelArguments), ["--policy", "lowest"], "rasa-trainer detect")
    assert "invalid choice: 'lowest'" in capsys.readouterr().err


def test_policy_registration_errors(policy_registry):
    with pytest.raises(ValueError, match="'global_topk' is already registered"):
        policies.register_policy("global_topk")(lambda stats, config: None)
    with pytest.raises(ValueError, match="k_pool"):
        policies.register_policy("odd", k_pool="block")

    @policies.register_policy("broken")
    def broken(stats, config):
        return torch.ones(stats.num_layers * stats.num_experts, dtype=torch.bool)

    with pytest.raises(TypeError, match=r"policy 'broken' returned torch.bool \(8,\); a policy returns a bool mask"):
        select_experts(rd_statistics(RD), SelectionConfig("broken"))


def test_builtin_policies_declare_how_k_is_counted():
    assert policies.get_policy("per_layer_topk").k_pool == "layer"
    assert policies.get_policy("per_layer_top_p").k_pool is None
    assert SelectionConfig("per_layer_top_p").k(2, 4) is None
    assert SelectionConfig("batch_union", num_experts=3).vote_k(2, 4) == 3
    assert SelectionConfig("global_topk", num_experts=3).vote_k(2, 4) is None


# ------------------------------------------------------------------------------------------------------------ judges


@pytest.fixture
def judge_registry(monkeypatch):
    monkeypatch.setattr(registry, "JUDGE_KINDS", dict(registry.JUDGE_KINDS))
    return registry.JUDGE_KINDS


class AlwaysRefuses:
    """Every reply is a refusal (a test judge)."""

    name = "always_refuses"

    def __call__(self, prompts, replies):
        return [True] * len(replies)


class ToyCheckpointJudge:
    """A judge read from a toy checkpoint folder."""

    def __init__(self, model_name_or_path, threshold=0.5):
        self.name, self.threshold = f"toy:{model_name_or_path}", threshold

    def __call__(self, prompts, replies):
        return [len(r) < 10 for r in replies]


def toy_checkpoint(folder, architecture="ToyJudgeModel"):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return str(folder)


def test_a_registered_judge_is_reachable_by_name_everywhere(judge_registry):
    from rasa_trainer.cli.common import build_judge, check_judge
    from rasa_trainer.judges import check_judge_name, judge_from_name, judge_names

    registry.register_judge("always_refuses")(AlwaysRefuses)
    assert "always_refuses" in judge_names() and "always_refuses" in judge_names(from_checkpoint=False)
    assert check_judge_name("always_refuses").build is AlwaysRefuses
    assert isinstance(judge_from_name("always_refuses"), AlwaysRefuses)
    check_judge("always_refuses")  # the command line's check, before any model loads
    assert isinstance(build_judge("always_refuses"), AlwaysRefuses)
    with pytest.raises(ValueError, match="takes no option 'refusal_labels'; it takes none"):
        judge_from_name("always_refuses", refusal_labels=["safe"])


def test_a_registered_checkpoint_kind_is_read_from_the_folder(judge_registry, tmp_path):
    from rasa_trainer.judges import judge_from_name, judge_kind

    folder = toy_checkpoint(tmp_path / "toy")
    with pytest.raises(ValueError, match=r"cannot tell what kind of judge .*\['ToyJudgeModel'\].*classifier .*guard"):
        judge_from_name(folder)
    registry.register_judge("toy", checkpoint=lambda c: "ToyJudgeModel" in c.architectures)(ToyCheckpointJudge)
    judge = judge_from_name(folder, threshold=0.25)
    assert isinstance(judge, ToyCheckpointJudge) and judge.name == f"toy:{folder}" and judge.threshold == 0.25
    assert judge_kind(f"toy:{folder}").name == "toy"  # the explicit form, as judges name themselves
    with pytest.raises(ValueError, match="the 'toy' judge takes no option 'refusal_labels'; it takes threshold"):
        judge_from_name(folder, refusal_labels=["x"])
    with pytest.raises(ValueError, match="'toy' is a kind of judge read from a checkpoint"):
        judge_from_name("toy")
    # two kinds claiming one checkpoint: refused, naming both; the explicit form decides
    registry.register_judge("toy2", checkpoint=lambda c: True)(ToyCheckpointJudge)
    with pytest.raises(ValueError, match=r"fits several kinds of judge \(toy, toy2\); name one, e.g. 'toy:"):
        judge_from_name(folder)
    assert judge_kind(f"toy2:{folder}").name == "toy2"


def test_an_unknown_judge_lists_the_registered_ones_without_a_hub_lookup(judge_registry, monkeypatch):
    from rasa_trainer.judges import check_judge_name, judge_from_name

    registry.register_judge("always_refuses")(AlwaysRefuses)

    def no_hub(*args, **kwargs):
        raise AssertionError("a judge name was looked up on the Hub")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_hub)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", no_hub)
    for check in (check_judge_name, judge_from_name):
        with pytest.raises(ValueError, match=r"unknown judge 'keywrod' \(did you mean 'keyword'\?\): the registered "
                                             r"judges are 'keyword', 'safety_world', 'openai', 'always_refuses'; .*local "
                                             r"checkpoint folder"):
            check("keywrod")
        with pytest.raises(ValueError, match=r"unknown judge './guard'.*: no such folder"):
            check("./guard")


def test_a_hub_judge_is_checked_from_its_config_before_anything_loads(judge_registry, monkeypatch, tmp_path):
    """``--judge owner/name`` (Llama Guard, the HarmBench classifier as users name them): only the repository's
    config.json is fetched to tell the kind and check the options; the judge is then built from the repository id. A
    repository that cannot be reached is a ValueError naming it, before any model loads."""
    import json

    from rasa_trainer.judges import check_judge_name, judge_kind

    cache = tmp_path / "hub" / "owner--classifier"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text(json.dumps({"architectures": ["RobertaForSequenceClassification"],
                                                   "id2label": {"0": "compliance", "1": "refusal"}}))
    fetched = []

    def hf_hub_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        if repo_id != "owner/classifier":
            raise OSError(f"{repo_id} is not a repository")
        return str(cache / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)
    assert judge_kind("owner/classifier").name == "classifier"
    check_judge_name("owner/classifier", refusal_labels=["refusal"])
    with pytest.raises(ValueError, match=r"refusal"):
        check_judge_name("owner/classifier", refusal_labels=["refused"])  # not one of its labels
    assert fetched and set(fetched) == {("owner/classifier", "config.json")}
    with pytest.raises(ValueError, match=r"judge 'owner/typo' .*could not be fetched from the Hub \(OSError: "
                                         r"owner/typo is not a repository\).*hf download owner/typo"):
        check_judge_name("owner/typo")


def test_judge_registration_errors(judge_registry):
    with pytest.raises(ValueError, match="'keyword' is already registered"):
        registry.register_judge("keyword")(AlwaysRefuses)
    with pytest.raises(ValueError, match="without ':'"):
        registry.register_judge("a:b")
    registry.register_judge("not_a_judge")(lambda: object())
    with pytest.raises(TypeError, match="lacks the Judge protocol"):
        registry.judge_from_name("not_a_judge")


def test_builtin_judges_are_registered():
    from rasa_trainer.judges import ClassifierJudge, GuardModelJudge, RefusalKeywordJudge, judge_from_name
    from rasa_trainer.safety_world import SafetyWorldJudge

    kinds = registry.JUDGE_KINDS
    assert kinds["keyword"].build is RefusalKeywordJudge and not kinds["keyword"].from_checkpoint
    assert kinds["classifier"].build is ClassifierJudge and kinds["guard"].build is GuardModelJudge
    assert kinds["classifier"].from_checkpoint and kinds["guard"].from_checkpoint
    assert isinstance(judge_from_name("safety_world"), SafetyWorldJudge)


# ------------------------------------------------------------------------------------------------------------ rules


@pytest.fixture
def rule_registry(monkeypatch):
    monkeypatch.setattr(discovery, "SCORING_RULES", dict(discovery.SCORING_RULES))
    discovery.clear_rule_cache()
    yield discovery.SCORING_RULES
    discovery.clear_rule_cache()


def softplus_router(self, hidden_states):
    """An OLMoE router scoring experts with softplus, renormalised over the top-k: no built-in rule."""
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    top, indices = torch.topk(F.softplus(logits), self.top_k, dim=-1)
    return logits, top / top.sum(dim=-1, keepdim=True), indices


def test_a_registered_scoring_rule_identifies_a_new_router(rule_registry, monkeypatch):
    model = tiny_model("olmoe")
    router_cls = type(discovery.moe_layers(model)[0].router)
    monkeypatch.setattr(router_cls, "forward", softplus_router)
    with pytest.raises(ValueError, match="follow no known scoring rule"):
        discovery.moe_layers(model)
    discovery.register_scoring_rule(discovery.ElementwiseRule("softplus", F.softplus))
    assert "softplus" in discovery.ELEMENTWISE_SCORES
    layers = discovery.moe_layers(model)
    hidden = torch.randn(20, model.config.hidden_size)
    for layer in layers:
        assert (layer.scoring, layer.rule.normalize, layer.rule.scale) == ("softplus", True, 1.0)
        first, weights, indices = layer.router(hidden)
        torch.testing.assert_close(layer.rule.topk_weights(first, indices), weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.router_probabilities(first).sum(-1), torch.ones(20))


def test_a_rule_kind_is_one_class(rule_registry):
    @discovery.register_scoring_rule
    class Doubled(discovery.RuleKind):
        """Softmax top-k weights times two, never renormalised (a test kind)."""

        name = "doubled"

        def topk_weights(self, rule, scores, indices):
            return scores.softmax(dim=-1).gather(-1, indices) * 2

        def identify(self, first, weights, indices, first_output, jitter_eps):
            return None

    assert list(rule_registry)[-1] == "doubled"
    rule = discovery.ScoringRule("doubled")
    logits = torch.randn(5, 8)
    indices = torch.topk(logits, 2).indices
    assert torch.equal(rule.topk_weights(logits, indices), logits.softmax(-1).gather(-1, indices) * 2)
    assert torch.equal(rule.probabilities(logits), logits.softmax(-1))  # RuleKind's default


def test_an_unknown_rule_kind_lists_the_registered_ones(rule_registry):
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="unknown scoring rule 'cubic'; registered: softmax, sigmoid, sqrtsoftplus, "
                                         "sparsemixer"):
        discovery.ScoringRule("cubic").topk_weights(logits, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown scoring rule 'cubic'"):
        discovery.ScoringRule("cubic").probabilities(logits)
    with pytest.raises(ValueError, match="'softmax' is already registered"):
        discovery.register_scoring_rule(discovery.SoftmaxRule)
