"""A bitsandbytes-quantised base: selected experts and routers train while quantised linear layers stay frozen."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from conftest import tiny_model  # noqa: E402
from test_trainer import SELECTED, make_args, make_selection  # noqa: E402
from tiny_chat import tiny_chat_tokenizer, tiny_pairs  # noqa: E402
from rasa_trainer import RASATrainer  # noqa: E402
from rasa_trainer.moe.discovery import moe_layers  # noqa: E402


def _raw(param) -> tuple:
    """The dtype and stored bytes of a floating-point parameter."""
    data = param.data.detach().cpu().contiguous()
    return str(data.dtype), bytes(data.view(torch.uint8).numpy())


def _quantized(tmp_path, family, config, **overrides):
    tokenizer = tiny_chat_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer), hidden_size=64, **overrides)
    model.save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config), tokenizer


def test_4bit_base_with_8bit_adamw_trains_only_repairs_and_routers(tmp_path):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model, tokenizer = _quantized(tmp_path, "qwen3_moe", config, head_dim=16)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    frozen = {n: _raw(p) for n, p in model.named_parameters() if p.is_floating_point()}
    frozen_experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3}
    quantized = {n: m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    probe = torch.randn(3, 64)
    with torch.no_grad():  # bitsandbytes may repack 4-bit storage for the CPU, so compare what the layers compute
        outputs = {n: m(probe) for n, m in quantized.items()}
    trainer = RASATrainer(model, args=make_args(tmp_path, optim="adamw_bnb_8bit", per_device_train_batch_size=12),
                          train_dataset=tiny_pairs(), processing_class=tokenizer,
                          safety_critical_experts=make_selection(model))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__module__.startswith("bitsandbytes")
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states if s["state1"].numel() >= 4096)
    routers = {f"{l.router_name}.weight" for l in moe_layers(model)}
    for name, p in model.named_parameters():
        if name in routers:
            assert _raw(p) != frozen[name]
        elif name in frozen and "experts" not in name:
            assert _raw(p) == frozen[name], name
    with torch.no_grad():
        assert all(torch.equal(m(probe), outputs[n]) for n, m in quantized.items())
    # after training the repairs are merged into the fused expert weights: exactly the selected experts changed
    for layer in moe_layers(model):
        for name in ("gate_up_proj", "down_proj"):
            key = f"{layer.experts_name}.{name}"
            now, before = dict(model.named_parameters())[key].detach(), frozen_experts[key]
            changed = (now != before).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == sorted(SELECTED.get(layer.index, [])), key
    assert sorted(trainer.selection.by_moe_layer().items()) == sorted(SELECTED.items())


def test_quantized_router_gets_a_clear_error(tmp_path):
    # transformers keeps the routers of the tested families in full precision; a custom quantisation might not
    config = BitsAndBytesConfig(load_in_8bit=True)
    model, tokenizer = _quantized(tmp_path, "qwen3_moe", config, head_dim=16)
    router = moe_layers(model)[1].router
    router.weight = bnb.nn.Int8Params(router.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"router model.layers.1.mlp.gate is quantized.*llm_int8_skip_modules"):
        RASATrainer(model, args=make_args(tmp_path, rasa_schedule="router_only"), train_dataset=tiny_pairs(),
                    processing_class=tokenizer)
