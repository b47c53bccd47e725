"""Tiny real tokenizers for the ingestion and tokenization tests, built offline in well under a second.

A byte-level BPE (vocab 300) trained with the `tokenizers` library on a few hundred HH-style
dialogues, wrapped as `PreTrainedTokenizerFast` in three variants:
- `plain_tokenizer`: no special tokens added when encoding (GPT-2-like);
- `bos_tokenizer`: its post-processor puts `<s>` first (Llama-like);
- `chat_tokenizer`: the BOS variant with an HH-style Jinja chat template that itself writes
  `{{ bos_token }}` first and `{{ eos_token }}` after every assistant turn.
Ids: `<pad>` 0, `<s>` 1, `</s>` 2.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]

HH_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def hh_corpus() -> list[str]:
    """A few hundred short HH-style dialogues (deterministic)."""
    facts = ["the sky is blue", "water is wet", "cats purr", "snow is cold", "fire is hot"]
    texts = []
    for i in range(300):
        a, b = i % 17, i % 11
        if i % 3 == 0:
            q, good, bad = f"What is {a} plus {b}?", f"It is {a + b}.", f"Maybe {a + b + 1}, who cares."
        elif i % 3 == 1:
            fact = facts[i % len(facts)]
            q, good, bad = f"Is it true that {fact}?", f"Yes, {fact}.", "No idea. Stop asking me."
        else:
            q, good, bad = (
                "Please say hello politely.",
                "Hello, nice to meet you!",
                "Hello hello hello hello.",
            )
        answer = good if i % 2 else bad
        texts.append(f"\n\nHuman: {q}\n\nAssistant: {answer}")
    return texts


@pytest.fixture(scope="session")
def bpe_json() -> str:
    """The trained byte-level BPE, serialised (each fixture builds its own copy from it)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(hh_corpus(), trainer)
    return tok.to_str()


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def _with_bos(bpe_json: str) -> Tokenizer:
    backend = Tokenizer.from_str(bpe_json)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return backend


@pytest.fixture(scope="session")
def plain_tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    return _wrap(Tokenizer.from_str(bpe_json))


@pytest.fixture(scope="session")
def bos_tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    return _wrap(_with_bos(bpe_json))


@pytest.fixture(scope="session")
def chat_tokenizer(bpe_json: str) -> PreTrainedTokenizerFast:
    tok = _wrap(_with_bos(bpe_json))
    tok.chat_template = HH_CHAT_TEMPLATE
    return tok
