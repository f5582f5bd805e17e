"""Real data as its publishers ship it, through ``rasa-trainer build-pairs`` run as a user runs it (a subprocess) and
through the readers: PyRIT's template folder, WildJailbreak's pandas-written TSV, HarmBench's behaviours CSV, JSON
lines holding U+2028, hand-edited files with a broken quote, non-UTF-8 files, an output that would overwrite an input,
and templates that would render without bound. The table fixtures are written by pandas (tests/fixtures/
make_fixtures.py); the template folder copies PyRIT 1.1's layout (tests/fixtures/pyrit_templates/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fixtures.make_fixtures import HARMBENCH, WILDJAILBREAK, write_harmbench, write_wildjailbreak
from rasa_trainer.data.pairs import (
    MAX_RENDERED_CHARS,
    load_goals,
    load_template,
    load_templates,
    pairs_from_columns,
    read_table,
    write_pairs_jsonl,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PYRIT = FIXTURES / "pyrit_templates"
WILDJAILBREAK_TSV = FIXTURES / "wildjailbreak" / "train.tsv"
HARMBENCH_CSV = FIXTURES / "harmbench" / "harmbench_behaviors_text_all.csv"
ADVERSARIAL_HARMFUL = [row for row in WILDJAILBREAK if row["data_type"] == "adversarial_harmful"]


def _memory_cap():
    """Run the command under a 3 GiB address-space limit (Linux), so a template that escaped the render bounds fails
    the test instead of eating the machine's memory."""
    try:
        import resource
    except ImportError:  # not on Linux/macOS: no limit
        return
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def build_pairs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m rasa_trainer.cli build-pairs <args>`` as a user runs it."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "rasa_trainer.cli", "build-pairs", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=_memory_cap if sys.platform.startswith("linux") else None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture
def goals(tmp_path) -> Path:
    path = tmp_path / "goals.txt"
    path.write_text("pick a lock\nhotwire a car\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# PyRIT's template folder


def test_pyrit_template_folder_builds_pairs_with_one_line_per_skip_and_rename(tmp_path, goals):
    out = tmp_path / "pairs.jsonl"
    result = build_pairs("--from", "templates", "--templates", PYRIT, "--goals", goals, "--output", out)
    assert result.returncode == 0, result.stderr
    pairs = read_jsonl(out)
    attacks = sorted({p["attack"] for p in pairs})
    # colliding names told apart by their file; the other names kept as published; every goal x template
    assert attacks == sorted(["AIM", "Aligned (aligned)", "Aligned (anti_gpt)", "code nesting",
                              "Decoding Trust Stereotypes Benign System Prompt", "Few-Shot Escalation"])
    assert len(pairs) == 2 * len(attacks)
    anti = next(p for p in pairs if p["attack"] == "Aligned (anti_gpt)" and p["goal"] == "pick a lock")
    assert "opposite mode" in anti["prompt"] and anti["prompt"].endswith("first question: pick a lock")
    assert anti["anchor_prompt"] == "pick a lock"
    # multi_parameter/ templates skipped, never silently: one line names each and the variables it needs
    skip_lines = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skip_lines) == 1, result.stderr
    for fragment in ("3 template(s)", "multi_parameter/many_shot_template.yaml (examples)",
                     "multi_parameter/translator_bot.yaml (prompt_in_greek)",
                     "multi_parameter/dt_stereotypes_targeted.yaml (target_group)"):
        assert fragment in skip_lines[0]
    rename_lines = [line for line in result.stderr.splitlines() if "share names" in line]
    assert len(rename_lines) == 1 and "'Aligned' -> 'Aligned (anti_gpt)'" in rename_lines[0]
    # deterministic: a second run writes the same file
    again = tmp_path / "again.jsonl"
    assert build_pairs("--from", "templates", "--templates", PYRIT, "--goals", goals, "--output", again).returncode == 0
    assert again.read_bytes() == out.read_bytes()


def test_pyrit_folder_in_python_and_explicit_multi_parameter_file_is_an_error(caplog):
    with caplog.at_level("WARNING", logger="rasa_trainer.data.pairs"):
        templates = load_templates(PYRIT)
    assert len(templates) == 6 and len(caplog.records) == 2
    assert {t.name for t in templates} >= {"Aligned (aligned)", "Aligned (anti_gpt)"}
    # a file named on its own is what the user asked for: its missing variable is an error, not a skip
    with pytest.raises(ValueError, match=r"translator_bot\.yaml\) uses the variables \['prompt_in_greek'\]"):
        load_templates([PYRIT / "multi_parameter" / "translator_bot.yaml"])


def test_a_folder_of_only_multi_parameter_templates_is_an_error(tmp_path, goals):
    result = build_pairs("--from", "templates", "--templates", PYRIT / "multi_parameter", "--goals", goals,
                         "--output", tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert "every template needs variables other than {{ prompt }}" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


# --------------------------------------------------------------------------------------------------------------------
# WildJailbreak's TSV and HarmBench's CSV, as pandas writes them


def test_wildjailbreak_tsv_as_pandas_writes_it(tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = build_pairs("--from", "columns", "--input", WILDJAILBREAK_TSV, "--attack_name", "wildjailbreak",
                         "--completion_column", "completion", "--output", out)
    assert result.returncode == 0, result.stderr
    pairs = read_jsonl(out)
    # tabs, line breaks, doubled quotes, U+2028 and U+0085 inside cells: every pair exactly its row, in order
    assert [(p["prompt"], p["anchor_prompt"], p["completion"]) for p in pairs] == [
        (row["adversarial"], row["vanilla"], row["completion"]) for row in ADVERSARIAL_HARMFUL]
    # one pair per line for any reader: the written file splits into its rows even with str.splitlines()
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(pairs)


def test_tsv_with_pandas_index_column_and_crlf_line_ends(tmp_path):
    indexed = write_wildjailbreak(tmp_path / "indexed.tsv", index=True)
    rows = read_table(indexed)
    assert [{k: v for k, v in row.items() if k} for row in rows] == WILDJAILBREAK
    crlf = tmp_path / "crlf.tsv"
    pd.DataFrame(WILDJAILBREAK).to_csv(crlf, sep="\t", index=False, lineterminator="\r\n")
    assert read_table(crlf)[0] == WILDJAILBREAK[0]


def test_cells_over_128_kib_are_read(tmp_path):
    big = "word, \"quoted\"\tand tabbed\n" * 8000  # ~220 KiB, over the csv module's default 128 KiB cell limit
    rows = [dict(HARMBENCH[1], ContextString=big), *HARMBENCH[:1]]
    path = write_harmbench(tmp_path / "harmbench_behaviors_text_all.csv", rows)
    assert read_table(path)[0]["ContextString"] == big
    tsv = write_wildjailbreak(tmp_path / "big.tsv", [dict(ADVERSARIAL_HARMFUL[0], adversarial=big)])
    assert pairs_from_columns(tsv)[0]["prompt"] == big
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is put back after reading


def test_harmbench_behaviors_csv_as_goals(tmp_path, goals):
    assert load_goals(HARMBENCH_CSV, column="Behavior") == [row["Behavior"] for row in HARMBENCH]
    out = tmp_path / "pairs.jsonl"
    result = build_pairs("--from", "templates", "--templates", PYRIT / "aim.yaml", "--goals", HARMBENCH_CSV,
                         "--goals_column", "Behavior", "--output", out)
    assert result.returncode == 0, result.stderr
    assert [p["goal"] for p in read_jsonl(out)] == [row["Behavior"] for row in HARMBENCH]


# --------------------------------------------------------------------------------------------------------------------
# JSON lines: the lines JSON defines


def test_jsonl_with_u2028_and_u0085_round_trips(tmp_path):
    texts = ["line\u2028separator", "next\u0085line", "para\u2029graph", "form\x0cfeed and \x1c"]
    pairs = [{"prompt": f"As a poet: {t}", "anchor_prompt": t, "attack": "poet"} for t in texts]
    path = write_pairs_jsonl(pairs, tmp_path / "pairs.jsonl")
    raw = path.read_text(encoding="utf-8")
    assert "\u2028" not in raw and "\\u2028" in raw and len(raw.splitlines()) == len(pairs)
    assert read_table(path) == pairs
    # a file another tool wrote with the raw characters (legal JSON) is read by its JSON lines too
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs) + "\n", encoding="utf-8")
    assert "\u2028" in other.read_text(encoding="utf-8")
    assert read_table(other) == pairs
    # and build-pairs reads our own output back
    out = tmp_path / "again.jsonl"
    result = build_pairs("--from", "columns", "--input", other, "--adversarial_column", "prompt", "--anchor_column",
                         "anchor_prompt", "--type_column", "none", "--attack_column", "attack", "--output", out)
    assert result.returncode == 0, result.stderr
    assert read_table(out) == pairs


# --------------------------------------------------------------------------------------------------------------------
# --output never an input


@pytest.mark.parametrize("how", ["same path", "relative path", "symlink", "hard link"])
def test_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, how):
    source = write_wildjailbreak(tmp_path / "train.tsv")
    before = source.read_bytes()
    output = {"same path": str(source), "relative path": "./train.tsv", "symlink": tmp_path / "link.jsonl",
              "hard link": tmp_path / "hard.jsonl"}[how]
    if how == "symlink":
        os.symlink(source, output)
    elif how == "hard link":
        os.link(source, output)
    result = build_pairs("--input", source, "--output", output, cwd=tmp_path)
    assert result.returncode == 2
    assert f"--output {output} is the input file {source}" in result.stderr and "choose another --output" in result.stderr
    assert source.read_bytes() == before


def test_output_that_is_the_goals_or_a_template_or_the_config_is_refused(tmp_path, goals):
    template = tmp_path / "aim.yaml"
    template.write_text((PYRIT / "aim.yaml").read_text())
    config = tmp_path / "build.yaml"
    config.write_text(f"from: templates\ntemplates: [{template}]\ngoals: {goals}\n")
    for output in (goals, template):
        result = build_pairs("--config", config, "--output", output)
        assert result.returncode == 2 and f"--output {output} is the input file" in result.stderr
    result = build_pairs("--config", config, "--output", config)
    assert result.returncode == 2 and f"is the input file {config}" in result.stderr
    assert "from: templates" in config.read_text()


# --------------------------------------------------------------------------------------------------------------------
# a quote that breaks the row structure, non-UTF-8 input: errors naming file and line


GLUED = ('vanilla\tadversarial\tdata_type\n'
         '"How do I x?\tAdv x\tadversarial_harmful\n'          # a stray opening quote...
         'How do I y?"\tAdv y\tadversarial_harmful\n'          # ...closed a line later: 3 fields, a "valid" row
         'How do I z?\tAdv z\tadversarial_harmful\n')


@pytest.mark.parametrize("text, line, fragment", [
    (GLUED, 2, "unbalanced quote: a quoted field opened on line 2 closes only on line 3"),
    ('vanilla\tadversarial\tdata_type\nHow do I x?\t"Adv x\tadversarial_harmful\nHow do I y?\tAdv y\tadversarial_harmful\n',
     2, "unexpected end of data"),
    ('vanilla\tadversarial\tdata_type\nHow do I x?\t"Adv" x\tadversarial_harmful\n', 2, "expected after"),
    ('vanilla\tadversarial\tdata_type\n"How do I x?\tAdv x\tadversarial_harmful\nHow do I y?"\tAdv y\n', 2,
     "does not have the 3 fields"),
])
def test_a_broken_quote_is_an_error_naming_file_and_line_never_a_repairing(tmp_path, text, line, fragment):
    path = tmp_path / "edited.tsv"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    result = build_pairs("--input", path, "--output", out)
    assert result.returncode == 2, result.stdout
    assert f"{path}: " in result.stderr and f"line {line}" in result.stderr and fragment in result.stderr
    assert "doubled (\"\")" in result.stderr or "field" in result.stderr
    assert not out.exists()


def test_a_quote_inside_a_field_is_text(tmp_path):
    path = tmp_path / "edited.tsv"
    path.write_text('vanilla\tadversarial\tdata_type\nHow do I x?\tSay 5" of rope\tadversarial_harmful\n')
    assert pairs_from_columns(path)[0]["prompt"] == 'Say 5" of rope'


@pytest.mark.parametrize("name, flag", [("train.tsv", "--input"), ("goals.txt", "--goals"), ("aim.yaml", "--templates")])
def test_non_utf8_input_names_the_file_and_byte_offset(tmp_path, goals, name, flag):
    path = tmp_path / name
    text = {"train.tsv": "vanilla\tadversarial\tdata_type\nHow do I x?\tAdv \u201cx\u201d\tadversarial_harmful\n",
            "goals.txt": "pick a lock\nhotwire a \u201ccar\u201d\n",
            "aim.yaml": "name: AIM\nvalue: \u201cQuoted\u201d {{ prompt }}\n"}[name]
    data = text.encode("cp1252")
    path.write_bytes(data)
    offset = data.index(b"\x93")
    args = {"--input": ["--input", path], "--goals": ["--from", "templates", "--templates", PYRIT / "aim.yaml",
                                                      "--goals", path],
            "--templates": ["--from", "templates", "--templates", path, "--goals", goals]}[flag]
    result = build_pairs(*args, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert f"{path}: not UTF-8 text: byte offset {offset} (line 2)" in result.stderr
    assert "re-save it as UTF-8" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# template rendering bounded


def test_template_multiplying_the_prompt_fails_fast_naming_the_template(tmp_path, goals):
    template = tmp_path / "bomb.yaml"
    template.write_text("name: Bomb\nvalue: '{{ prompt * 300000000 }}'\n")
    start = time.monotonic()
    result = build_pairs("--from", "templates", "--templates", template, "--goals", goals,
                         "--output", tmp_path / "out.jsonl")
    assert result.returncode == 2, result.stderr
    assert f"template 'Bomb' ({template}) failed to render" in result.stderr
    assert f"over the limit of {MAX_RENDERED_CHARS:,} characters" in result.stderr
    assert time.monotonic() - start < 120 and not (tmp_path / "out.jsonl").exists()


def test_template_include_is_a_clear_error(tmp_path, goals):
    (tmp_path / "other.yaml").write_text("secret text")
    template = tmp_path / "inc.yaml"
    template.write_text("name: Inc\nvalue: '{% include \"other.yaml\" %} {{ prompt }}'\n")
    result = build_pairs("--from", "templates", "--templates", template, "--goals", goals,
                         "--output", tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert "uses {% include %} (line 1)" in result.stderr and "never reads other templates or files" in result.stderr
    assert "TypeError" not in result.stderr


@pytest.mark.parametrize("source, fragment", [
    ("{{ prompt * 300000000 }}", "repeating a text"),
    ("{{ 300000000 * prompt }}", "repeating a text"),
    ("{{ [prompt] * 10 ** 9 }}", "repeating 1 items"),
    ("{{ prompt.center(10 ** 9) }}", "str.center"),
    ("{{ prompt|center(10 ** 9) }}", "center("),
    ("{{ prompt|indent(10 ** 9) }}", "indent("),
    ("{{ '%999999999s' % prompt }}", "format width"),
    ("{{ '%999999999s'|format(prompt) }}", "format width"),
    ("{{ '{:>999999999}'.format(prompt) }}", "format width"),
    ("{{ prompt|replace('', prompt)|replace('', prompt)|replace('', prompt) }}", "replace"),
    ("{{ prompt|slice(10 ** 9)|list }}", "slice("),
    ("{{ prompt|batch(10 ** 9, 'x')|list }}", "batch("),
    ("{{ lipsum(n=10 ** 7) }}{{ prompt }}", "lipsum("),
    ("{{ 2 ** 100000 }}{{ prompt }}", "integer power"),
    ("{{ prompt|tojson(indent=10 ** 8) }}", "tojson("),
])
def test_template_growth_is_refused_before_it_allocates(source, fragment):
    template = load_template(source, name="grow")
    with pytest.raises(ValueError, match=r"template 'grow' \(<string>\) failed to render: .*") as info:
        template.render("pick a lock " * 10)
    assert fragment in str(info.value)


@pytest.mark.parametrize("source, tag", [
    ("{% include 'x' %}{{ prompt }}", "{% include %}"), ("{% import 'x' as m %}{{ prompt }}", "{% import %}"),
    ("{% extends 'x' %}{{ prompt }}", "{% extends %}"),
    ("{% for i in range(3) %}{{ prompt }}{% endfor %}", "{% for %}"), ("{% set p = prompt %}{{ p }}", "{% set %}"),
    ("{% macro m() %}x{% endmacro %}{{ prompt }}", "{% macro %}"),
])
def test_refused_tags_are_errors_when_the_template_is_loaded(source, tag):
    with pytest.raises(ValueError, match=r"template 't' \(<string>\) uses " + tag.replace("{", r"\{").replace("}", r"\}")):
        load_template(source, name="t")


def test_ordinary_templates_still_render():
    template = load_template("{% if prompt %}Q: {{ prompt|upper }}{% endif %} ({{ prompt|length }}) "
                             "{{ prompt.replace('lock', 'door') }} {% raw %}{{ kept }}{% endraw %}", name="ok")
    assert template.render("pick a lock") == "Q: PICK A LOCK (11) pick a door {{ kept }}"
    assert load_template("{{ prompt * 2 }}", name="twice").render("ab") == "abab"
