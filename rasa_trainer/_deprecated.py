"""Old import paths of the modules that moved into the rooms by step (rasa-trainer 0.2): each still imports, with a
``FutureWarning`` naming the new path, until rasa-trainer 0.3. The old module is a thin forwarder to the new one."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {  # old path -> new path
    "rasa_trainer.routing": "rasa_trainer.moe.routing",
    "rasa_trainer.adapter": "rasa_trainer.repairs.adapter",
    "rasa_trainer.selection": "rasa_trainer.detection.selection",
    "rasa_trainer.eval_sets": "rasa_trainer.evaluation.eval_sets",
    "rasa_trainer.steering": "rasa_trainer.evaluation.steering",
    "rasa_trainer.pairs": "rasa_trainer.data.pairs",
    "rasa_trainer.config": "rasa_trainer.training.config",
    "rasa_trainer.trainer": "rasa_trainer.training.trainer",
}
REMOVED_IN = "0.3"


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module):
        new = MOVED[module.__name__]
        warnings.warn(f"`{module.__name__}` moved to `{new}`; the old path works until rasa-trainer {REMOVED_IN}",
                      FutureWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__doc__ = f"Moved to :mod:`{new}`."
        module.__getattr__ = lambda name: getattr(target, name)
        module.__dir__ = lambda: dir(target)
        if hasattr(target, "__all__"):
            module.__all__ = list(target.__all__)


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
