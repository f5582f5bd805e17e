"""``rasa-trainer detect``: find the Safety-Critical Experts of a Mixture-of-Experts model (RASA step 1).

Writes ``safety_critical_experts.json``, ``expert_stats.csv`` and ``risk_difference.png`` into ``--output_dir``; until
then the statistics of every finished shard of pairs are kept in ``--output_dir``/detection_progress/, so the same
command resumes an interrupted run (another run's progress there is refused, naming what differs)::

    rasa-trainer detect --model_name_or_path ./olmoe-instruct --dataset_name pairs.jsonl --output_dir out/sce
    rasa-trainer detect --config detect.yaml --judge ./guard-model
    torchrun --nproc_per_node 4 -m rasa_trainer.cli detect --config detect.yaml
    rasa-trainer detect --model_name_or_path safety_world --dataset_name safety_world --output_dir out/sw

The pairs follow the RASA pair contract (``prompt``, ``anchor_prompt``, optional ``attack``; see the README): a folder
written by ``Dataset.save_to_disk``, a JSON/JSONL/CSV/Parquet file, a dataset folder, a Hub dataset, or
``safety_world``. Under ``torchrun`` the pairs are sharded over the ranks and every rank ends with the same selection.
The judge takes the ``--judge_<option>`` options, e.g. a model behind an OpenAI-compatible endpoint::

    rasa-trainer detect ... --judge openai --judge_base_url http://localhost:8000/v1 \\
        --judge_model meta-llama/Llama-Guard-3-8B --judge_format llama_guard

(its answers cached in ``--output_dir``/judge_cache.json unless ``--judge_cache`` says where).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..detection.policies import POLICY_NAMES
from ..run_lock import run_lock_holder
from .arguments import JudgeArguments, check_generation_options
from .common import (
    SAFETY_WORLD,
    ModelArguments,
    UsageError,
    build_judge,
    check_at_least,
    check_fraction,
    check_judge,
    check_model,
    check_num_experts,
    check_output_dir,
    check_threshold,
    load_model,
    load_model_skeleton,
    load_pairs,
    parse,
    torch_dtype,
    with_judge_cache,
)


@dataclass
class DetectionArguments:
    """Data, judge, generation and selection arguments of ``rasa-trainer detect`` (model arguments:
    ``ModelArguments``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Pairs: save_to_disk folder, JSON/JSONL/CSV/Parquet file, dataset folder, Hub dataset, or "
                          "'safety_world'."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to use."})
    anchor_column: str = field(default="anchor_prompt", metadata={"help": "Column of the plain harmful request."})
    max_pairs: int | None = field(default=None, metadata={"help": "Use only the first N pairs."})
    output_dir: str | None = field(default=None, metadata={"help": "Where to write the artifacts (required)."})
    judge: str = field(
        default="keyword",
        metadata={"help": "'keyword', 'safety_world' (SafetyWorld's exact judge) or the folder of a classifier / "
                          "guard model."},
    )
    judge_refusal_labels: list[str] | None = field(
        default=None, metadata={"help": "For a classifier judge: the labels that mean 'refused'."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per reply."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of the random policy."})
    policy: str = field(default="global_topk", metadata={"help": "Selection policy.", "choices": POLICY_NAMES})
    num_experts: float = field(
        default=0.125,
        metadata={"help": "K: a fraction (< 1) of all routed experts (of E for per_layer_topk), or a count (>= 1).",
                  "aliases": ["--sce_num_experts"]},  # train's name of the flag
    )
    threshold: float = field(
        default=0.0, metadata={"help": "Select only experts whose risk difference is above this (RD lies in [-1, 1]).",
                               "aliases": ["--sce_threshold"]}  # train's name of the flag
    )
    top_p_experts: float = field(default=0.5, metadata={"help": "Cumulative RD share per layer (per_layer_top_p)."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the SafetyWorld pairs (--dataset_name safety_world)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    detection_backend: str = field(
        default="hf",
        metadata={"help": "What generates the replies: 'hf' (transformers generate) or 'vllm' (vLLM on the model "
                          "folder, several times faster; `pip install vllm`; one process, no torchrun).",
                  "choices": ["hf", "vllm"]},
    )
    vllm_kwargs: str | None = field(
        default=None,
        metadata={"help": "With --detection_backend vllm: further vllm.LLM arguments as JSON, e.g. "
                          "'{\"gpu_memory_utilization\": 0.8, \"tensor_parallel_size\": 2}'."},
    )
    chat_template_kwargs: str | None = field(
        default=None,
        metadata={"help": "Extra chat-template variables as JSON, e.g. '{\"enable_thinking\": false}' for Qwen3."},
    )
    shard_size: int | None = field(
        default=None,
        metadata={"help": "Pairs per shard, the unit of progress kept in <output_dir>/detection_progress/ so that the "
                          "same command resumes after an interrupt (a multiple of --batch_size; default 16 batches)."},
    )


def check_values(args: DetectionArguments) -> None:
    check_at_least("--batch_size", args.batch_size, 1)
    check_at_least("--max_new_tokens", args.max_new_tokens, 1)
    check_at_least("--max_pairs", args.max_pairs, 1)
    check_threshold("--threshold", args.threshold)
    check_num_experts("--num_experts", args.num_experts)
    check_fraction("--top_p_experts", args.top_p_experts)
    check_fraction("--top_p", args.top_p)
    if args.shard_size is not None and (args.shard_size < 1 or args.shard_size % args.batch_size):
        raise UsageError(f"--shard_size {args.shard_size}: a shard is whole generation batches, so it must be a "
                         f"positive multiple of --batch_size {args.batch_size}")
    if args.do_sample and not args.temperature > 0:
        raise UsageError(f"--temperature {args.temperature}: sampling needs a temperature > 0")
    check_generation_options(args, "--detection_backend", args.detection_backend,
                             int(os.environ.get("WORLD_SIZE", 1)))



def judge_options(args: DetectionArguments, judge_args: JudgeArguments | None) -> dict:
    """The ``--judge_<option>`` values; the HTTP judge's answers are cached in ``--output_dir``/judge_cache.json
    unless ``--judge_cache`` says where."""
    return with_judge_cache(judge_args.options() if judge_args is not None else {}, (args.judge,), args.output_dir)


def preflight(args: DetectionArguments, model_args: ModelArguments, judge_args: JudgeArguments | None = None):
    """Check the arguments and read the pairs before any model is loaded; returns the pairs."""
    check_values(args)
    torch_dtype(model_args.dtype)
    check_model(model_args.model_name_or_path)
    check_judge(args.judge, refusal_labels=args.judge_refusal_labels, options=judge_options(args, judge_args))
    if not args.dataset_name:
        raise UsageError("--dataset_name is required: the pairs to detect on (or 'safety_world')")
    check_output_dir(args.output_dir)
    holder = run_lock_holder(args.output_dir)
    if holder is not None:  # refused before the model loads; detection then holds the lock itself
        raise UsageError(f"--output_dir {args.output_dir} is in use by another run ({holder}). One run per output "
                         "folder: wait for it to finish, or choose another --output_dir")
    if args.dataset_name == SAFETY_WORLD:
        from ..safety_world import make_world

        pairs = make_world(seed=args.world_seed).train_dataset()
        return pairs.select(range(min(args.max_pairs, len(pairs)))) if args.max_pairs else pairs
    return load_pairs(args.dataset_name, anchor_column=args.anchor_column, split=args.dataset_split,
                      config=args.dataset_config, max_pairs=args.max_pairs)


def _init_distributed():
    """Join the process group under torchrun; returns the device of this rank."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv: list[str] | None = None):
    """Run ``rasa-trainer detect``; returns the :class:`~rasa_trainer.detection.selection.SafetyCriticalExperts`."""
    from ..detection.detect import detect_safety_critical_experts

    args, model_args, judge_args = parse((DetectionArguments, ModelArguments, JudgeArguments), argv,
                                         "rasa-trainer detect")
    # as `train`: RASA's messages (a resumed detection, a lock taken over) reach the terminal, unless the
    # application has configured logging itself
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pairs = preflight(args, model_args, judge_args)
    device = _init_distributed()
    if args.detection_backend == "vllm":
        # vLLM holds the weights; detection needs only the model's layout (an empty skeleton on the meta device)
        model, tokenizer = load_model_skeleton(model_args)
    else:
        model, tokenizer = load_model(model_args, device=device)
    judge = build_judge(args.judge, args.judge_refusal_labels, judge_options(args, judge_args))
    result = detect_safety_critical_experts(
        model, tokenizer, pairs, judge=judge, anchor_column=args.anchor_column, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, policy=args.policy, num_experts=args.num_experts, threshold=args.threshold,
        top_p_experts=args.top_p_experts, output_dir=args.output_dir, progress=not args.no_progress,
        shard_size=args.shard_size,
        model_revision=model_args.model_revision, chat_template_kwargs=args.chat_template_kwargs,
        backend=args.detection_backend, vllm_kwargs=args.vllm_kwargs,
    )
    if int(os.environ.get("RANK", 0)) == 0:
        kept = result.pairs
        print(f"pairs kept {kept['kept']} / {kept['total']}, dropped by reason {kept['dropped_by_reason']}")
        print(f"{len(result)} safety-critical experts in {len(result.by_moe_layer())} MoE layers -> {args.output_dir}")
    return result
