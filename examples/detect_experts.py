"""Detect the Safety-Critical Experts of a Mixture-of-Experts model (RASA step 1).

Writes ``safety_critical_experts.json``, ``expert_stats.csv`` and ``risk_difference.png`` into ``--output_dir``.

Examples::

    python examples/detect_experts.py --model_name_or_path ./olmoe-instruct --dataset_name pairs.jsonl \\
        --output_dir out/sce
    python examples/detect_experts.py --config detect.yaml --judge ./guard-model
    torchrun --nproc_per_node 4 examples/detect_experts.py --config detect.yaml

The dataset follows the RASA pair contract (``prompt``, ``anchor_prompt``, optional ``attack``; see
``rasa_trainer/data.py``): a directory written by ``Dataset.save_to_disk``, a JSON/JSONL/CSV/Parquet file, or a local
dataset directory loadable with ``datasets.load_dataset``. Under ``torchrun`` the pairs are sharded over the ranks and
every rank ends with the same selection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from rasa_trainer.detection import detect_safety_critical_experts
from rasa_trainer.judges import judge_from_name
from rasa_trainer.selection import POLICIES

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DetectionArguments:
    """Arguments of Safety-Critical Expert detection."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model checkpoint (local path or Hub id)."})
    model_revision: str | None = field(default=None, metadata={"help": "Model revision (recorded in the JSON)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "save_to_disk directory, JSON/JSONL/CSV/Parquet file, or dataset directory."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to use."})
    anchor_column: str = field(default="anchor_prompt", metadata={"help": "Column of the plain harmful request."})
    max_pairs: int | None = field(default=None, metadata={"help": "Use only the first N pairs."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write the artifacts."})
    judge: str = field(default="keyword", metadata={"help": "'keyword' or the path of a classifier / guard model."})
    judge_refusal_labels: list[str] | None = field(
        default=None, metadata={"help": "For a classifier judge: the labels that mean 'refused'."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per reply."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of the random policy."})
    policy: str = field(default="global_topk", metadata={"help": "Selection policy.", "choices": list(POLICIES)})
    num_experts: float = field(
        default=0.125,
        metadata={"help": "K: a fraction (< 1) of all routed experts (of E for per_layer_topk), or a count (>= 1)."},
    )
    threshold: float = field(default=0.0, metadata={"help": "Minimum risk difference of a selected expert."})
    top_p_experts: float = field(default=0.5, metadata={"help": "Cumulative RD share per layer (per_layer_top_p)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})


def load_pairs(name: str, split: str = "train"):
    """A local dataset: ``save_to_disk`` directory, a data file, or a directory ``load_dataset`` understands."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = load_from_disk(str(path))
    elif path.is_file() and path.suffix in FILE_BUILDERS:
        dataset = load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(name, split=split)
    return dataset[split] if isinstance(dataset, DatasetDict) else dataset


def _init_distributed() -> tuple[int, torch.device]:
    """Join the process group under torchrun; returns (local rank, device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return local_rank, device


def main(args: DetectionArguments):
    """Run detection; returns the :class:`~rasa_trainer.selection.SafetyCriticalExperts`."""
    missing = [name for name in ("model_name_or_path", "dataset_name", "output_dir") if not getattr(args, name)]
    if missing:
        raise SystemExit(f"missing required arguments: {', '.join('--' + m for m in missing)}")
    _, device = _init_distributed()
    load = dict(revision=args.model_revision, trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, **load)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # generation needs a pad token; replies stop at EOS anyway
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype, **load).to(device)
    dataset = load_pairs(args.dataset_name, args.dataset_split)
    if args.max_pairs is not None:
        dataset = dataset.select(range(min(args.max_pairs, len(dataset))))
    judge_kwargs = {"refusal_labels": args.judge_refusal_labels} if args.judge_refusal_labels else {}
    judge = judge_from_name(args.judge, **judge_kwargs)
    result = detect_safety_critical_experts(
        model, tokenizer, dataset, judge=judge, anchor_column=args.anchor_column, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, policy=args.policy, num_experts=args.num_experts, threshold=args.threshold,
        top_p_experts=args.top_p_experts, output_dir=args.output_dir, progress=not args.no_progress,
        model_revision=args.model_revision,
    )
    if int(os.environ.get("RANK", 0)) == 0:
        pairs = result.pairs
        print(f"pairs kept {pairs['kept']} / {pairs['total']}, dropped by reason {pairs['dropped_by_reason']}")
        print(f"{len(result)} safety-critical experts in {len(result.by_moe_layer())} MoE layers -> {args.output_dir}")
    return result


if __name__ == "__main__":
    parser = TrlParser((DetectionArguments,))
    (detection_args,) = parser.parse_args_and_config()
    main(detection_args)
