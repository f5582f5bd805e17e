"""Plan the memory of a RASA run without downloading anything.

A thin wrapper of ``rasa-trainer estimate-memory`` (``rasa_trainer/cli/estimate_memory.py``)::

    python examples/estimate_memory.py --model Qwen3-30B-A3B --selection 0.125 --seq_len 2048
    python examples/estimate_memory.py --model OLMoE-1B-7B --selection 128 --optimizer adamw_8bit
    python examples/estimate_memory.py --model ./my-moe/config.json --tokens_in_dataset 5000000
"""

import sys

from rasa_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["estimate-memory", *sys.argv[1:]]))
