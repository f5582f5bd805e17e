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
    "rasa_trainer.moe": {"MoELayer", "moe_layers", "Routing", "real_tokens", "record_routing", "replay_routing"},
    "rasa_trainer.moe.routing": {"Routing", "real_tokens", "record_routing", "replay_routing"},
    "rasa_trainer.repairs": {"attach_repairs", "merge_repairs", "unmerge_repairs", "disable_repairs", "unload_repairs",
                             "merged_state_dict", "merged_for_saving", "upcast_routers", "restore_routers"},
    "rasa_trainer.repairs.adapter": {"save_peft_adapter", "load_rasa_adapter"},
    "rasa_trainer.judges": {"Judge", "JudgeError", "RefusalKeywordJudge", "ClassifierJudge", "GuardModelJudge",
                            "judge_from_name", "register_judge"},
    "rasa_trainer.evaluation.steering": {"steer_away", "steer_toward"},
    "rasa_trainer.memory": {"MemoryEstimate", "estimate_memory"},
    "rasa_trainer.data": {"validate_pairs", "pairs_from_columns", "pairs_from_templates"},
    "rasa_trainer.data.pairs": {"pairs_from_columns", "pairs_from_templates"},
    "rasa_trainer.evaluation.eval_sets": {"load_eval_sets", "load_xstest"},
    "rasa_trainer.detection.selection": {"SafetyCriticalExperts"},
}
# the documented submodules of 0.1 that moved into the rooms: still importable until 0.3, with a FutureWarning
MOVED = {
    "rasa_trainer.routing": ("rasa_trainer.moe.routing", "record_routing"),
    "rasa_trainer.adapter": ("rasa_trainer.repairs.adapter", "load_rasa_adapter"),
    "rasa_trainer.steering": ("rasa_trainer.evaluation.steering", "steer_toward"),
    "rasa_trainer.pairs": ("rasa_trainer.data.pairs", "pairs_from_columns"),
    "rasa_trainer.eval_sets": ("rasa_trainer.evaluation.eval_sets", "load_eval_sets"),
    "rasa_trainer.selection": ("rasa_trainer.detection.selection", "SafetyCriticalExperts"),
    "rasa_trainer.config": ("rasa_trainer.training.config", "RASAConfig"),
    "rasa_trainer.trainer": ("rasa_trainer.training.trainer", "RASATrainer"),
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


def test_old_module_paths_forward_to_the_rooms_with_a_warning():
    """``from rasa_trainer.pairs import pairs_from_columns`` (0.1's path) gives the same object as the new path, and
    says where it moved; the old module is a forwarder, not a second copy of the code (one fresh interpreter, so
    every old path is imported for the first time)."""
    import json
    import subprocess
    import sys

    code = f"""
import importlib, json, warnings
report = {{}}
for old, (new, name) in {MOVED!r}.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moved = importlib.import_module(old)
    target = importlib.import_module(new)
    report[old] = [[str(w.message) for w in caught if w.category is FutureWarning],
                   getattr(moved, name) is getattr(target, name),
                   getattr(moved, "__all__", None) == getattr(target, "__all__", None)]
print(json.dumps(report))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    for old, (new, _) in MOVED.items():
        warned, same_object, same_names = report[old]
        assert warned == [f"`{old}` moved to `{new}`; the old path works until rasa-trainer 0.3"], (old, warned)
        assert same_object and same_names, old


def test_import_rasa_trainer_is_lazy():
    """``import rasa_trainer`` loads neither torch nor transformers nor TRL (the CLI's --help and a plain import stay
    cheap); the first use of a public name imports what it needs."""
    import subprocess
    import sys

    code = ("import sys, rasa_trainer\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))\n"
            "rasa_trainer.RASAConfig\nprint('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True", out
