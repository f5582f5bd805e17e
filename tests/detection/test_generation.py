"""Batched chat generation with routing capture of the generated tokens, on tiny random MoE models."""

import random

import pytest
import torch

from conftest import generation_routing, tiny_chat_tokenizer, tiny_model, word_text
from rasa_trainer.moe.discovery import moe_layers
from rasa_trainer.moe.routing import record_routing
from rasa_trainer.detection.generation import generate_batch, generate_replies, render_chat


def conversations(n: int = 5, seed: int = 0, multi_turn: bool = False):
    """Chats of ragged lengths (so left padding differs per row); multi-turn ones have a system prompt and history."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        if multi_turn and i % 2:
            chats.append([
                {"role": "system", "content": word_text(rng)},
                {"role": "user", "content": word_text(rng)},
                {"role": "assistant", "content": word_text(rng)},
                {"role": "user", "content": word_text(rng)},
            ])
        else:
            chats.append([{"role": "user", "content": word_text(rng, 1, 12)}])
    return chats


def flat(batches, attr):
    return [item for b in batches for item in getattr(b, attr)]


def test_batched_greedy_equals_one_at_a_time(family, chat_tokenizer):
    model = tiny_model(family)
    chats = conversations(5, multi_turn=True)
    batched = list(generate_replies(model, chat_tokenizer, chats, batch_size=5, max_new_tokens=8, with_routing=True,
                                    progress=False))
    single = list(generate_replies(model, chat_tokenizer, chats, batch_size=1, max_new_tokens=8, with_routing=True,
                                   progress=False))
    assert flat(batched, "reply_token_ids") == flat(single, "reply_token_ids")
    assert flat(batched, "replies") == flat(single, "replies")
    b = batched[0].routing
    for layer in range(b.num_layers):
        assert torch.equal(b.indices[layer], torch.cat([s.routing.indices[layer] for s in single]))
        torch.testing.assert_close(b.weights[layer], torch.cat([s.routing.weights[layer] for s in single]))
        torch.testing.assert_close(b.probabilities[layer], torch.cat([s.routing.probabilities[layer] for s in single]))


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_routing_is_that_of_the_positions_that_produced_each_token(family, chat_tokenizer):
    """Witness: one forward pass over prompt + reply; token t was produced by position len(prompt) - 1 + t."""
    model = tiny_model(family)
    chats = conversations(3, seed=1, multi_turn=True)
    batch = generate_batch(model, chat_tokenizer, chats, max_new_tokens=6, with_routing=True)
    offset = 0
    for row, chat in enumerate(chats):
        prompt = chat_tokenizer(render_chat(chat_tokenizer, chat), add_special_tokens=False)["input_ids"]
        reply = batch.reply_token_ids[row]
        ids = torch.tensor([prompt + reply[:-1]])
        with torch.no_grad(), record_routing(model) as rec:
            model(input_ids=ids)
        truth = rec.routing().select(torch.arange(len(prompt) - 1, ids.shape[1]))
        got = batch.routing.select(torch.arange(offset, offset + len(reply)))
        for layer in range(truth.num_layers):
            assert torch.equal(got.indices[layer], truth.indices[layer].to(got.indices[layer].dtype))
            torch.testing.assert_close(got.weights[layer], truth.weights[layer], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.probabilities[layer], truth.probabilities[layer], rtol=1e-4, atol=1e-5)
        offset += len(reply)
    assert offset == batch.routing.num_tokens


def test_lean_capture_matches_routing_recorder(chat_tokenizer):
    model = tiny_model("qwen3_moe")
    chats = conversations(4, seed=2)
    with record_routing(model, device="cpu") as rec:
        batch = generate_batch(model, chat_tokenizer, chats, max_new_tokens=7, min_new_tokens=7, with_routing=True)
    reference = generation_routing(rec, batch_size=4)
    assert batch.routing.num_tokens == reference.num_tokens == 4 * 7
    for layer in range(reference.num_layers):
        assert torch.equal(batch.routing.indices[layer], reference.indices[layer])
        torch.testing.assert_close(batch.routing.probabilities[layer], reference.probabilities[layer])


def test_nothing_after_eos_and_no_padding_rows(chat_tokenizer):
    model = tiny_model("olmoe")
    chats = conversations(4, seed=3)
    free = generate_batch(model, chat_tokenizer, chats, max_new_tokens=10, with_routing=True)
    # make the token that row 0 produced third the end-of-sequence token: rows now stop at different lengths
    eos = free.reply_token_ids[0][2]
    model.generation_config.eos_token_id = eos
    batch = generate_batch(model, chat_tokenizer, chats, max_new_tokens=10, with_routing=True)
    lengths = [len(ids) for ids in batch.reply_token_ids]
    assert lengths[0] <= 3 and batch.reply_token_ids[0][-1] == eos
    assert len(set(lengths)) > 1, "the test needs rows of different lengths"
    for ids, unbounded in zip(batch.reply_token_ids, free.reply_token_ids):
        assert eos not in ids[:-1]  # the first end-of-sequence token ends the reply
        assert ids == unbounded[: len(ids)]  # the same greedy reply, cut there
    assert batch.routing.num_tokens == sum(lengths)  # no rows for padding or tokens after the end
    assert torch.bincount(batch.token_rows, minlength=4).tolist() == lengths
    assert batch.token_rows.tolist() == sorted(batch.token_rows.tolist())  # replies in batch order
    # the kept rows are exactly the first tokens of the unbounded run (same prompts, same greedy steps)
    for row, n in enumerate(lengths):
        got = batch.routing_of([r == row for r in range(4)])
        ref = free.routing_of([r == row for r in range(4)])
        assert torch.equal(got.stacked_indices(), ref.stacked_indices()[:n])


def test_sampling_repeats_with_a_seed_and_leaves_the_global_rng_alone(chat_tokenizer):
    model = tiny_model("mixtral")
    chats = conversations(4, seed=4)
    kwargs = dict(batch_size=2, max_new_tokens=8, do_sample=True, temperature=1.5, progress=False, with_routing=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = list(generate_replies(model, chat_tokenizer, chats, seed=7, **kwargs))
    assert torch.equal(torch.get_rng_state(), state)
    again = list(generate_replies(model, chat_tokenizer, chats, seed=7, **kwargs))
    other = list(generate_replies(model, chat_tokenizer, chats, seed=8, **kwargs))
    assert flat(first, "reply_token_ids") == flat(again, "reply_token_ids")
    assert flat(first, "reply_token_ids") != flat(other, "reply_token_ids")
    for a, b in zip(first, again):
        assert torch.equal(a.routing.stacked_indices(), b.routing.stacked_indices())
    greedy = list(generate_replies(model, chat_tokenizer, chats, batch_size=2, max_new_tokens=8, progress=False))
    assert flat(first, "reply_token_ids") != flat(greedy, "reply_token_ids")


def test_min_new_tokens_and_batch_rows(chat_tokenizer):
    model = tiny_model("granitemoe")
    chats = conversations(5, seed=5)
    batches = list(generate_replies(model, chat_tokenizer, chats, batch_size=2, max_new_tokens=4, min_new_tokens=4,
                                    progress=False))
    assert [b.rows for b in batches] == [[0, 1], [2, 3], [4]]
    assert all(len(ids) == 4 for b in batches for ids in b.reply_token_ids)


def test_state_is_restored_and_errors_are_clear(chat_tokenizer):
    model = tiny_model("olmoe").train()
    chat_tokenizer.padding_side = "right"
    generate_batch(model, chat_tokenizer, conversations(2), max_new_tokens=2)
    assert model.training and chat_tokenizer.padding_side == "right"
    assert all(len(layer.router._forward_hooks) == 0 for layer in moe_layers(model))

    batch = generate_batch(model, chat_tokenizer, conversations(2), max_new_tokens=2)
    with pytest.raises(ValueError, match="with_routing=True"):
        batch.routing_of([True, False])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(model, chat_tokenizer, conversations(2), max_new_tokens=0)
    no_template = tiny_chat_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        generate_batch(model, no_template, conversations(2), max_new_tokens=2)
    no_pad = tiny_chat_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        generate_batch(model, no_pad, conversations(2), max_new_tokens=2)
