"""Tests for the judge protocol, the built-in judges and judge names (rasa_trainer/judges/, the `--judge` options).

Model-backed judges are exercised with tiny random checkpoints built from configs and saved to a temporary
directory, with a word-level tokenizer built with `tokenizers`: nothing is downloaded.
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

from rasa_trainer.judges import (
    ClassifierJudge,
    GuardModelJudge,
    Judge,
    JudgeError,
    RefusalKeywordJudge,
    judge_from_name,
    run_judge,
)

WORDS = ("[PAD] [UNK] <s> </s> user assistant system : safe unsafe maybe how do i pick a lock sorry can not help "
         "here is the way first take tension wrench you rules no").split()
VOCAB = {w: i for i, w in enumerate(WORDS)}
PROMPTS = ["how do i pick a lock", [{"role": "system", "content": "no rules"}, {"role": "user", "content": "how"}],
           "pick a lock", "how do i", "the lock", "how"]
REPLIES = ["sorry i can not help", "here is the way", "first take the tension wrench", "no", "pick a lock", "the way"]


def word_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]" if pad else None,
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    return tok


# ---------------------------------------------------------------------------------------------------------------
# keyword judge


@pytest.mark.parametrize(
    "reply",
    [
        "I'm sorry, but I can't help with that.",
        "I can’t help with that.",  # curly apostrophe
        "I CAN'T do that",  # case
        "i cannot provide instructions for this.",
        "  **I'm sorry** but no.",  # leading whitespace and markdown
        "> As an AI, I must decline.",
        "Well. I cannot   help with that request.",  # phrase anywhere, whitespace runs collapsed
        "Ｉ ｃａｎ’ｔ help",  # full-width forms: NFKC
        "That is not appropriate for me to answer.",
    ],
)
def test_keyword_judge_refusals(reply):
    assert RefusalKeywordJudge().is_refusal(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "Sure, here is how to pick a lock: first, insert the tension wrench.",
        "Step 1: gather materials. I cannot stress enough how important gloves are.",  # bare "I cannot" mid-text
        "",  # empty: no refusal was produced, so it is not counted safe
        "   \n",
    ],
)
def test_keyword_judge_compliance_and_empty(reply):
    assert not RefusalKeywordJudge().is_refusal(reply)


def test_keyword_judge_custom_lists_are_normalised():
    judge = RefusalKeywordJudge(phrases=["NO WAY’"], prefixes=["Nope"])
    replies = ["nope.", "well, no way' jose", "I'm sorry", "sure"]
    assert judge(["a"] * 4, replies) == [True, True, False, False]
    with pytest.raises(ValueError):
        RefusalKeywordJudge(phrases=[], prefixes=[])
    with pytest.raises(ValueError):
        RefusalKeywordJudge(phrases="I'm sorry")


def test_keyword_judge_protocol_and_bad_input():
    judge = RefusalKeywordJudge()
    assert isinstance(judge, Judge) and judge.name == "keyword"
    with pytest.raises(JudgeError):
        judge(["a"], [None])
    with pytest.raises(JudgeError):
        judge(["a"], ["x", "y"])


# ---------------------------------------------------------------------------------------------------------------
# run_judge


class _FixedJudge:
    name = "fixed"

    def __init__(self, output):
        self.output = output

    def __call__(self, prompts, replies):
        if isinstance(self.output, Exception):
            raise self.output
        return self.output


def test_run_judge_passes_valid_output():
    import numpy as np

    assert run_judge(_FixedJudge([True, False]), ["a", "b"], ["x", "y"]) == [True, False]
    out = run_judge(_FixedJudge(list(np.array([True, False]))), ["a", "b"], ["x", "y"])
    assert out == [True, False] and all(type(v) is bool for v in out)
    assert run_judge(_FixedJudge(RuntimeError("never called")), [], []) == []


@pytest.mark.parametrize(
    "output, match",
    [
        ([True], "1 verdicts for 2"),
        ([True, False, True], "3 verdicts for 2"),
        ([True, None], "None"),
        ([1, 0], "expected a bool"),
        (["refused", "complied"], "expected a bool"),
        ("TF", "expected a list"),
        (None, "expected a list"),
        (RuntimeError("CUDA out of memory"), "out of memory"),
        (JudgeError("row 1: cannot parse"), "cannot parse"),
    ],
)
def test_run_judge_rejects_bad_output(output, match):
    with pytest.raises(JudgeError, match=match):
        run_judge(_FixedJudge(output), ["a", "b"], ["x", "y"])


def test_run_judge_checks_input_lengths():
    with pytest.raises(JudgeError, match="2 prompts but 1 replies"):
        run_judge(RefusalKeywordJudge(), ["a", "b"], ["x"])


# ---------------------------------------------------------------------------------------------------------------
# classifier judge


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random BERT classifier whose bias is set so that both labels occur on PROMPTS/REPLIES."""
    path = tmp_path_factory.mktemp("classifier")
    tok = word_tokenizer()
    config = AutoConfig.for_model(
        "bert", vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, initializer_range=0.5,
        id2label={0: "refusal", 1: "compliance"}, label2id={"refusal": 0, "compliance": 1},
    )
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    diffs = torch.stack([_logits(model, tok, p, r) for p, r in zip(_texts(PROMPTS), REPLIES)])
    diffs = (diffs[:, 0] - diffs[:, 1]).sort().values
    with torch.no_grad():  # threshold between the two middle examples: half refusal, half compliance
        model.classifier.bias[0] -= (diffs[2] + diffs[3]) / 2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _texts(prompts):
    """What ClassifierJudge feeds as the first text: the last user turn."""
    return [p if isinstance(p, str) else [m["content"] for m in p if m["role"] == "user"][-1] for p in prompts]


def _logits(model, tok, prompt, reply):
    with torch.no_grad():
        return model(**tok([prompt], [reply], return_tensors="pt")).logits[0]


def test_classifier_judge_matches_model_argmax(classifier_dir):
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = word_tokenizer()
    # one unpadded pair at a time: the judge's padded batches must agree
    labels = [int(_logits(model, tok, p, r).argmax()) for p, r in zip(_texts(PROMPTS), REPLIES)]
    assert set(labels) == {0, 1}
    judge = ClassifierJudge(str(classifier_dir), refusal_labels=["refusal"], batch_size=4, device="cpu")
    assert isinstance(judge, Judge) and judge.name.startswith("classifier:")
    assert judge(PROMPTS, REPLIES) == [label == 0 for label in labels]
    assert run_judge(judge, PROMPTS, REPLIES) == [label == 0 for label in labels]
    flipped = ClassifierJudge(str(classifier_dir), refusal_labels=("compliance",), batch_size=2, device="cpu")
    assert flipped(PROMPTS, REPLIES) == [label == 1 for label in labels]


def test_classifier_judge_label_errors(classifier_dir):
    with pytest.raises(ValueError, match=r"unknown: \['safe'\].*\['compliance', 'refusal'\]"):
        ClassifierJudge(str(classifier_dir), refusal_labels=["safe"], device="cpu")
    with pytest.raises(ValueError, match="every label"):
        ClassifierJudge(str(classifier_dir), refusal_labels=["refusal", "compliance"], device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        ClassifierJudge(str(classifier_dir), refusal_labels=["refusal"], batch_size=0)


def test_classifier_judge_model_failure_is_a_judge_error(classifier_dir, monkeypatch):
    judge = ClassifierJudge(str(classifier_dir), refusal_labels=["refusal"], device="cpu")

    def broken(**kwargs):
        raise RuntimeError("device-side assert")

    monkeypatch.setattr(judge, "model", broken)
    with pytest.raises(JudgeError, match="device-side assert"):
        run_judge(judge, PROMPTS, REPLIES)


# ---------------------------------------------------------------------------------------------------------------
# guard judge


def forced_guard(path, word, pad=True):
    """A tiny GPT-2 whose greedy decoding emits `word` at every step.

    The final LayerNorm is zeroed except its bias v, so every hidden state equals v; the untied LM head maps v to a
    positive logit for `word` only (all other rows are zero).
    """
    config = AutoConfig.for_model("gpt2", vocab_size=len(WORDS), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                  tie_word_embeddings=False, bos_token_id=2, eos_token_id=3,
                                  pad_token_id=0 if pad else None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        v = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.lm_head.weight.zero_()
        model.lm_head.weight[VOCAB[word]] = v
    model.save_pretrained(path)
    word_tokenizer(pad).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def guards(tmp_path_factory):
    return {word: forced_guard(tmp_path_factory.mktemp(word), word) for word in ("safe", "unsafe", "maybe")}


def test_guard_judge_parses_verdicts(guards):
    safe = GuardModelJudge(guards["safe"], device="cpu", batch_size=4, max_new_tokens=3)
    assert isinstance(safe, Judge) and safe.name.startswith("guard:")
    assert run_judge(safe, PROMPTS, REPLIES) == [True] * len(REPLIES)
    unsafe = GuardModelJudge(guards["unsafe"], device="cpu")
    assert run_judge(unsafe, PROMPTS, REPLIES) == [False] * len(REPLIES)


def test_guard_judge_without_pad_token(tmp_path):
    # Llama Guard style checkpoints ship no pad token: batching falls back to eos
    judge = GuardModelJudge(forced_guard(tmp_path, "unsafe", pad=False), device="cpu", max_new_tokens=2)
    assert judge.tokenizer.pad_token == "</s>"
    assert run_judge(judge, PROMPTS, REPLIES) == [False] * len(REPLIES)


def test_guard_judge_garbage_raises(guards):
    judge = GuardModelJudge(guards["maybe"], device="cpu", max_new_tokens=2)
    with pytest.raises(JudgeError, match=r"row 0: cannot parse the guard's answer 'maybe maybe'"):
        judge(PROMPTS, REPLIES)
    with pytest.raises(JudgeError, match="row 0"):
        run_judge(judge, PROMPTS, REPLIES)


@pytest.mark.parametrize(
    "text, verdict",
    [("safe", True), ("\n\nsafe", True), ("Safe.", True), ("unsafe\nS1", False), ("UNSAFE S2,S3", False)],
)
def test_guard_parse(guards, text, verdict):
    judge = GuardModelJudge(guards["safe"], device="cpu")
    assert judge.parse(text, 0) is verdict


@pytest.mark.parametrize("text", ["", "  ", "unsure", "saf", "It is safe", "safeunsafe"])
def test_guard_parse_garbage(guards, text):
    judge = GuardModelJudge(guards["safe"], device="cpu")
    with pytest.raises(JudgeError, match="row 7"):
        judge.parse(text, 7)


def test_guard_custom_tokens_and_conversation(guards):
    judge = GuardModelJudge(guards["safe"], safe_token="Harmless", unsafe_token="Harmful", device="cpu")
    assert judge.parse("harmless", 0) is True and judge.parse("Harmful", 0) is False
    with pytest.raises(ValueError):
        GuardModelJudge(guards["safe"], safe_token="x", unsafe_token="X")
    # the system prompt (often the attack itself) is folded into the first user turn for the guard's template
    conversation = judge._conversation(PROMPTS[1], "here is the way")
    assert conversation == [{"role": "user", "content": "no rules\n\nhow"},
                            {"role": "assistant", "content": "here is the way"}]
    assert PROMPTS[1][0] == {"role": "system", "content": "no rules"}  # input untouched


# ---------------------------------------------------------------------------------------------------------------
# judge_from_name


def test_judge_from_name(classifier_dir, guards, tmp_path):
    assert isinstance(judge_from_name("keyword"), RefusalKeywordJudge)
    with pytest.raises(ValueError, match="refusal_labels"):
        judge_from_name(str(classifier_dir))
    assert isinstance(judge_from_name(str(classifier_dir), refusal_labels=["refusal"], device="cpu"), ClassifierJudge)
    assert isinstance(judge_from_name(guards["safe"], device="cpu"), GuardModelJudge)
    with pytest.raises(ValueError, match="keyword"):
        judge_from_name(str(tmp_path / "does-not-exist"))


def test_judge_names_are_checked_without_loading(classifier_dir, guards, tmp_path, monkeypatch):
    from rasa_trainer.judges import check_judge_name

    assert check_judge_name("keyword").name == "keyword"
    assert check_judge_name(str(classifier_dir), refusal_labels=["refusal"]).name == "classifier"
    assert check_judge_name(f"classifier:{classifier_dir}", refusal_labels=["refusal"]).name == "classifier"
    assert check_judge_name(guards["safe"]).name == "guard"
    with pytest.raises(ValueError, match=r"sequence classifier with labels \['compliance', 'refusal'\]; say which"):
        check_judge_name(str(classifier_dir))
    with pytest.raises(ValueError, match=r"unknown: \['safe'\]"):
        check_judge_name(str(classifier_dir), refusal_labels=["safe"])
    with pytest.raises(ValueError, match="safe_token and unsafe_token must be two different words"):
        check_judge_name(guards["safe"], safe_token="ok", unsafe_token="OK")
    with pytest.raises(ValueError, match="the 'guard' judge takes no option 'refusal_labels'"):
        check_judge_name(guards["safe"], refusal_labels=["refusal"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        check_judge_name(str(tmp_path / "empty"))
    # ClassifierJudge itself checks the labels against the folder's config.json before loading the model
    def no_loading(*args, **kwargs):
        raise AssertionError("the classifier was loaded before its labels were checked")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=r"unknown: \['safe'\]"):
        ClassifierJudge(str(classifier_dir), refusal_labels=["safe"])


# ---------------------------------------------------------------------------------------------------------------
# the command line: every judge option is checked before any model loads, and honoured


@pytest.fixture
def no_model_loading(monkeypatch):
    import importlib

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the judge was checked")

    # import every command first: one imported while common.load_model is patched would bind the stand-in for good
    modules = [importlib.import_module(f"rasa_trainer.cli.{name}") for name in ("common", "train", "detect", "evaluate")]
    for module in modules:
        monkeypatch.setattr(module, "load_model", refuse)


def _command(name):
    import importlib

    module = importlib.import_module(f"rasa_trainer.cli.{name}")
    return lambda *argv: module.main([str(a) for a in argv])


def test_detect_judge_typo_exits_2_before_the_model_loads(tmp_path):
    """As the user types it: a typo is status 2 with a message, before the model (a folder that would not load) is
    touched and without a Hub lookup."""
    import os
    import subprocess
    import sys

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # loading it would end in a traceback, not status 2
    proc = subprocess.run(
        [sys.executable, "-m", "rasa_trainer.cli", "detect", "--model_name_or_path", str(model), "--dataset_name",
         "safety_world", "--output_dir", str(tmp_path / "out"), "--judge", "keywrod"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("rasa-trainer detect: error: --judge keywrod: unknown judge 'keywrod' (did you mean 'keyword'?): the "
            "registered judges are 'keyword', 'safety_world'") in proc.stderr
    assert "local checkpoint folder" in proc.stderr
    assert "Traceback" not in proc.stderr and "Loading" not in proc.stderr and proc.stdout == ""


def test_every_command_checks_its_judges_first(tmp_path, classifier_dir, no_model_loading):
    from rasa_trainer.cli import UsageError

    train, detect, evaluate = _command("train"), _command("detect"), _command("evaluate")
    out = tmp_path / "out"
    world = ("--model_name_or_path", "safety_world", "--output_dir", out)
    for run, flag in ((train, "--judge"), (train, "--detection_judge"), (detect, "--judge"), (evaluate, "--judge")):
        extra = ("--dataset_name", "safety_world") if run is detect else ()
        with pytest.raises(UsageError, match=f"{flag} keywrod: unknown judge 'keywrod'"):
            run(*world, *extra, flag, "keywrod")
    # a classifier without (or with wrong) refusal labels is refused before generation, from every command
    with pytest.raises(UsageError, match=r"--judge .*: .*sequence classifier with labels.*--judge_refusal_labels"):
        detect(*world, "--dataset_name", "safety_world", "--judge", classifier_dir)
    with pytest.raises(UsageError, match=r"--detection_judge .*: .*say which mean refused"):
        train(*world, "--detection_judge", classifier_dir)
    with pytest.raises(UsageError, match=r"unknown: \['safe'\]"):
        evaluate(*world, "--judge", classifier_dir, "--judge_refusal_labels", "safe")
    # refusal labels that no judge takes are refused, not ignored
    with pytest.raises(UsageError, match="--judge_refusal_labels refusal: only a classifier judge takes refusal labels"):
        detect(*world, "--dataset_name", "safety_world", "--judge_refusal_labels", "refusal")
    with pytest.raises(UsageError, match="only a classifier judge takes refusal labels"):
        train(*world, "--judge", "keyword", "--judge_refusal_labels", "refusal")


def test_train_resolves_and_records_the_detection_judge(tmp_path):
    from rasa_trainer.cli import UsageError
    from rasa_trainer.cli.train import parse_args

    out = ["--output_dir", str(tmp_path / "out")]
    assert parse_args(out)[1].detection_judge == "safety_world"  # SafetyWorld data: its exact judge
    assert parse_args([*out, "--judge", "keyword"])[1].detection_judge == "keyword"
    assert parse_args([*out, "--detection_judge", "keyword"])[1].detection_judge == "keyword"
    assert parse_args([*out, "--detection_judge=keyword", "--judge", "keyword"])[1].detection_judge == "keyword"
    config = tmp_path / "run.yaml"
    config.write_text("detection_judge: keyword\nmodel_name_or_path: safety_world\n")
    script_args, args, _ = parse_args(["--config", str(config), *out])
    assert (script_args.judge, args.detection_judge) == (None, "keyword")
    with pytest.raises(UsageError, match="--judge safety_world and --detection_judge keyword disagree"):
        parse_args([*out, "--judge", "safety_world", "--detection_judge", "keyword"])


def test_train_detects_with_the_detection_judge_and_its_labels(tmp_path, classifier_dir, monkeypatch):
    from rasa_trainer.cli import train as command

    class Stop(Exception):
        pass

    seen = {}

    def detect(model, tokenizer, pairs, judge, args):
        seen.update(judge=judge, args=args)
        raise Stop

    monkeypatch.setattr(command, "load_model", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(command, "detect", detect)
    with pytest.raises(Stop):
        command.main(["--output_dir", str(tmp_path / "out"), "--skip_eval", "true", "--detection_judge",
                      str(classifier_dir), "--judge_refusal_labels", "refusal"])
    assert isinstance(seen["judge"], ClassifierJudge) and seen["judge"].refusal_ids == {0}
    assert seen["args"].detection_judge == str(classifier_dir)  # what training_args.json records
    with pytest.raises(Stop):
        command.main(["--output_dir", str(tmp_path / "out"), "--skip_eval", "true", "--detection_judge", "keyword"])
    assert isinstance(seen["judge"], RefusalKeywordJudge)
