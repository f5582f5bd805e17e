"""The project's own documents match the tree: docs/architecture.md names every module and only modules that exist;
docs/compatibility.md points at modules and tests that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rasa_trainer"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else None]


def _modules() -> set[str]:
    """Top-level modules (``name.py``) and subpackages (``name/``) of the package."""
    names = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    names |= {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
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
        for module in re.findall(r"`([a-z_]+)(?:\.py|\.[A-Za-z_.]+)?`", where):
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
