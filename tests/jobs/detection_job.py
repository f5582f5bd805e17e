"""`rasa-trainer detect` in its own process with a fault armed, for the resumable-detection tests: the process is
killed with SIGKILL the N-th time it reaches a detection write point (tests/fault_injection.py). The judge is the
marker judge of the detection tests (refused exactly when the last user turn holds the word ``refuse``).

    python tests/jobs/detection_job.py --fault POINT [--occurrence N] -- --model_name_or_path ... --output_dir out
"""

import argparse
import os
import sys

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [TESTS, os.path.join(TESTS, "detection")]
from fault_injection import POINTS, install  # noqa: E402
from test_detection import MarkerJudge  # noqa: E402  (the same judge, so the resumed run's fingerprint matches)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", choices=POINTS, required=True)
    parser.add_argument("--occurrence", type=int, default=1)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    argv = options.argv[1:] if options.argv[:1] == ["--"] else options.argv

    import torch

    torch.set_num_threads(1)  # as the tests' process (tests/conftest.py): the same kernels, the same sums
    install(options.fault, options.occurrence)
    from rasa_trainer.cli import detect as command

    command.build_judge = lambda name, labels=None, options=None: MarkerJudge()
    command.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
