"""RASA's pieces under torch FSDP2 (``fully_shard``) on CPU with gloo, against the same steps without FSDP.

Run by tests/training/test_fsdp2.py with ``torchrun --nproc_per_node 2 tests/jobs/fsdp2_rasa.py OUT_DIR [delta|lora]
[fsdp2|zero3]``. ``zero3``: DeepSpeed ZeRO-3 (``DS_ACCELERATOR=cpu``, gloo) instead of FSDP2, in fp32 (a ZeRO-3
config without a bf16 section builds and trains the model in fp32; the reference does the same steps in fp32). There
the model is loaded with ``from_pretrained`` while transformers sees the ZeRO-3 config, so it is partitioned as it
loads (``deepspeed.zero.Init``, as under Trainer) and the repairs are attached to partitioned experts; the groups are
RASATrainer's (``ParameterGroups.setup``: MoE blocks as ZeRO-3 leaves whose input needs a gradient; Trainer's AdamW
regrouped, the inactive group left out of the step); every parameter is partitioned and released after use
(``stage3_param_persistence_threshold: 0``: routers and repairs too); the merged save is
``engine._zero3_consolidated_16bit_state_dict()`` (what ``accelerator.get_state_dict`` gathers) through
``merged_state_dict``.

Under ZeRO-3 the run takes a third step (the expert phase again) after a checkpoint written after the second, as
RASATrainer writes one (``save_zero3_checkpoint``: the trained parameters taken from the consolidated state dict by
``saving._trainable_state``, then DeepSpeed's own ``save_checkpoint``), and a second engine resumes from it as a resumed
RASATrainer does (``resume_zero3``: the repairs attached afresh, DeepSpeed's state loaded by transformers'
``deepspeed_load_checkpoint``, checked by ``saving._check_engine_restored``) and takes the third step; the report
compares the checkpoint's file with the unsharded run's parameters after step 2, and the resumed run's losses and
final merged weights with the uninterrupted run's.

The Trainer cannot run FSDP on the CPU (accelerate falls back to DDP there), so this job drives the pieces the
Trainer uses directly, in the order it uses them:

1. a tiny Qwen3-MoE in bf16; repairs attached (``attach_repairs``) and routers upcast to fp32 master weights
   (``upcast_routers``) *before* sharding, so every decoder layer is one FSDP2 unit holding bf16 weights, fp32
   routers and fp32 repairs side by side;
2. ``fully_shard`` per decoder layer, then the root (``reshard_after_forward=True``: parameters are freed after each
   layer's forward and all-gathered again in backward);
3. routing recorded under FSDP (``record_routing``: hooks on the routers) and checked against the routing recorded
   on the unsharded model;
4. one expert-phase step: routing replayed (``replay_routing``, active through backward, where FSDP re-gathers the
   layers), completion cross-entropy, AdamW on the repairs only;
5. one router-phase step: the router KL(anchor || adversarial) of token-mean router probabilities (as
   ``RASATrainer._router_loss`` computes it, pooled), AdamW on the routers only;
6. the merged save: the full state dict gathered with ``get_model_state_dict(full_state_dict=True,
   cpu_offload=True)`` and merged by ``rasa_trainer.repairs.layer.merged_state_dict``; rank 0 writes it with
   ``save_pretrained`` and reloads it with ``AutoModelForCausalLM.from_pretrained``.

The reference runs the same two steps on the unsharded model in one process, over both ranks' micro-batches, with
the loss averaged over the two halves as FSDP averages the ranks' gradients. Rank 0 writes
``fsdp2_report_<mode>.json``.

The router-phase loss is read off the routers (hooks inside each decoder layer), not off the layers' outputs, while
FSDP2 re-gathers a resharded unit in backward only when a gradient reaches that unit's *output*: the last decoder
layer's output gets none (the loss ignores the logits), so its router's backward finds the resharded (freed) weight
storage and fails (``setStorage: ... out of bounds for storage of size 0``). ``CONNECT_OUTPUT=1`` (the default) adds
``0 * logits.sum()`` (one position: ``logits_to_keep=1``) to the router loss, which routes a zero gradient through
every unit's output so FSDP2 re-gathers each one first; ``CONNECT_OUTPUT=0`` shows the failure.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from conftest import tiny_model  # noqa: E402

from rasa_trainer.moe.discovery import moe_layers  # noqa: E402
from rasa_trainer.repairs.layer import attach_repairs, merged_state_dict, repair_modules, upcast_routers  # noqa: E402
from rasa_trainer.moe.routing import record_routing, replay_routing  # noqa: E402
from rasa_trainer.training.router_loss import _kl, _masked_mean  # noqa: E402

SELECTION = {0: [1, 3, 5], 1: [0, 2, 6]}
LR = 1e-2
CONNECT_OUTPUT = os.environ.get("CONNECT_OUTPUT", "1") == "1"


def build(mode: str, attach: bool = True, dtype: torch.dtype = torch.bfloat16):
    model = tiny_model("qwen3_moe", seed=0).to(dtype)
    model.config.use_cache = False
    if not attach:
        return model, None, None
    for p in model.parameters():
        p.requires_grad_(False)
    repairs = attach_repairs(model, SELECTION, mode=mode, rank=4, alpha=8.0)
    _init_lora(model, mode)
    routers = upcast_routers(model)
    return model, repairs, routers


def _init_lora(model, mode: str) -> None:
    if mode == "lora":
        # non-zero B so the merged weights move on the first step's gradient of A as well
        with torch.no_grad():
            for _, r in repair_modules(model):
                for name in r.names:
                    factors = r.factors(name)
                    if factors is not None:
                        factors[1].normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))


def batches():
    """Each rank's micro-batch (adversarial prompt + completion, and the anchor prompt), from one seed."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        ids = torch.randint(3, 128, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # right padding in the second row
        labels = ids.masked_fill(mask == 0, -100).clone()
        labels[:, :6] = -100  # prompt positions carry no loss
        context = (labels == -100) & mask.bool()
        anchor = torch.randint(3, 128, (2, 7), generator=g)
        anchor_mask = torch.ones_like(anchor)
        anchor_mask[0, -2:] = 0
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels, context=context, anchor_ids=anchor,
                        anchor_mask=anchor_mask))
    return out


def expert_loss(model, batch, routing):
    with replay_routing(model, routing):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, out


def router_loss(model, batch):
    with torch.no_grad(), record_routing(model, probabilities=True) as anchor_rec:
        model(input_ids=batch["anchor_ids"], attention_mask=batch["anchor_mask"], logits_to_keep=1)
    with record_routing(model, probabilities=True, detach=False) as adv_rec:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    terms = []
    for p_anchor, p_adv in zip(anchor_rec.routing().probabilities, adv_rec.routing().probabilities):
        terms.append(_kl(_masked_mean(p_anchor, batch["anchor_mask"].bool()), _masked_mean(p_adv, batch["context"])))
    loss = torch.stack(terms).mean()
    if CONNECT_OUTPUT:
        loss = loss + 0.0 * out.logits.float().sum()
    return loss


def record(model, batch):
    with torch.no_grad(), record_routing(model, probabilities=False) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return rec.routing()


def _freeze_others(repairs, routers):
    def activate(group: str) -> None:
        for p in repairs:
            p.requires_grad_(group == "experts")
        for p in routers:
            p.requires_grad_(group == "routers")

    return activate


def train_steps(model, repairs, routers, my_batches, world: int, backward=None, step=None, activate=None,
                phases=("expert", "router"), after_step=None):
    """One optimiser step per phase in ``phases`` over ``my_batches`` (this process's micro-batches); returns the
    losses and the routing recorded before the first expert step. As RASATrainer: one AdamW with a group per phase,
    the inactive group frozen and without gradients, each expert step replaying the routing recorded at its start.
    ``backward(loss)``, ``step(optimizer)`` and ``activate(group)`` default to torch's and plain ``requires_grad``
    switches (FSDP2 and the reference); DeepSpeed passes its engine's and RASATrainer's ``ParameterGroups.activate``.
    ``after_step(n)`` runs after the n-th step (where a checkpoint is written)."""
    optimizer = torch.optim.AdamW([{"params": repairs}, {"params": routers}], lr=LR, weight_decay=0.0)
    backward = backward or (lambda loss: loss.backward())
    activate = activate or _freeze_others(repairs, routers)

    def default_step(opt):
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = step or default_step
    first_routings = None
    losses = {"expert": [], "router": []}
    for index, phase in enumerate(phases):
        if phase == "expert":
            # expert phase: the routing recorded at its start replayed; repairs trainable, routers frozen
            model.eval()
            routings = [record(model, b) for b in my_batches]
            first_routings = first_routings or routings
            model.train()
            activate("experts")
            for b, routing in zip(my_batches, routings):
                loss, _ = expert_loss(model, b, routing)
                backward(loss * world / 2)  # the engine averages over `world` ranks; the reference sums halves / 2
                losses["expert"].append(float(loss.detach()))
        else:
            # router phase: routers trainable, repairs frozen
            model.train()
            activate("routers")
            for b in my_batches:
                loss = router_loss(model, b)
                backward(loss * world / 2)
                losses["router"].append(float(loss.detach()))
        step(optimizer)
        if after_step is not None:
            after_step(index + 1)
    model.eval()
    return losses, first_routings


def reference(mode: str, dtype: torch.dtype = torch.bfloat16, phases=("expert", "router"), after_step=None):
    model, repairs, routers = build(mode, dtype=dtype)
    losses, routings = train_steps(model, repairs, routers, batches(), world=1, phases=phases,
                                   after_step=(lambda n: after_step(n, model, repairs, routers)) if after_step else None)
    return model, losses, routings


CHECKPOINT_STEP = 2  # under ZeRO-3 a checkpoint is written after the router step, and the run resumed from it


def zero3_engine(base_dir: str, config: dict, mode: str, dtype: torch.dtype, init_lora: bool = True):
    """The model loaded and wrapped as RASATrainer's under ZeRO-3; returns the engine, the groups, whether the experts
    were partitioned when the repairs were attached and the dtypes of the first decoder layer."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from rasa_trainer.training.param_groups import ParameterGroups, learning_rates

    # while this object lives transformers reports ZeRO-3 enabled and builds models under deepspeed.zero.Init
    # (partitioned as they are created), as from_pretrained does under Trainer with a ZeRO-3 config
    ds_config = HfDeepSpeedConfig(config)  # noqa: F841 - deleted below, once the engine is built
    # as RASATrainer: the groups set up by ParameterGroups (repairs attached, routers upcast, every MoE block a
    # ZeRO-3 leaf whose input needs a gradient), Trainer's AdamW regrouped by RASA group, phases switched by
    # ParameterGroups.activate (the inactive group takes no optimiser step)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.config.use_cache = False
    partitioned_at_attach = all(p.numel() == 0 for p in model.model.layers[0].mlp.experts.parameters())
    groups = ParameterGroups(learning_rates(LR, LR))
    groups.setup(model, "alternate", SELECTION, tuning=mode, lora_rank=4, lora_alpha=8.0)
    if init_lora:
        _init_lora(model, mode)
    unit_dtypes = sorted({str(p.dtype) for p in model.model.layers[0].parameters()})
    cls, kwargs = groups.optimizer_cls_and_kwargs(torch.optim.AdamW, {"lr": LR, "weight_decay": 0.0})
    groups.follow(model)
    inner = cls([{"params": [p for p in model.parameters() if p.requires_grad]}], **kwargs)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=inner, config=config)
    del ds_config  # the reference and the reload are plain models
    return ds_engine, groups, partitioned_at_attach, unit_dtypes


def save_zero3_checkpoint(ds_engine, groups, folder: str, rank: int) -> dict:
    """What RASATrainer's checkpoint writes under ZeRO-3, in Trainer's order: the consolidated state dict
    (``save_model``: ``accelerator.get_state_dict``, every rank), RASA's trained parameters taken from it
    (``CheckpointingMixin._save_rasa_state``, rank 0), then DeepSpeed's own state (``_save_optimizer_and_scheduler``:
    ``engine.save_checkpoint``, every rank). Rank 0 also records that the partitions alone are refused."""
    from rasa_trainer.training.checkpoints import TRAINABLE_FILE
    from rasa_trainer.training.saving import _trainable_state
    from rasa_trainer.utils import atomic_save_safetensors

    full = ds_engine._zero3_consolidated_16bit_state_dict()
    info = {}
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        try:
            _trainable_state(ds_engine.module, groups.groups)  # no gathered state: what the save wrote before
            info["partitions_refused"] = ""
        except RuntimeError as err:
            info["partitions_refused"] = str(err)
        trainable = _trainable_state(ds_engine.module, groups.groups, full)
        atomic_save_safetensors(trainable, os.path.join(folder, TRAINABLE_FILE))
    ds_engine.save_checkpoint(folder)  # ends with a barrier: every rank's partition is written
    return info


def resume_zero3(base_dir: str, config: dict, mode: str, dtype: torch.dtype, folder: str, my_batches, world: int,
                 phases) -> tuple[dict | None, dict]:
    """A resumed run: a new engine on the base model with the repairs attached afresh (LoRA's B at zero, deltas at
    zero: nothing trained), refused by RASA's check while the repairs are fresh; DeepSpeed's state loaded as Trainer
    loads it (``deepspeed_load_checkpoint``) and checked against RASA's file as
    ``CheckpointingMixin._load_optimizer_and_scheduler`` checks it; then the rest of the run. Returns the consolidated
    state dict after it (rank 0) and what was seen."""
    from transformers.integrations.deepspeed import deepspeed_load_checkpoint

    from rasa_trainer.training.saving import _check_engine_restored

    ds_engine, groups, _, _ = zero3_engine(base_dir, config, mode, dtype, init_lora=False)
    model = ds_engine.module
    info = {}
    try:
        _check_engine_restored(model, groups.groups, folder)
        info["resume_fresh_refused"] = ""
    except ValueError as err:
        info["resume_fresh_refused"] = str(err)
    deepspeed_load_checkpoint(ds_engine, folder, load_module_strict=True)
    _check_engine_restored(model, groups.groups, folder)  # raises if DeepSpeed restored anything else
    info["resume_restored_checked"] = True
    repair_params = [p for n, p in model.named_parameters() if ".rasa_repairs." in n]
    router_params = [p for layer in moe_layers(model) for p in layer.router.parameters()]
    losses, _ = train_steps(model, repair_params, router_params, my_batches, world=world, backward=ds_engine.backward,
                            step=lambda _optimizer: ds_engine.step(), activate=groups.activate, phases=phases)
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    info["resume_losses"] = {"expert": [gathered[r]["expert"][0] for r in range(world)]}
    full = ds_engine._zero3_consolidated_16bit_state_dict()
    return ({k: v.cpu() for k, v in full.items()} if full else None), info


def checkpoint_report(folder: str, info: dict, ref_trainable: dict, world: int) -> dict:
    """The checkpoint's RASA file against the unsharded run's trained parameters at the same step, and the engine
    check of the folder (rank 0)."""
    from safetensors.torch import load_file

    from rasa_trainer.training.checkpoints import TRAINABLE_FILE, engine_problem

    saved = load_file(os.path.join(folder, TRAINABLE_FILE))
    return {
        "checkpoint_partitions_refused": info["partitions_refused"],
        "checkpoint_trainable_keys_equal": sorted(saved) == sorted(ref_trainable),
        "checkpoint_trainable_shapes_equal": all(saved[k].shape == v.shape for k, v in ref_trainable.items()),
        "checkpoint_trainable_numel": sum(t.numel() for t in saved.values()),
        "checkpoint_trainable_max_abs_diff": max(
            (saved[k].float() - v.float()).abs().max().item() for k, v in ref_trainable.items()),
        "engine_problem_same": engine_problem(folder, True, world),
        "engine_problem_other_world": engine_problem(folder, True, world + 2),
        "engine_problem_without_deepspeed": engine_problem(folder, False, world),
    }


def main(out_dir: str, mode: str, engine: str = "fsdp2") -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    if engine == "zero3":
        import importlib

        import deepspeed

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel at init (~2 min of g++ on a fresh
        # machine); only its inference all-reduce uses it, training goes through gloo. (The module by its full name:
        # the attribute deepspeed.comm.torch is torch itself.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node 2"
    # ZeRO-3 without a bf16 section trains in fp32 (deepspeed.zero.Init builds the model in fp32), the reference too
    dtype = torch.float32 if engine == "zero3" else torch.bfloat16

    backward = step = activate = None
    phases, after_step = ("expert", "router"), None
    if engine == "zero3":
        # persistence threshold 0: every parameter is partitioned and released after use, routers and repairs too
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
                  # the gather on save: what the Trainer's save needs (accelerate's zero3_save_16bit_model: true)
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                        "stage3_gather_16bit_weights_on_model_save": True},
                  "gradient_clipping": 0.0,
                  # Trainer's optimiser (a subclass of its class, regrouped): transformers sets this flag the same way
                  "zero_allow_untested_optimizer": True}
        # the same weights as the reference's, loaded by every rank from a folder rank 0 wrote
        base_dir = os.path.join(out_dir, "base")
        if rank == 0:
            build(mode, attach=False, dtype=dtype)[0].save_pretrained(base_dir)
        dist.barrier()
        ds_engine, groups, partitioned_at_attach, unit_dtypes = zero3_engine(base_dir, config, mode, dtype)
        model = ds_engine.module
        backward, activate = ds_engine.backward, groups.activate

        def step(_optimizer):
            ds_engine.step()

        # the run goes on after a checkpoint: a third step (the expert phase again, its AdamW moments from the first)
        # that the resumed run below must reproduce
        phases = ("expert", "router", "expert")
        checkpoint_dir = os.path.join(out_dir, f"checkpoint-{CHECKPOINT_STEP}")
        checkpoint_info: dict = {}

        def after_step(steps: int) -> None:
            if steps == CHECKPOINT_STEP:
                checkpoint_info.update(save_zero3_checkpoint(ds_engine, groups, checkpoint_dir, rank))

        sharded = {n: ("partitioned" if getattr(p, "ds_id", None) is not None and p.numel() == 0 else "full")
                   for n, p in model.named_parameters()}
        repair_params = [p for n, p in model.named_parameters() if ".rasa_repairs." in n]
        router_params = [p for layer in moe_layers(model) for p in layer.router.parameters()]
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        model, repairs, routers = build(mode)
        unit_dtypes = sorted({str(p.dtype) for p in model.model.layers[0].parameters()})
        partitioned_at_attach = False

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        assert isinstance(model, FSDPModule)
        sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
        # the optimiser gets the sharded (DTensor) parameters
        repair_params = [p for n, p in model.named_parameters() if ".rasa_repairs." in n]
        router_params = [p for layer in moe_layers(model) for p in layer.router.parameters()]

    my_batches = [batches()[rank]]
    losses, routings = train_steps(model, repair_params, router_params, my_batches, world=world, backward=backward,
                                   step=step, activate=activate, phases=phases, after_step=after_step)

    # the merged save: a collective every rank enters; rank 0 writes
    if engine == "zero3":
        full = ds_engine._zero3_consolidated_16bit_state_dict()  # what accelerate.get_state_dict gathers under ZeRO-3
        full = {k: v.cpu() for k, v in full.items()} if full is not None else None
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if engine == "zero3":
        resumed_full, resumed_info = resume_zero3(base_dir, config, mode, dtype, checkpoint_dir, my_batches, world,
                                                  phases[CHECKPOINT_STEP:])
    report = None
    if rank == 0:
        merged = merged_state_dict(model, full)
        ref_trainable = {}  # the unsharded run's trained parameters after the checkpoint's step

        def keep_trainable(steps, ref, ref_repairs, ref_routers):
            from rasa_trainer.training.saving import _trainable_state

            if steps == CHECKPOINT_STEP:
                ref_trainable.update({k: v.detach().clone() for k, v in _trainable_state(
                    ref, {"experts": ref_repairs, "routers": ref_routers}).items()})

        ref_model, ref_losses, ref_routings = reference(mode, dtype, phases=phases, after_step=keep_trainable)
        ref_merged = merged_state_dict(ref_model)
    gathered_losses = [None] * world
    dist.all_gather_object(gathered_losses, losses)
    gathered_routing = [None] * world
    dist.all_gather_object(gathered_routing, [[t.tolist() for t in r.indices] for r in routings])
    if rank == 0:
        all_losses = {k: [gathered_losses[r][k][0] for r in range(world)] for k in ("expert", "router")}
        max_diff, worst = 0.0, None
        for key, value in ref_merged.items():
            diff = (merged[key].float() - value.float()).abs().max().item()
            if diff > max_diff:
                max_diff, worst = diff, key
        base_state = tiny_model("qwen3_moe", seed=0).to(dtype).state_dict()
        moved = max((ref_merged[k].float() - v.float()).abs().max().item()
                    for k, v in base_state.items() if k in ref_merged)
        # what the sharded run changed against the base: the selected experts' slices of the fused tensors and the
        # routers, nothing else
        changed_experts, other_changed = {}, []
        base_layers = moe_layers(tiny_model("qwen3_moe", seed=0))
        for index, layer in enumerate(base_layers):
            experts = set()
            for name in ("gate_up_proj", "down_proj"):
                key = f"{layer.experts_name}.{name}"
                differs = (merged[key].float() != base_state[key].float()).flatten(1).any(1)
                experts |= set(differs.nonzero().flatten().tolist())
            changed_experts[str(index)] = sorted(experts)
        routers = {f"{layer.router_name}.weight" for layer in base_layers}
        other_changed = sorted(k for k, v in base_state.items() if k in merged and k not in routers
                               and ".experts." not in k and not torch.equal(merged[k].float(), v.float()))
        save_dir = os.path.join(out_dir, "merged")
        plain = tiny_model("qwen3_moe", seed=0).to(dtype)
        plain.save_pretrained(save_dir, state_dict=merged)
        reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype="auto")
        check = batches()[0]
        with torch.no_grad():
            got = reloaded(input_ids=check["input_ids"], attention_mask=check["attention_mask"]).logits.float()
            ref_model.eval()
            from rasa_trainer.repairs.layer import unload_repairs

            unload_repairs(ref_model)  # routers back to bf16, as from_pretrained loads them
            want = ref_model(input_ids=check["input_ids"], attention_mask=check["attention_mask"]).logits.float()
        # the reloaded weights against the reference model with its repairs merged and routers cast back (as
        # from_pretrained casts the saved fp32 routers to the config's bf16)
        ref_state, got_state = ref_model.state_dict(), reloaded.state_dict()
        reload_diff = max((ref_state[k].float() - got_state[k].float()).abs().max().item() for k in ref_state)
        report = {
            "world_size": world, "backend": dist.get_backend(), "mode": mode, "engine": engine,
            "unit_dtypes": unit_dtypes,
            "sharded_types": sorted(set(sharded.values())),
            "partitioned_at_attach": partitioned_at_attach,
            "repairs_sharded": all(sharded[n] in ("DTensor", "partitioned") for n in sharded if ".rasa_repairs." in n),
            "routing_equal": [gathered_routing[r][0] == [t.tolist() for t in ref_routings[r].indices] for r in range(world)],
            "losses_fsdp": all_losses,
            # the first step of each phase: one loss per half of the reference batch
            "losses_reference": {k: ref_losses[k][:world] for k in ("expert", "router")},
            "merged_keys_equal": sorted(merged) == sorted(ref_merged),
            "repair_keys_in_merged": sum(".rasa_repairs." in k for k in merged),
            "merged_max_abs_diff": max_diff, "merged_worst_key": worst,
            "changed_experts": changed_experts, "selection": {str(k): v for k, v in SELECTION.items()},
            "other_changed": other_changed,
            "weights_moved_from_base": moved,
            "router_dtype_saved": str(merged[f"{moe_layers(plain)[0].router_name}.weight"].dtype),
            "reload_class": type(reloaded).__name__,
            "reload_router_dtype": str(moe_layers(reloaded)[0].router.weight.dtype),
            "reload_keys_equal": sorted(ref_state) == sorted(got_state),
            "reload_max_abs_weight_diff": reload_diff,
            # the rotary inverse frequencies are computed in fp32 at load, cast to bf16 in the reference: logits
            # differ by bf16 rounding only
            "reload_max_abs_logit_diff": (got - want).abs().max().item(),
        }
        if engine == "zero3":
            report.update(checkpoint_report(checkpoint_dir, checkpoint_info, ref_trainable, world))
            resumed_merged = merged_state_dict(model, resumed_full)
            report.update(resumed_info)
            report["losses_reference_after_checkpoint"] = {"expert": ref_losses["expert"][world:2 * world]}
            report["uninterrupted_losses_after_checkpoint"] = {
                "expert": [gathered_losses[r]["expert"][1] for r in range(world)]}
            report["resume_merged_keys_equal"] = sorted(resumed_merged) == sorted(merged)
            report["resume_merged_max_abs_diff"] = max(
                (resumed_merged[k].float() - v.float()).abs().max().item() for k, v in merged.items())
        with open(os.path.join(out_dir, f"{engine}_report_{mode}.json"), "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "delta", sys.argv[3] if len(sys.argv) > 3 else "fsdp2")
