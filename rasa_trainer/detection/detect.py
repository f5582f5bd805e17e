"""Safety-Critical Expert detection, step 1 of RASA (see ``docs/method.md``).

For each (adversarial ``prompt``, plain ``anchor_prompt``) pair the model replies to both contexts (batched, greedy by
default); a judge labels each reply refused or not; pairs whose anchor was refused and whose attack succeeded are kept.
The routing of every generated token of the kept pairs feeds :class:`~rasa_trainer.detection.statistics.ExpertStatistics`
batch by batch (memory does not grow with the dataset), and a selection policy
(:mod:`rasa_trainer.detection.selection`) picks the experts with the largest risk difference.

Under ``torch.distributed`` with ``world_size > 1`` rank ``r`` handles rows ``r::world_size``; counts and pair counts
are summed over ranks, so every rank returns the same selection. Only rank 0 writes artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..data.contract import as_messages, validate_pairs
from ..data.contract import check_chat_template_kwargs
from .backends import GenerationBackend, HFBackend, check_backend, generation_backend
from .generation import GenerationBatch
from ..judges import Judge, RefusalKeywordJudge, run_judge
from ..moe.discovery import MoELayer, moe_layers
from ..run_lock import hold_run_lock
from .progress import detection_fingerprint, open_progress, progress_folder, remove_progress
from .selection import SafetyCriticalExperts, SelectionConfig, select_experts
from .statistics import ExpertStatistics, all_gather_json, distributed_world

logger = logging.getLogger(__name__)

OUTCOMES = ("kept", "anchor_complied", "attack_refused", "both")
"""Pair outcomes: kept (anchor refused, attack succeeded) and the three reasons to drop a pair."""
DROP_REASONS = OUTCOMES[1:]
UNKNOWN_ATTACK = "unknown"


def pair_outcome(anchor_refused: bool, adversarial_refused: bool) -> str:
    """``"kept"`` for a successful jailbreak of a refused request, else why the pair is dropped: ``"anchor_complied"``
    (the plain request was answered), ``"attack_refused"`` (the attack failed) or ``"both"``."""
    if anchor_refused:
        return "attack_refused" if adversarial_refused else "kept"
    return "both" if adversarial_refused else "anchor_complied"


@dataclass
class PairCounts:
    """Pair outcomes per attack family: ``by_attack[attack][outcome]``."""

    by_attack: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, attack: str | None, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        counts = self.by_attack.setdefault(attack or UNKNOWN_ATTACK, dict.fromkeys(OUTCOMES, 0))
        counts[outcome] += 1

    def count(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.by_attack.values())

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.by_attack.values())

    @property
    def kept(self) -> int:
        return self.count("kept")

    @property
    def dropped(self) -> int:
        return self.total - self.kept

    def merge(self, other: "PairCounts") -> "PairCounts":
        """Add ``other``'s counts into this one (in place; returns self)."""
        for attack, counts in other.by_attack.items():
            mine = self.by_attack.setdefault(attack, dict.fromkeys(OUTCOMES, 0))
            for outcome in OUTCOMES:
                mine[outcome] += counts.get(outcome, 0)
        return self

    def all_gather(self, group: Any = None) -> "PairCounts":
        """The counts summed over all processes (identical on every rank)."""
        merged = PairCounts()
        for data in all_gather_json(self.to_dict(), group):
            merged.merge(PairCounts.from_dict(data))
        return merged

    def to_dict(self) -> dict[str, Any]:
        """``{total, kept, dropped, dropped_by_reason: {reason: n}, by_attack: {attack: {total, kept, <reasons>}}}``."""
        by_attack = {
            attack: {"total": sum(c.values()), **{o: c[o] for o in OUTCOMES}}
            for attack, c in sorted(self.by_attack.items())
        }
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped": self.dropped,
            "dropped_by_reason": {reason: self.count(reason) for reason in DROP_REASONS},
            "by_attack": by_attack,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PairCounts":
        return cls({a: {o: int(c.get(o, 0)) for o in OUTCOMES} for a, c in data.get("by_attack", {}).items()})


@dataclass(frozen=True)
class GenerationSettings:
    """How replies are generated during detection (recorded in the JSON)."""

    batch_size: int = 8
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    chat_template_kwargs: Mapping[str, Any] | None = None
    backend: str = "hf"


def collect_expert_statistics(
    model,
    tokenizer,
    dataset,
    *,
    judge: Judge | None = None,
    anchor_column: str = "anchor_prompt",
    generation: GenerationSettings = GenerationSettings(),
    selection: SelectionConfig = SelectionConfig(),
    progress: bool = True,
    progress_dir: str | os.PathLike | None = None,
    shard_size: int | None = None,
    backend: GenerationBackend | None = None,
) -> tuple[ExpertStatistics, PairCounts]:
    """Generate, judge, filter and count: the (all-reduced) statistics and pair counts of a dataset.

    ``selection`` is checked against the model before any generation; for a policy that votes per batch
    (``batch_union``) it also sets the per-batch top-K the statistics vote with.

    Each rank counts its pairs in shards of ``shard_size`` pairs (a multiple of ``generation.batch_size``; default
    :data:`SHARD_BATCHES` batches) and sums the shards' statistics in shard order. With ``progress_dir`` every finished
    shard is written there (:mod:`rasa_trainer.detection.progress`) and the shards already there are read instead of
    generated: an interrupted run given the same folder resumes and ends with the same statistics, bit for bit.

    ``backend`` generates the replies (:mod:`rasa_trainer.detection.backends`; default: HF ``generate`` on ``model``).
    """
    validate_pairs(dataset, anchor_column=anchor_column)  # fail loudly on malformed pairs before any model work
    judge = judge if judge is not None else RefusalKeywordJudge()
    generator = backend if backend is not None else HFBackend(model, tokenizer)
    num_layers, num_experts, _ = moe_shape(moe_layers(model))
    selection.check(num_layers, num_experts)
    # per-batch votes cost a top-k per batch: only collected for a policy registered with batch_votes=True
    vote_k = selection.vote_k(num_layers, num_experts)
    stats = ExpertStatistics(num_layers, num_experts, vote_k=vote_k, vote_threshold=selection.threshold)
    pairs = PairCounts()
    rank, world = distributed_world()
    rows = list(range(rank, len(dataset), world))  # this rank's part; rows keep their dataset index
    shard_size = _shard_size(shard_size, generation.batch_size)
    shards = [rows[start : start + shard_size] for start in range(0, len(rows), shard_size)]
    store = None
    if progress_dir is not None:
        # the settings that shape the statistics (the selection policy applies only to the finished sums, but the
        # per-batch votes of batch_union are counted shard by shard)
        settings = {**asdict(generation), "anchor_column": anchor_column, "shard_size": shard_size,
                    "world_size": world, "vote_k": stats.vote_k, "vote_threshold": stats.vote_threshold}
        # a backend that reads a model folder (vLLM) generates from its files, not from ``model``: identify them too
        fingerprint = detection_fingerprint(model, tokenizer, dataset, judge=judge, settings=settings,
                                            weights_folder=getattr(generator, "model_path", None))
        store = open_progress(os.fspath(progress_dir), fingerprint, rank=rank, world_size=world)
    done = {index for index in range(len(shards)) if store is not None and store.done(index)}
    if done:
        logger.info("RASA: resuming detection from %s: %d of %d shards done (%d pairs of rank %d)", progress_dir,
                    len(done), len(shards), sum(len(shards[i]) for i in done), rank)
    # pairs/s and the ETA count only the pairs generated by this process (tqdm's rate excludes ``initial``)
    bar = tqdm(total=len(rows), initial=sum(len(shards[i]) for i in done), desc="detecting safety-critical experts",
               unit="pair", dynamic_ncols=True, disable=not progress or rank != 0)

    def on_chunk(chunk: list[int], counts: PairCounts) -> None:
        bar.update(len(chunk))
        bar.set_postfix(kept=pairs.kept + counts.kept, dropped=pairs.dropped + counts.dropped)

    for index, shard in enumerate(shards):
        if index in done:
            shard_stats, shard_pairs = store.load(index, shard, stats.settings())
            shard_pairs = PairCounts.from_dict(shard_pairs)
        else:
            shard_stats, shard_pairs = _count_shard(
                generator, judge, dataset, shard, anchor_column, generation, stats.settings(),
                first_chunk=index * shard_size // generation.batch_size, rank=rank, world=world, on_chunk=on_chunk,
            )
            if store is not None:
                store.save(index, shard, shard_stats, shard_pairs.to_dict())
        # every run sums the shards in the same order, so a resumed run's float sums are those of an uninterrupted one
        stats.merge(shard_stats)
        pairs.merge(shard_pairs)
    bar.close()
    if world > 1:
        stats.all_reduce()
        pairs = pairs.all_gather()
    return stats, pairs


SHARD_BATCHES = 16
"""Generation batches per shard of pairs when no ``shard_size`` is given: what an interrupt can lose at most."""


def _shard_size(shard_size: int | None, batch_size: int) -> int:
    if shard_size is None:
        return SHARD_BATCHES * batch_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1 or shard_size % batch_size:
        raise ValueError(f"shard_size={shard_size!r} must be a positive multiple of the batch size {batch_size} (a "
                         f"shard is whole generation batches), e.g. {SHARD_BATCHES * batch_size}, the default")
    return shard_size


def _count_shard(
    generator: GenerationBackend, judge: Judge, dataset, shard: list[int], anchor_column: str, generation: GenerationSettings,
    settings: dict[str, Any], *, first_chunk: int, rank: int, world: int, on_chunk: Callable[..., None],
) -> tuple[ExpertStatistics, PairCounts]:
    """The statistics and pair counts of one shard of this rank's rows, from zero; ``first_chunk``: the index of the
    shard's first generation batch among this rank's, which seeds sampling as in a run without shards."""
    stats = ExpertStatistics(**settings)
    pairs = PairCounts()
    for offset in range(0, len(shard), generation.batch_size):
        chunk = shard[offset : offset + generation.batch_size]
        chunk_index = first_chunk + offset // generation.batch_size
        records = [dataset[i] for i in chunk]  # one record per pair: prompt and anchor can never be re-paired
        adversarial_refused, anchor_refused, adversarial, anchor = _reply_and_judge(
            generator, judge, records, chunk, anchor_column, generation,
            seed=generation.seed + 2 * (chunk_index * world + rank),
        )
        outcomes = [pair_outcome(a, b) for a, b in zip(anchor_refused, adversarial_refused)]
        for record, outcome in zip(records, outcomes):
            pairs.add(record.get("attack"), outcome)
        keep = [o == "kept" for o in outcomes]
        if any(keep):
            stats.update(adversarial.routing_of(keep), anchor.routing_of(keep))
        on_chunk(chunk, pairs)
    return stats, pairs


def _reply_and_judge(
    generator: GenerationBackend, judge: Judge, records: Sequence[Mapping[str, Any]], rows: list[int], anchor_column: str,
    generation: GenerationSettings, seed: int,
) -> tuple[list[bool], list[bool], GenerationBatch, GenerationBatch]:
    """Replies (with routing) to both contexts of a chunk of pairs, and the judge's verdicts (True = refused)."""
    contexts = {
        "adversarial": [as_messages(r["prompt"]) for r in records],
        "anchor": [as_messages(r[anchor_column]) for r in records],
    }
    batches = {
        side: generator.generate_batch(
            convs, max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample,
            temperature=generation.temperature, top_p=generation.top_p, seed=seed + offset, with_routing=True,
            rows=rows, chat_template_kwargs=generation.chat_template_kwargs,
        )
        for offset, (side, convs) in enumerate(contexts.items())
    }
    # one judge call per chunk; a judge failure raises (JudgeError), it never counts as a refusal
    verdicts = run_judge(judge, contexts["adversarial"] + contexts["anchor"],
                         batches["adversarial"].replies + batches["anchor"].replies)
    n = len(records)
    return verdicts[:n], verdicts[n:], batches["adversarial"], batches["anchor"]


def moe_shape(layers: list[MoELayer]) -> tuple[int, int, int]:
    """``(MoE layers, experts per layer, top-k)``; detection needs the same experts and top-k in every MoE layer."""
    experts, top_k = {layer.num_experts for layer in layers}, {layer.top_k for layer in layers}
    if len(experts) != 1 or len(top_k) != 1:
        raise ValueError(f"MoE layers differ in experts per layer {sorted(experts)} or top-k {sorted(top_k)}; "
                         "Safety-Critical Expert detection needs one shape for all MoE layers")
    return len(layers), experts.pop(), top_k.pop()


def detect_safety_critical_experts(
    model,
    tokenizer,
    dataset,
    *,
    judge: Judge | None = None,
    anchor_column: str = "anchor_prompt",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    policy: str = "global_topk",
    num_experts: float = 0.125,
    threshold: float = 0.0,
    top_p_experts: float = 0.5,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model_revision: str | None = None,
    shard_size: int | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    backend: str | GenerationBackend = "hf",
    vllm_kwargs: Mapping[str, Any] | None = None,
) -> SafetyCriticalExperts:
    """Find the Safety-Critical Experts of ``model`` on a dataset of (adversarial, anchor) pairs.

    Args:
        model / tokenizer: a transformers 5 MoE causal LM and its tokenizer (with a chat template and a pad token).
        dataset: rows with ``prompt`` and ``anchor_column`` (see :mod:`rasa_trainer.data.contract`); validated first.
        judge: refusal judge (default :class:`~rasa_trainer.judges.RefusalKeywordJudge`); failures raise.
        batch_size / max_new_tokens / do_sample / temperature / top_p / seed: generation settings (``seed`` also
            seeds the ``random`` policy, the same on every rank).
        policy / num_experts / threshold / top_p_experts: see :class:`~rasa_trainer.detection.selection.SelectionConfig`.
        output_dir: if given, rank 0 writes ``safety_critical_experts.json``, ``expert_stats.csv`` and
            ``risk_difference.png`` there, and detection is resumable: the statistics of every finished shard of pairs
            are kept in ``output_dir/detection_progress/`` until the artifacts are written, so the same call after an
            interrupt resumes where it stopped (with the same result); a folder holding another run's partial
            detection is refused (``DetectionProgressError``, naming what differs). Rank 0 holds the folder's run lock
            meanwhile (one run per folder).
        progress: show a progress bar (rank 0 only) with pairs/s and the time left.
        model_revision: recorded in the JSON (defaults to the config's commit hash when loaded from the Hub cache).
        shard_size: pairs per shard, the unit of progress kept (a multiple of ``batch_size``; default 16 batches).
        chat_template_kwargs: extra chat-template variables, e.g. ``{"enable_thinking": False}`` for Qwen3.
        backend: ``"hf"`` (transformers ``generate`` on ``model``), ``"vllm"`` (vLLM on the model's folder, which
            must hold the weights of ``model``; ``model`` may then be an empty skeleton on the ``meta`` device; one
            process only) or a :class:`~rasa_trainer.detection.backends.GenerationBackend`. Both engines feed the
            same statistics (see :mod:`rasa_trainer.detection.backends` for what is exact).
        vllm_kwargs: further ``vllm.LLM`` arguments for ``backend="vllm"`` (e.g. ``gpu_memory_utilization``).

    Raises:
        DatasetContractError: malformed pairs. JudgeError: the judge failed.
        EmptySelectionError: no pair survived the filter or no expert met the criteria (the message shows why).
        OutputFolderError: another run holds ``output_dir``, or it holds another run's partial detection.
    """
    selection = SelectionConfig(policy, num_experts, threshold, top_p_experts, seed)
    rank, world = distributed_world()
    backend_name = backend if isinstance(backend, str) else backend.name
    if isinstance(backend, str):
        check_backend(backend, world, vllm_kwargs)  # before any work: a clear error naming the fix
    elif vllm_kwargs:
        raise ValueError("vllm_kwargs configure a backend built here; pass them to the GenerationBackend you give")
    generation = GenerationSettings(batch_size, max_new_tokens, do_sample, temperature, top_p, seed,
                                    check_chat_template_kwargs(chat_template_kwargs) or None, backend_name)
    shard_size = _shard_size(shard_size, batch_size)
    judge = judge if judge is not None else RefusalKeywordJudge()
    folder = progress_folder(output_dir) if output_dir is not None else None
    # one run per output folder: rank 0 writes there (joining the hold of a trainer that runs this at train start)
    with contextlib.ExitStack() as stack:
        if folder is not None and rank == 0:
            stack.enter_context(hold_run_lock(os.fspath(output_dir)))
        # a backend built here is closed here (vLLM's engine freed before the caller goes on, e.g. to train)
        generator = stack.enter_context(generation_backend(backend, model, tokenizer, engine_kwargs=vllm_kwargs)) \
            if isinstance(backend, str) else backend
        result = _detect_and_select(
            model, tokenizer, dataset, judge, anchor_column, generation, selection, progress, folder, shard_size,
            model_revision, generator,
        )
        if output_dir is not None and rank == 0:
            result.save(output_dir)
        if world > 1:
            # unconditional, so ranks that were given no output_dir (e.g. by a trainer) cannot leave rank 0 waiting;
            # other ranks return only once the artifacts exist
            torch.distributed.barrier()
        if folder is not None and rank == 0:
            remove_progress(folder)  # the artifacts are written: nothing is left to resume
    return result


def _detect_and_select(model, tokenizer, dataset, judge: Judge, anchor_column: str, generation: GenerationSettings,
                       selection: SelectionConfig, progress: bool, progress_dir: str | None, shard_size: int,
                       model_revision: str | None, generator: GenerationBackend) -> SafetyCriticalExperts:
    stats, pairs = collect_expert_statistics(
        model, tokenizer, dataset, judge=judge, anchor_column=anchor_column, generation=generation,
        selection=selection, progress=progress, progress_dir=progress_dir, shard_size=shard_size, backend=generator,
    )
    pair_dict = pairs.to_dict()
    mask = select_experts(stats, selection, pairs=pair_dict)
    num_layers, num_experts_per_layer, _ = moe_shape(moe_layers(model))
    rank, world = distributed_world()
    result = SafetyCriticalExperts.from_statistics(
        model, stats, mask,
        selection={**selection.to_dict(), "k": selection.k(num_layers, num_experts_per_layer)},
        judge=str(getattr(judge, "name", type(judge).__name__)),
        generation={**asdict(generation), "anchor_column": anchor_column, "world_size": world,
                    "shard_size": shard_size},
        pairs=pair_dict,
        model_revision=model_revision,
    )
    return result
