"""The public surface is decided, not accidental: the top level holds what a TRL user needs, the toolkits live in
documented submodules with their own ``__all__``, and the README and examples import only public names."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import rasa_trainer

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {
    "RASAConfig", "RASATrainer", "SafetyCriticalExperts", "SafetyReport", "detect_safety_critical_experts",
    "evaluate_safety", "load_eval_sets", "pairs_from_columns", "pairs_from_templates",
}
SUBMODULES = {
    "rasa_trainer.moe.discovery": {"MoELayer", "moe_layers"},
    "rasa_trainer.moe.routing": {"Routing", "real_tokens", "record_routing", "replay_routing"},
    "rasa_trainer.repairs.layer": {"attach_repairs", "merge_repairs", "unmerge_repairs", "disable_repairs", "unload_repairs",
                             "merged_state_dict", "upcast_routers", "restore_routers"},
    "rasa_trainer.repairs.adapter": {"save_peft_adapter", "load_rasa_adapter"},
    "rasa_trainer.judges.builtin": {"Judge", "JudgeError", "RefusalKeywordJudge", "ClassifierJudge", "GuardModelJudge"},
    "rasa_trainer.evaluation.steering": {"steer_away", "steer_toward"},
    "rasa_trainer.memory": {"MemoryEstimate", "estimate_memory"},
    "rasa_trainer.data.pairs": {"pairs_from_columns", "pairs_from_templates"},
    "rasa_trainer.evaluation.eval_sets": {"load_eval_sets", "load_xstest"},
    "rasa_trainer.detection.selection": {"SafetyCriticalExperts"},
}
IMPORT = re.compile(r"^\s*from (rasa_trainer(?:\.[a-z_]+)*) import \(?([A-Za-z_, ]+)\)?", re.M)


def test_top_level_surface_is_pinned():
    assert set(rasa_trainer.__all__) == TOP_LEVEL
    for name in TOP_LEVEL:
        assert getattr(rasa_trainer, name) is not None


def test_submodules_declare_their_public_names():
    for module_name, names in SUBMODULES.items():
        module = importlib.import_module(module_name)
        assert names <= set(module.__all__), (module_name, names - set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), (module_name, name)


def _public(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    submodules = {p.stem for p in Path(module.__file__).parent.glob("*.py")} if module_name == "rasa_trainer" else set()
    return set(getattr(module, "__all__", ())) | submodules | ({"main"} if module_name.startswith("rasa_trainer.cli") else set())


def test_readme_and_examples_import_only_public_names():
    sources = [ROOT / "README.md", *sorted((ROOT / "examples").glob("*.py"))]
    for source in sources:
        for module_name, names in IMPORT.findall(source.read_text()):
            for name in (n.strip() for n in names.split(",") if n.strip()):
                assert name in _public(module_name), f"{source.name} imports private {module_name}.{name}"
