"""How much of a router update survives when a RASA checkpoint is loaded in bf16 (CPU).

RASA trains routers as fp32 master weights (an update of 1e-6 vanishes in bf16) and saves them in fp32. Loaded with
``dtype=torch.float32`` the routers are exactly the trained ones; loaded with ``dtype=torch.bfloat16`` (or "auto" on a
bf16 model) transformers casts them to bf16, and an update smaller than half a bf16 step of the weight rounds back to
the old value. This script measures that share on a tiny bf16 Qwen3-MoE: ``router_only`` training (36 steps, router
lr 1e-6 as the authors, then 1e-5 and 1e-4), save, reload in fp32 and in bf16, and count the router entries that
differ from the base model.

Usage: ``python benchmarks/bench_router_precision.py``
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from conftest import tiny_model  # noqa: E402
from tiny_chat import tiny_chat_tokenizer, tiny_pairs  # noqa: E402

from rasa_trainer import RASAConfig, RASATrainer  # noqa: E402
from rasa_trainer.moe.discovery import moe_layers  # noqa: E402


def measure(lr: float, tmp: str) -> tuple[int, int, int]:
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model("qwen3_moe", vocab_size=len(tokenizer), hidden_size=64).to(torch.bfloat16)
    before = [layer.router.weight.detach().float().clone() for layer in moe_layers(model)]
    args = RASAConfig(output_dir=tmp, rasa_schedule="router_only", rasa_rounds=3, router_learning_rate=lr,
                      per_device_train_batch_size=4, use_cpu=True, report_to="none", save_strategy="no",
                      disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = RASATrainer(model, args=args, train_dataset=tiny_pairs(48), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(os.path.join(tmp, "final"))
    fp32 = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "final"), dtype=torch.float32)
    bf16 = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "final"), dtype=torch.bfloat16)
    changed = kept32 = kept16 = 0
    for base, trained, loaded32, loaded16 in zip(before, moe_layers(trainer.model), moe_layers(fp32), moe_layers(bf16)):
        moved = trained.router.weight.detach() != base
        changed += int(moved.sum())
        kept32 += int((loaded32.router.weight != base)[moved].sum())
        kept16 += int((loaded16.router.weight.float() != base)[moved].sum())
    return changed, kept32, kept16


def main() -> None:
    print("router lr   steps  entries changed  kept by fp32 load  kept by bf16 load")
    for lr in (1e-6, 1e-5, 1e-4):
        with tempfile.TemporaryDirectory() as tmp:
            changed, kept32, kept16 = measure(lr, tmp)
        print(f"{lr:<10g}  {36:>5}  {changed:>15}  {kept32:>10} ({kept32 / changed:6.1%})  "
              f"{kept16:>10} ({kept16 / changed:6.1%})")


if __name__ == "__main__":
    main()
