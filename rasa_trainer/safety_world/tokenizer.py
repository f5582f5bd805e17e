"""The SafetyWorld tokenizer: a small byte-level BPE trained on the world's text, with a chat template.

Byte-level BPE decodes back to the exact text (a word-level tokenizer loses spacing around punctuation), so utility
answers can be checked with an exact string match. `UNSAFE_MARKER` is one added, non-special token so that it survives
`skip_special_tokens=True` and its routing is easy to follow.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import AddedToken as RawAddedToken
from transformers import PreTrainedTokenizerFast

from .universe import UNSAFE_MARKER

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SYSTEM_TAG, USER_TAG, ASSISTANT_TAG = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM_TAG, USER_TAG, ASSISTANT_TAG]
"""In this order, so pad=0, bos=1, eos=2, unk=3."""

GENERATION_PROMPT = ASSISTANT_TAG
"""What `add_generation_prompt=True` appends: the model's reply follows it directly."""

# Every turn is a role tag followed by the content; assistant turns end with eos. `{% generation %}` marks the
# assistant text so `return_assistant_tokens_mask=True` (TRL's assistant_only_loss) works.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast` with the chat template.

    Deterministic for the same texts in the same order.
    """
    raw = Tokenizer(models.BPE(unk_token=UNK))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    raw.add_tokens([RawAddedToken(UNSAFE_MARKER, special=False, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM_TAG, USER_TAG, ASSISTANT_TAG],
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
