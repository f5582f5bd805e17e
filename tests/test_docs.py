"""The project's own documents match the tree: docs/architecture.md names every module and only modules that exist;
docs/compatibility.md points at modules and tests that exist; the README (the user's guide) points at docs/results.md
(the research results), and every relative link of the README and of docs/*.md reaches a file of the repository and,
with an anchor, a heading of that file."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rasa_trainer"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else None]


ROOMS_BY_MODULE = ("moe", "repairs", "data", "judges", "detection", "training", "evaluation")  # each module named


def _modules() -> set[str]:
    """Top-level modules (``name.py``), subpackages (``name/``) and the modules of the method's rooms
    (``room/name.py``)."""
    names = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    names |= {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    names |= {f"{room}/{p.name}" for room in ROOMS_BY_MODULE for p in (PACKAGE / room).glob("*.py")
              if p.name != "__init__.py"}
    return names


def test_architecture_table_names_every_module_and_only_existing_ones():
    table = _section((ROOT / "docs" / "architecture.md").read_text(), "## Who owns what")
    owners = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            owners |= set(re.findall(r"`([\w/]+(?:\.py|/))`", first_cell))
    assert owners, "the table of owners was not found"
    assert _modules() - owners == set(), "modules missing from docs/architecture.md's 'Who owns what'"
    assert owners - _modules() == set(), "docs/architecture.md names modules that do not exist"


def test_compatibility_points_at_existing_modules_and_tests():
    text = (ROOT / "docs" / "compatibility.md").read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `")]
    assert rows, "no table rows found"
    for cells in rows:
        where = cells[2]  # | what | where | why | test |
        for module in re.findall(r"`([a-z_/]+)(?:\.py|\.[A-Za-z_.]+)?`", where):
            assert (PACKAGE / f"{module}.py").exists() or (PACKAGE / module).is_dir(), (
                f"docs/compatibility.md says {module!r} uses a private API, but rasa_trainer has no such module")
            if (PACKAGE / f"{module}.py").exists():  # and the module says where its private APIs are listed
                docstring = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text())) or ""
                assert "docs/compatibility.md" in docstring, f"rasa_trainer/{module}.py does not point at it"
    for test_file, name in re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text):
        path = ROOT / test_file
        assert path.is_file(), f"docs/compatibility.md names {test_file}, which does not exist"
        if name:
            functions = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
            assert name in functions, f"docs/compatibility.md names {test_file}::{name}, which does not exist"


def test_readme_names_every_rasa_config_field():
    """The README's paragraph on RASAConfig names every field RASAConfig adds to SFTConfig."""
    import dataclasses

    from trl import SFTConfig

    from rasa_trainer import RASAConfig

    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("`RASAConfig` is an `SFTConfig`"):readme.index("## What RASATrainer changes")]
    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    added = [f.name for f in dataclasses.fields(RASAConfig) if f.name not in inherited]
    assert added, "RASAConfig adds no field?"
    assert [name for name in added if f"`{name}`" not in paragraph] == []


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[([^\]]*)\]\(([^()\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where Markdown links are links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file (lowercase, punctuation dropped, spaces to hyphens,
    ``-1``, ``-2`` for repeats)."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S),
                              flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(document: Path) -> list[str]:
    return [target for _, target in LINK.findall(_prose(document.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: leave the repository


def test_readme_points_at_the_results_document():
    assert (ROOT / "docs" / "results.md").is_file(), "docs/results.md (the research results) is missing"
    links = [target.split("#")[0] for target in _relative_links(ROOT / "README.md")]
    assert "docs/results.md" in links, "the README does not link to docs/results.md"


def test_relative_links_of_the_readme_and_docs_resolve():
    """A link ``[text](path#anchor)`` in README.md or docs/*.md names a file inside the repository, relative to the
    document, and an anchor names a heading of the target (or, ``#anchor`` alone, of the document itself)."""
    assert ROOT / "docs" / "results.md" in DOCUMENTS
    broken = []
    for document in DOCUMENTS:
        for target in _relative_links(document):
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            name = f"{document.relative_to(ROOT)}: {target}"
            if ROOT not in resolved.parents or not resolved.exists():
                broken.append(f"{name} (no such file in the repository)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text()):
                broken.append(f"{name} (no such heading)")
    assert broken == []
    assert _relative_links(ROOT / "docs" / "results.md"), "docs/results.md links nowhere: was the link check blind?"
