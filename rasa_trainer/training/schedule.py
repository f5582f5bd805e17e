"""The RASA schedule as data: which phase each epoch runs and which parameter group each phase trains.

A leaf module (no import from the rest of ``training/``): the phase controller, the parameter groups, the retain
schedule and the trainer all read these names from here.
"""

from __future__ import annotations

# the code a phase is logged as (``phase`` in the logs)
PHASE_CODES = {"full": 0, "expert": 1, "router": 2}

# the parameter group (see ``param_groups.py``) each phase trains
ACTIVE_GROUP = {"expert": "experts", "router": "routers", "full": "full"}

# the schedules that repair Safety-Critical Experts, and so need a selection
SELECTING_SCHEDULES = ("alternate", "expert_only")

# the schedules that train the routers
ROUTER_SCHEDULES = ("alternate", "router_only")


def phase_of_epoch(schedule: str, epoch: int) -> str:
    """The phase an epoch (0-based) runs under ``schedule``: ``expert``, ``router`` or ``full``."""
    if schedule == "full":
        return "full"
    if schedule == "expert_only":
        return "expert"
    if schedule == "router_only":
        return "router"
    return "expert" if epoch % 2 == 0 else "router"


def expert_epochs_before(schedule: str, epoch: int) -> int:
    """How many of the epochs before ``epoch`` run the expert phase."""
    return sum(phase_of_epoch(schedule, e) == "expert" for e in range(epoch))


def uses_selection(schedule: str) -> bool:
    """Whether ``schedule`` repairs Safety-Critical Experts (and so needs a selection)."""
    return schedule in SELECTING_SCHEDULES
