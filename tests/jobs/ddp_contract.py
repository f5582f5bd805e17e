"""A two-process job for tests/training/test_distributed.py (torchrun on CPU, gloo): the Trainer-contract checks that need
several processes.

1. The per-pair router loss over 8 pairs as 2 processes x batch 4: one SGD step (lr 1, no clipping); the logged loss
   and the router weight change must equal those of 1 process x batch 8 (the test computes that reference).
2. Retain rows in the expert phase: one SGD step over 8 pairs (and their retain rows) as 2 processes x batch 4 must
   change the repairs as 1 process x batch 8 does (each part's mean runs over the step's tokens of every process).
3. Detection at train start: a RASATrainer given no selection on the SafetyWorld model detects the Safety-Critical
   Experts itself in train(), on every rank (pairs sharded), on the model on the training device, before the optimiser
   is built and before DDP wraps the model; then both phases train the repairs under DDP.

Rank 0 writes ddp_contract.json into the output folder.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))  # test helpers
from test_retain import retain_step  # noqa: E402
from test_trainer_contract import per_pair_step  # noqa: E402

from rasa_trainer import RASAConfig, RASATrainer  # noqa: E402


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class DetectingTrainer(RASATrainer):
    def _detect(self):
        self.detection_seen = {
            "device": str(next(self.model.parameters()).device),
            "training_device": str(self.args.device),
            "optimizer_built": self.optimizer is not None,
            "wrapped": type(self.model_wrapped).__name__,
            "initialized": dist.is_initialized(),
        }
        return super()._detect()


def detection_run(output_dir: Path) -> dict:
    from rasa_trainer.safety_world import load_safety_world_model, load_world_metadata, make_world

    model, tokenizer = load_safety_world_model()
    pairs = make_world(seed=0).train_pairs()[::8]  # 32 pairs, every aligned family
    args = RASAConfig(
        output_dir=str(output_dir), rasa_rounds=1, per_device_train_batch_size=8, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", expert_learning_rate=5e-3, router_learning_rate=5e-5, seed=0,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, detection_max_new_tokens=16,
        detection_batch_size=16, activation_checkpointing=False,
    )
    trainer = DetectingTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer)
    assert trainer.selection is None  # nothing detected at construction
    wrapped_model = {}

    class AtTrainBegin(TrainerCallback):  # after accelerate prepared (DDP-wrapped) the model
        def on_train_begin(self, *args, **kwargs):
            wrapped = trainer.model_wrapped
            wrapped_model["type"] = type(wrapped).__name__
            wrapped_model["repairs"] = sum("rasa_repairs" in n for n, _ in getattr(wrapped, "module", wrapped).named_parameters())

    trainer.add_callback(AtTrainBegin())
    trainer.train()
    sums = _gather([float(p.detach().double().sum()) for p in trainer.model.parameters()])
    planted = sorted(tuple(e) for e in load_world_metadata()["planted_experts"])
    return {
        "seen": _gather(trainer.detection_seen),
        "selections": _gather(sorted([e.moe_layer, e.expert] for e in trainer.selection.experts)),
        "planted": [list(e) for e in planted],
        "wrapped_after": wrapped_model["type"],
        "repairs_in_ddp_module": wrapped_model["repairs"],
        "identical_after_training": all(s == sums[0] for s in sums),
        "phases": sorted({h["phase"] for h in trainer.state.log_history if "phase" in h}),
        "selection_file": os.path.isfile(os.path.join(output_dir, "safety_critical_experts.json")),
    }


def main(output_dir: str) -> None:
    out = Path(output_dir)
    loss, delta = per_pair_step(out / "per_pair", 4, 1)
    report = {
        "world_size": dist.get_world_size(),
        "per_pair": {"loss": _gather(loss), "delta": _gather(delta.tolist())},
        "retain": _gather(retain_step(out / "retain", 4, 1).tolist()),
        "detection": detection_run(out / "detection"),
    }
    if dist.get_rank() == 0:
        with open(out / "ddp_contract.json", "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
