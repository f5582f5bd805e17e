"""The retain data of the expert phase (:class:`RetainData`): benign prompt/completion rows mixed into expert-phase
batches so that repairing the Safety-Critical Experts keeps the answers benign inputs routed through them already had.

- **Rows.** TRL's prompt-completion shape: ``prompt`` (a string or chat messages ending with a user turn) and an
  optional ``completion`` (a string or one assistant message). Rows without a completion get the base model's own
  greedy reply, generated once, batched, before training (self-distillation).
- **Schedule.** ``retain_ratio`` retain rows per pair row: the expert-phase micro-batch holding pairs ``[a, a + B)`` of
  the run's stream of expert-phase pairs gets the retain slots ``[floor(r a), floor(r (a + B)))``, and slot ``k`` is
  row ``perm_c[k mod M]`` of a permutation of the ``M`` retain rows drawn from the seed for cycle ``c = k // M``. The
  rows of a step follow from the seed and the step alone, so a resumed run sees exactly the rows of an uninterrupted
  one, and every retain row is used once per cycle.
- **Loss.** The pairs' mean cross-entropy plus ``retain_loss_weight`` times the retain rows' mean, each over its own
  tokens of the optimiser step (``losses.retain_weighted_cross_entropy``); ``retain_loss`` is logged apart from
  ``completion_loss``.
- **In the trainer.** The rows are checked at construction (:func:`_validated_retain`), their lengths after it,
  their missing replies are completed before training (:meth:`RetainData.prepare`), a micro-batch's retain rows are
  appended in ``get_batch_samples`` (:meth:`RetainData.with_rows`) and the loss is built in ``compute_loss``.

The private APIs of our dependencies used here are listed in ``docs/compatibility.md``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch import nn

from .config import RASAConfig
from ..data.contract import (
    COMPLETION_COLUMN,
    PROMPT_COLUMN,
    DatasetContractError,
    _check_conversations,
    _check_mixed_formats,
    _Collector,
    _column_values,
    _columns,
    _completion_problem,
    _MISSING,
    as_messages,
    completion_text,
)
from ..detection.generation import generate_replies
from ..moe.discovery import unwrap_model
from .losses import part_token_means, retain_weighted_cross_entropy, token_losses
from .training_data import _chat_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def retain_rows(dataset: Any, max_errors: int = 10) -> list[dict[str, Any]]:
    """The retain rows as a list of ``{"prompt", "completion"}`` dicts (``completion`` None where it is to be
    generated), after checking every row; raises one ``ValueError`` naming row and column of each problem."""
    try:
        columns, num_rows = _columns(dataset)
    except DatasetContractError as err:
        raise ValueError(f"retain_dataset: {'; '.join(err.errors)}") from None
    collector = _Collector(max_errors)
    if num_rows == 0:
        collector.add("retain_dataset has no rows; pass None to train without retain data")
    elif PROMPT_COLUMN not in columns:
        collector.add(f"column 'prompt' is missing from all {num_rows} rows (columns present: {sorted(columns)}); "
                      f"retain rows need a 'prompt' and optionally a 'completion'")
    if collector.total:
        _raise(collector)
    prompts = _column_values(dataset, PROMPT_COLUMN)
    _check_conversations(prompts, PROMPT_COLUMN, collector)
    completions = _column_values(dataset, COMPLETION_COLUMN) if COMPLETION_COLUMN in columns else [_MISSING] * num_rows
    _check_mixed_formats(completions, COMPLETION_COLUMN, collector)
    for i, value in enumerate(completions):
        if value is _MISSING or value is None:
            continue
        problem = _completion_problem(value)
        if problem:
            collector.row(i, COMPLETION_COLUMN, problem.replace("refusal text", "reply to keep") +
                          " (or leave it out to have the base model's reply generated)")
    if collector.total:
        _raise(collector)
    return [{"prompt": p, "completion": None if c is _MISSING else c} for p, c in zip(prompts, completions)]


def _raise(collector: _Collector) -> None:
    shown = f"showing the first {len(collector.errors)}" if collector.total > len(collector.errors) else "all shown"
    lines = "\n".join(f"  - {e}" for e in collector.errors)
    raise ValueError(f"retain_dataset: {collector.total} error(s) ({shown}):\n{lines}")


def retain_sha256(rows: list[dict[str, Any]]) -> str:
    """A digest of the retain rows as given (prompts-only rows by their prompt: their replies follow from the model)."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def generate_completions(model, tokenizer, prompts: list, *, batch_size: int, max_new_tokens: int,
                         chat_template_kwargs: dict | None = None) -> list[str]:
    """The model's greedy replies to ``prompts`` (chat messages), in one batched pass."""
    replies: list[str] = []
    for batch in generate_replies(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  do_sample=False, progress=False, desc="retain completions",
                                  chat_template_kwargs=chat_template_kwargs):
        replies.extend(batch.replies)
    return replies


@functools.lru_cache(maxsize=64)
def _permutation(seed: int, cycle: int, num_rows: int) -> tuple[int, ...]:
    order = list(range(num_rows))
    random.Random(f"rasa-retain/{seed}/{cycle}").shuffle(order)
    return tuple(order)


def retain_slots(first_pair: int, num_pairs: int, ratio: float, num_rows: int, seed: int) -> list[int]:
    """The retain rows next to the pairs ``[first_pair, first_pair + num_pairs)`` of the expert-phase pair stream."""
    if ratio <= 0 or num_rows == 0 or num_pairs <= 0:
        return []
    start = math.floor(ratio * first_pair + 1e-9)
    end = math.floor(ratio * (first_pair + num_pairs) + 1e-9)
    return [_permutation(seed, k // num_rows, num_rows)[k % num_rows] for k in range(start, end)]


_PAD_LABEL = -100


def append_rows(batch: dict[str, Any], extra: dict[str, torch.Tensor], retain_index: list[int],
                pad_token_id: int) -> dict[str, Any]:
    """``batch`` (a right-padded collated micro-batch of pairs) with the collated retain rows ``extra`` appended as
    further rows; the pairs' own extras (anchors, row indices) are left as they are."""
    num_pairs = batch["input_ids"].shape[0]
    width = max(batch["input_ids"].shape[1], extra["input_ids"].shape[1])
    out = dict(batch)
    device = batch["input_ids"].device
    for key, value in extra.items():
        if key not in batch:
            raise KeyError(f"the retain rows were collated with {key!r}, which the pair batch lacks")
        pad = pad_token_id if key == "input_ids" else _PAD_LABEL if key == "labels" else 0
        out[key] = torch.cat([_pad_to(batch[key], width, pad), _pad_to(value.to(device), width, pad)])
    if "rasa_context_mask" in batch:  # the router phase's context: none on retain rows
        mask = _pad_to(batch["rasa_context_mask"], width, False)
        out["rasa_context_mask"] = torch.cat([mask, mask.new_zeros((len(retain_index), width))])
    for key, value in batch.items():
        per_row = torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == num_pairs
        if per_row and key not in extra and key != "rasa_context_mask" and not key.startswith("anchor_"):
            raise KeyError(f"cannot append retain rows to a batch with the per-row key {key!r}")
    out["rasa_retain_index"] = torch.tensor(retain_index, dtype=torch.long, device=device)
    return out


def _pad_to(t: torch.Tensor, width: int, value) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


def _validated_retain(retain_dataset, args: RASAConfig, compute_loss_func=None,
                      train_dataset=None) -> list[dict] | None:
    """The retain rows, checked (errors name row and column), or None when no retain data is used.

    Also refused: ``retain_ratio`` set away from its default without a ``retain_dataset`` (it would do nothing), and,
    when ``train_dataset`` is given, retain rows that repeat a pair's prompt or anchor without a refusal (see
    :func:`rasa_trainer.data.contract.retain_conflicts`): they would train the model to answer what the pairs train it
    to refuse.
    """
    import dataclasses

    from ..data.contract import retain_conflicts
    from ..judges import RefusalKeywordJudge

    if retain_dataset is None:
        defaults = {f.name: f.default for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else {}
        default = defaults.get("retain_ratio", dataclasses.MISSING)
        if args.retain_ratio and default is not dataclasses.MISSING and args.retain_ratio != default:
            raise ValueError(f"retain_ratio={args.retain_ratio} is set but no retain_dataset is given, so it would do "
                             "nothing; pass the retain rows (RASATrainer(retain_dataset=...), `rasa-trainer train "
                             f"--retain_dataset`), or leave retain_ratio at its default ({default})")
        return None
    rows = retain_rows(retain_dataset)
    if args.retain_ratio == 0:
        logger.warning("RASA: retain_dataset is ignored with retain_ratio=0")
        return None
    if args.rasa_schedule not in ("alternate", "expert_only"):
        logger.warning("RASA: retain_dataset is ignored with rasa_schedule=%r (retain rows join expert-phase batches "
                       "only)", args.rasa_schedule)
        return None
    _check_loss_supports_retain(args, compute_loss_func)
    if train_dataset is not None:
        conflicts = retain_conflicts(rows, train_dataset, RefusalKeywordJudge().is_refusal,
                                     anchor_column=getattr(args, "anchor_column", "anchor_prompt"))
        if conflicts:
            lines = "\n".join(f"  - {c}" for c in conflicts[:10])
            more = " (showing the first 10)" if len(conflicts) > 10 else ""
            raise ValueError(f"retain_dataset: {len(conflicts)} row(s) repeat a training pair's prompt without a "
                             f"refusal{more}:\n{lines}")
    return rows


def _check_loss_supports_retain(args: RASAConfig, compute_loss_func) -> None:
    """The retain rows' own mean is built from TRL's per-token log-probabilities of the default loss path (``nll`` or
    ``dft``); a custom loss function or label smoothing computes the loss elsewhere."""
    if compute_loss_func is not None:
        raise ValueError("retain_dataset with compute_loss_func: RASA weighs the retain rows' loss against the pairs' "
                         "from TRL's per-token loss, which a custom loss function replaces. Drop one of the two.")
    if args.loss_type not in ("nll", "dft"):
        raise ValueError(f"retain_dataset with loss_type={args.loss_type!r}: retain rows support 'nll' and 'dft'")
    if args.label_smoothing_factor:
        raise ValueError(f"retain_dataset with label_smoothing_factor={args.label_smoothing_factor}: label smoothing "
                         f"computes the loss outside TRL's per-token path the retain weighting uses; set it to 0")


@contextlib.contextmanager
def _captured_outputs(model):
    """The outputs of the (unwrapped) model's forward calls inside the block."""
    captured: list = []
    handle = unwrap_model(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


def expert_micro_batch(*, expert_epochs_before: int, epoch: int, global_step: int, steps_per_epoch: int,
                       accumulation_steps: int, micro_step: int, num_processes: int = 1, process_index: int = 0) -> int:
    """The index of a micro-batch in the run's stream of expert-phase micro-batches (one per process): from the expert
    epochs before the current ``epoch``, the optimiser step in that epoch, the micro-batch of the accumulation and the
    process. The stream is the same for a resumed run as for an uninterrupted one."""
    step_in_epoch = global_step - epoch * steps_per_epoch
    micro = (expert_epochs_before * steps_per_epoch + step_in_epoch) * accumulation_steps + micro_step
    return micro * num_processes + process_index


class RetainData:
    """The retain rows of a run (``rows``: checked, ``completion`` None where it is to be generated), their tokenised
    form (``examples``, after :meth:`prepare`), the rows each expert-phase micro-batch gets, and the split loss.

    ``ratio``, ``loss_weight``, ``seed``: ``retain_ratio``, ``retain_loss_weight`` and the run's seed;
    ``pairs_per_batch``: pairs per micro-batch (``per_device_train_batch_size``); ``loss_type``: TRL's (``nll`` or
    ``dft``); ``max_length``: the truncation length; ``generation_batch_size`` / ``max_new_tokens``: of the generated
    replies; ``collate`` / ``pad_token_id``: TRL's collator and the padding token the retain rows are appended with.
    """

    def __init__(self, rows: list[dict] | None, *, ratio: float, loss_weight: float, seed: int, pairs_per_batch: int,
                 collate: Callable[[list[dict]], dict] | None = None, pad_token_id: int | None = None,
                 loss_type: str = "nll", max_length: int | None = None, generation_batch_size: int = 8,
                 max_new_tokens: int = 128, chat_template_kwargs: dict | None = None):
        self.rows = rows
        self.ratio, self.loss_weight, self.seed = ratio, loss_weight, seed
        self.pairs_per_batch, self.loss_type, self.max_length = pairs_per_batch, loss_type, max_length
        self.collate, self.pad_token_id = collate, pad_token_id
        self.generation_batch_size, self.max_new_tokens = generation_batch_size, max_new_tokens
        self.chat_template_kwargs = chat_template_kwargs or None  # rendered as the pairs are (TRL's row column)
        self.examples: list[dict] | None = None  # tokenised at the start of train()
        self.step_items: tuple = (None, None)  # completion tokens of the pairs / retain rows in the optimiser step

    @property
    def active(self) -> bool:
        """Whether expert-phase batches get retain rows (the rows are prepared and there is at least one)."""
        return bool(self.examples)

    # ------------------------------------------------------------------------------------------ before training
    def check_lengths(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse retain rows whose completion (or, without one, whose prompt) would be cut by truncation."""
        if self.max_length is None or self.rows is None:
            return
        too_long = []
        for i, row in enumerate(self.rows):
            n = _row_length(tokenizer, row, self.chat_template_kwargs)
            if n > self.max_length:
                too_long.append(f"row {i} ({n} tokens)")
        if too_long:
            raise ValueError(
                f"{len(too_long)} row(s) of retain_dataset exceed max_length={self.max_length} with their "
                f"completion (or leave no room for a generated one), so truncation would cut the reply to keep: "
                f"{', '.join(too_long[:5])}. Raise max_length or shorten those rows."
            )

    def prepare(self, tokenizer: PreTrainedTokenizerBase, tokenise: Callable[[Dataset], Dataset],
                generation_model: Callable[[], nn.Module]) -> None:
        """Generate the missing completions with the model as it is before training (greedy, batched, once;
        ``generation_model`` returns it, ready to generate) and tokenise the rows with ``tokenise`` (TRL's own
        tokenisation of the pairs). Done once."""
        if self.rows is None or self.examples is not None:
            return
        rows = self.rows
        texts = {i: completion_text(row["completion"], None) for i, row in enumerate(rows) if row["completion"] is not None}
        missing = [i for i, row in enumerate(rows) if row["completion"] is None]
        if missing:
            texts.update(zip(missing, self._generated_replies(generation_model, tokenizer, missing)))
        template = {"chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else {}
        dataset = Dataset.from_list([
            {"prompt": as_messages(row["prompt"]), "completion": [{"role": "assistant", "content": texts[i]}],
             **template}
            for i, row in enumerate(rows)
        ])
        prepared = tokenise(dataset)
        if len(prepared) != len(rows):
            raise ValueError(f"{len(rows) - len(prepared)} retain row(s) have no completion token left after "
                             f"tokenisation; check their completions and max_length")
        self.examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared]

    def _generated_replies(self, generation_model: Callable[[], nn.Module], tokenizer: PreTrainedTokenizerBase,
                           missing: list[int]) -> list[str]:
        model = generation_model()
        logger.info("RASA: generating the base model's replies to %d retain prompts", len(missing))
        replies = generate_completions(
            model, tokenizer, [as_messages(self.rows[i]["prompt"]) for i in missing],
            batch_size=self.generation_batch_size, max_new_tokens=self.max_new_tokens,
            chat_template_kwargs=self.chat_template_kwargs)
        empty = [i for i, reply in zip(missing, replies) if not reply.strip()]
        if empty:
            raise ValueError(
                f"the base model's reply to {len(empty)} retain prompt(s) is empty (rows {empty[:10]}), so there "
                f"is nothing to retain; give those rows a completion or drop them")
        return replies

    # ------------------------------------------------------------------------------------------ batches
    def slots(self, micro_batch: int, num_pairs: int) -> list[int]:
        """The retain rows of expert-phase micro-batch ``micro_batch`` (see :func:`expert_micro_batch`) of
        ``num_pairs`` pairs."""
        return retain_slots(micro_batch * self.pairs_per_batch, num_pairs, self.ratio, len(self.examples), self.seed)

    def with_rows(self, batch: dict, micro_batch: int) -> dict:
        """The expert-phase micro-batch ``micro_batch`` with its retain rows appended (unchanged without any)."""
        rows = self.slots(micro_batch, int(batch["input_ids"].shape[0]))
        if not rows:
            return batch
        extra = self.collate([dict(self.examples[i]) for i in rows])
        return append_rows(batch, extra, rows, self.pad_token_id)

    def count_step_items(self, batch_samples: list[dict], count: Callable[[list[dict]], object]) -> None:
        """Completion tokens of the pairs and of the retain rows over the optimiser step, counted by ``count`` as
        Trainer counts ``num_items_in_batch`` (every micro-batch, and every process when tokens are averaged across
        devices)."""
        pairs, retain = [], []
        for batch in batch_samples:
            num_pairs = batch["input_ids"].shape[0] - len(batch.get("rasa_retain_index", ()))
            pairs.append({"labels": batch["labels"][:num_pairs]})
            retain.append({"labels": batch["labels"][num_pairs:]})
        self.step_items = (count(pairs), count(retain))

    # ------------------------------------------------------------------------------------------ loss
    def weighted_loss(self, loss: torch.Tensor | tuple, captured: list, num_pairs: int,
                      num_items_in_batch: torch.Tensor | int | None, process_factor: int | None = None
                      ) -> torch.Tensor | tuple:
        """The expert-phase loss of a micro-batch with retain rows: the pairs' mean cross-entropy over their
        completion tokens plus ``loss_weight`` times the retain rows' mean over theirs. Each mean is over its part's
        tokens of the optimiser step (local tokens when Trainer counts none), so however many tokens the retain rows
        bring they never dilute the refusal objective. Built from TRL's per-token log-probabilities of the forward in
        ``captured``, scaled as TRL scales its own loss (``process_factor``; see ``SFTTrainer.compute_loss``)."""
        out = captured[0] if captured else None
        log_probs = getattr(out, "log_probs", None)
        if log_probs is None or (torch.is_grad_enabled() and not log_probs.requires_grad):
            raise RuntimeError("the retain-weighted loss needs TRL's per-token log-probabilities with gradients (its "
                               "default loss path); this forward gave none")
        per_token = token_losses(log_probs, self.loss_type)
        mask = out.label_mask
        if num_items_in_batch is not None and self.step_items[0] is not None:
            pair_items, retain_items = self.step_items
        else:
            pair_items, retain_items = mask[:num_pairs].sum(), mask[num_pairs:].sum()
        weighted = retain_weighted_cross_entropy(per_token, num_pairs, pair_items, retain_items, self.loss_weight)
        if process_factor is not None:
            weighted = weighted * process_factor
        return (weighted, *loss[1:]) if isinstance(loss, tuple) else weighted

    @staticmethod
    def log_split_losses(captured: list, num_pairs: int, metrics: MutableMapping[str, list]) -> None:
        """``completion_loss`` (the pairs) and ``retain_loss`` (the retain rows) appended to ``metrics``: the mean
        cross-entropy over each part's completion tokens in this micro-batch."""
        if not captured or getattr(captured[0], "log_probs", None) is None:
            return  # a forward that gives no per-token log-probabilities (e.g. a custom compute_loss_func)
        out = captured[0]
        for key, value in part_token_means(out.log_probs.detach(), out.label_mask.detach(), num_pairs).items():
            metrics[key].append(value)


def _row_length(tokenizer: PreTrainedTokenizerBase, row: dict, chat_template_kwargs: dict | None = None) -> int:
    """Tokens of a retain row with its completion (or its prompt and at least one generated token)."""
    messages = as_messages(row["prompt"])
    if row["completion"] is not None:
        return len(_chat_ids(tokenizer, messages + [{"role": "assistant", "content": completion_text(
            row["completion"], None)}], generation_prompt=False, chat_template_kwargs=chat_template_kwargs))
    return len(_chat_ids(tokenizer, messages, generation_prompt=True, chat_template_kwargs=chat_template_kwargs)) + 1
