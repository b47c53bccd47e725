"""The tiny world's tokenizer: byte-level BPE trained on the corpus, wrapped for ``transformers``.

Byte-level BPE with the full 256-byte initial alphabet encodes any text without an unknown
token. No post-processor is attached, so encoding never adds BOS/EOS on its own: the
pretraining loop and the tokenization stage append EOS themselves, exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)  # ids 0, 1, 2 in this order

# Renders [{role, content}] messages into the world's HH text. Assistant content is stripped
# and joined with one space, so [user q, assistant a] renders to exactly prompt + " " + a.
# A system message (HH has none) becomes leading plain text; any other role is an error.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- message['content'] | trim -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '\n\nHuman: ' + (message['content'] | trim) -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '\n\nAssistant: ' + (message['content'] | trim) -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\n\nAssistant:' -}}{%- endif -%}"
)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with the world's special tokens.

    Training is deterministic for a given text sequence (the trainer breaks ties by
    content, not by hashing order).
    """
    tok = Tokenizer(models.BPE())
    # No prefix space: HH text is "\n\nHuman: ...", and responses carry their own leading space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a trained ``Tokenizer`` as a Hugging Face fast tokenizer (left padding, chat template)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )


def build_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train on ``texts`` and wrap: the tokenizer saved with the world's model."""
    return wrap(train_bpe(texts, vocab_size), model_max_length)
