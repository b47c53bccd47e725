"""The world's BPE tokenizer: round trips, no automatic special tokens, the HH chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alignheads.world import corpus as C
from alignheads.world.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return C.pretraining_texts(1500, seed=0)


@pytest.fixture(scope="module")
def tok(texts: list[str]) -> PreTrainedTokenizerBase:
    return build_tokenizer(texts, vocab_size=320, model_max_length=256)


@pytest.fixture(scope="module")
def reloaded(
    tok: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory
) -> PreTrainedTokenizerBase:
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_vocabulary_and_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    assert len(tok) == 320
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.padding_side == "left"


def test_training_is_deterministic(texts: list[str], tok: PreTrainedTokenizerBase) -> None:
    again = build_tokenizer(texts, vocab_size=320, model_max_length=256)
    assert again.get_vocab() == tok.get_vocab()


def test_encode_adds_no_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    ids = tok("\n\nHuman: What is 3 plus 4?\n\nAssistant:").input_ids
    assert not {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} & set(ids)


@pytest.mark.parametrize(
    "text", ["\n\nHuman: Say moon two times.\n\nAssistant: moon moon.", "héllo ✓ 漢字 \t x"]
)
def test_decode_round_trips_any_text(tok: PreTrainedTokenizerBase, text: str) -> None:
    # Byte-level BPE: unseen characters still encode, and decoding gives the exact text back.
    assert tok.decode(tok(text).input_ids) == text


def test_prompt_then_response_tokenises_like_the_whole(
    tok: PreTrainedTokenizerBase, texts: list[str]
) -> None:
    # Tokenising prompt and response separately must not change the ids (the stages rely on it).
    for text in texts[:200]:
        i = text.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        assert tok(text[:i]).input_ids + tok(text[i:]).input_ids == tok(text).input_ids


def test_save_and_reload_gives_the_same_tokenizer(
    tok: PreTrainedTokenizerBase, reloaded: PreTrainedTokenizerBase
) -> None:
    text = C.pretraining_texts(1, seed=9)[0]
    assert reloaded(text).input_ids == tok(text).input_ids
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == ("<pad>", "<s>", "</s>")
    assert reloaded.padding_side == "left"
    assert reloaded.chat_template == tok.chat_template


def test_chat_template_renders_the_hh_format(reloaded: PreTrainedTokenizerBase) -> None:
    history = (("What is the capital of Peru?", "It is Lima."),)
    messages = [
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "It is Lima."},
        {"role": "user", "content": "What is 3 plus 4?"},
    ]
    prompt = C.format_prompt("What is 3 plus 4?", history)
    assert (
        prompt
        == "\n\nHuman: What is the capital of Peru?\n\nAssistant: It is Lima.\n\nHuman: What is 3 plus 4?\n\nAssistant:"
    )
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    # A finished conversation renders to prompt + response, the pairs' own format.
    full = [*messages, {"role": "assistant", "content": "It is 7."}]
    assert reloaded.apply_chat_template(full, tokenize=False) == prompt + " It is 7."
    assert (
        reloaded.apply_chat_template(messages[:1], tokenize=False)
        == "\n\nHuman: What is the capital of Peru?"
    )


def test_chat_template_rejects_unknown_roles(reloaded: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="unknown chat role: tool"):
        reloaded.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_files_hold_no_pickle(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".jinja"}
