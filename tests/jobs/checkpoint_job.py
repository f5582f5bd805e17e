"""A small RASA run for the fault-injection tests (tests/training/test_crash_safety.py): two rounds on the tiny Qwen3-MoE,
a checkpoint every two steps; writes the final trainable parameters and merged weights to ``final.safetensors``.

    python tests/jobs/checkpoint_job.py OUTPUT_DIR [--resume] [--save_total_limit N] [--rounds R]
                                        [--fault POINT [--occurrence N]]

``--fault`` arms tests/fault_injection.py: the process is killed (SIGKILL) the N-th time it reaches that write point of
a checkpoint save.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))  # test helpers
from conftest import tiny_model  # noqa: E402
from fault_injection import POINTS, install  # noqa: E402
from test_trainer import make_selection  # noqa: E402
from tiny_chat import tiny_chat_tokenizer, tiny_pairs  # noqa: E402

from rasa_trainer import RASAConfig, RASATrainer  # noqa: E402
from rasa_trainer.utils import atomic_save_safetensors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save_total_limit", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--fault", choices=POINTS, default=None)
    parser.add_argument("--occurrence", type=int, default=1)
    options = parser.parse_args()
    if options.fault is not None:
        install(options.fault, options.occurrence)
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    args = RASAConfig(
        output_dir=options.output_dir, rasa_rounds=options.rounds, per_device_train_batch_size=4, use_cpu=True,
        report_to="none", save_strategy="steps", save_steps=2, save_total_limit=options.save_total_limit,
        expert_learning_rate=1e-2, router_learning_rate=1e-2, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        logging_steps=1,
    )
    trainer = RASATrainer(model, args=args, train_dataset=tiny_pairs(options.pairs), processing_class=tokenizer,
                          safety_critical_experts=make_selection(model, {0: [1, 3], 1: [2]}))
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    state = {k: v for k, v in trainer.model.state_dict().items()}
    atomic_save_safetensors(state, os.path.join(options.output_dir, "final.safetensors"))
    print("global_step", trainer.state.global_step)


if __name__ == "__main__":
    main()
