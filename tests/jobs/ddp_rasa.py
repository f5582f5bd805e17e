"""A two-process RASA job for tests/training/test_distributed.py (run with torchrun or accelerate launch on CPU, gloo).

Detection shards the pairs across ranks; training alternates one expert and one router epoch. Rank 0 writes a JSON
report: the selection each rank holds, whether all parameters are identical on every rank after every epoch, and
each rank's router KL per step.
"""

import json
import os
import sys
import time

import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from conftest import tiny_model  # noqa: E402
from tiny_chat import tiny_chat_tokenizer, tiny_pairs  # noqa: E402

from rasa_trainer import RASAConfig, RASATrainer, detect_safety_critical_experts  # noqa: E402


class AnchorRefusesJudge:
    """Deterministic judge: anchors (plain requests, "how do i ...") are refused, jailbreaks succeed."""

    name = "anchor-refuses"

    def __call__(self, prompts, replies):
        return [p[-1]["content"].startswith("how do i") if isinstance(p, list) else p.startswith("how do i") for p in prompts]


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankCheck(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.epochs = trainer, []

    def on_epoch_end(self, args, state, control, **kwargs):
        model = self.trainer.model
        sums = [float(p.detach().double().sum()) for p in model.parameters()]
        digests = _gather(sums)
        self.epochs.append({"epoch": round(state.epoch), "phase": self.trainer._phase,
                            "identical": all(d == digests[0] for d in digests)})


class KLTrainer(RASATrainer):
    def _save_rng_state(self, output_dir):
        if dist.get_rank() == 1:
            time.sleep(1.5)  # the last file of a checkpoint, written by every rank: rank 1 comes late
        super()._save_rng_state(output_dir)

    def _router_loss(self, *args, **kwargs):
        loss = super()._router_loss(*args, **kwargs)
        self.kl_values.append(float(loss))
        return loss


def main(output_dir: str) -> None:
    args = RASAConfig(
        output_dir=output_dir, rasa_rounds=1, per_device_train_batch_size=2, use_cpu=True, bf16=False,
        report_to="none", save_strategy="epoch", expert_learning_rate=1e-2, router_learning_rate=1e-2, seed=0,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer))
    selection = detect_safety_critical_experts(
        model, tokenizer, tiny_pairs(), judge=AnchorRefusesJudge(), max_new_tokens=4, batch_size=2,
        num_experts=4, output_dir=os.path.join(output_dir, "detection"), progress=False,
    )
    trainer = KLTrainer(model, args=args, train_dataset=tiny_pairs(), processing_class=tokenizer,
                        safety_critical_experts=selection)
    trainer.kl_values = []
    check = RankCheck(trainer)
    trainer.add_callback(check)
    trainer.train()
    report = {
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "wrapped": type(trainer.model_wrapped).__name__,
        "selections": _gather({str(k): v for k, v in selection.by_moe_layer().items()}),
        "epochs": check.epochs,
        "router_kl": _gather(trainer.kl_values),
        "checkpoint_manifests": {
            name: sorted(json.load(open(os.path.join(output_dir, name, "rasa_checkpoint.json")))["files"])
            for name in sorted(os.listdir(output_dir)) if name.startswith("checkpoint-")},
    }
    if dist.get_rank() == 0:
        with open(os.path.join(output_dir, "ddp_report.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
