"""`rasa-trainer` with a fault armed, for the crash tests: the process is killed (SIGKILL) the N-th time it reaches a
write point of a checkpoint save (tests/fault_injection.py), then the command runs as a user types it.

    python tests/jobs/cli_with_faults.py --fault POINT [--occurrence N] -- train --output_dir out ...
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fault_injection import POINTS, install  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", choices=POINTS, required=True)
    parser.add_argument("--occurrence", type=int, default=1)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    install(options.fault, options.occurrence)
    from rasa_trainer.cli import main as rasa_trainer

    return rasa_trainer(command)


if __name__ == "__main__":
    sys.exit(main())
