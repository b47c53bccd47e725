"""Tokenization of preference pairs: exact ids, truncation and flags, EOS once, no doubled BOS."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from alignheads.config import SourceConfig
from alignheads.tasks.ingest import PAIRS_SCHEMA, load_pairs
from alignheads.tasks.tokenize import TOKENIZED_SCHEMA, tokenize_pairs, truncate_prompt, truncate_response

PAD, BOS, EOS = 0, 1, 2
PROMPT = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"
CHOSEN = " It is 5."
REJECTED = " Maybe 6, who cares."
# Hand-checked against the fixture tokenizer's vocabulary ('Ċ' is "\n", 'Ġ' a space).
PROMPT_TOKENS = [
    "Ċ",
    "Ċ",
    "Human",
    ":",
    "Ġ",
    "What",
    "Ġis",
    "Ġ",
    "2",
    "Ġp",
    "lu",
    "s",
    "Ġ",
    "3",
    "?",
    "Ċ",
    "Ċ",
    "Assistant",
    ":",
]
PROMPT_IDS = [201, 201, 270, 28, 223, 292, 275, 223, 20, 278, 285, 85, 223, 21, 33, 201, 201, 272, 28]
CHOSEN_TOKENS = ["ĠI", "t", "Ġis", "Ġ", "5", "."]
CHOSEN_IDS = [284, 86, 275, 223, 23, 16]
REJECTED_TOKENS = ["Ġ", "M", "ay", "b", "e", "Ġ", "6", ",", "Ġw", "h", "o", "Ġc", "a", "r", "es", "."]
REJECTED_IDS = [223, 47, 283, 68, 71, 223, 24, 14, 289, 74, 81, 288, 67, 84, 293, 16]


def pairs_table(rows: list[tuple[str, str, str]], split: str = "train") -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "id": f"{split}-{i:06d}",
                "split": split,
                "prompt": p,
                "chosen": c,
                "rejected": r,
                "source": "mem",
                "row": i,
            }
            for i, (p, c, r) in enumerate(rows)
        ],
        schema=PAIRS_SCHEMA,
    )


def test_vocabulary_matches_the_hand_checked_tokens(bos_tokenizer) -> None:
    assert bos_tokenizer.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [PAD, BOS, EOS]
    assert bos_tokenizer.convert_tokens_to_ids(PROMPT_TOKENS) == PROMPT_IDS
    assert bos_tokenizer.convert_tokens_to_ids(CHOSEN_TOKENS) == CHOSEN_IDS
    assert bos_tokenizer.convert_tokens_to_ids(REJECTED_TOKENS) == REJECTED_IDS
    assert bos_tokenizer.decode(PROMPT_IDS + CHOSEN_IDS) == PROMPT + CHOSEN


def test_exact_ids_bos_adding_tokenizer(bos_tokenizer) -> None:
    out = tokenize_pairs(pairs_table([(PROMPT, CHOSEN, REJECTED)]), bos_tokenizer, 128, 64)
    assert out.schema == TOKENIZED_SCHEMA
    assert out.to_pylist() == [
        {
            "id": "train-000000",
            "split": "train",
            "prompt_ids": [BOS, *PROMPT_IDS],
            "chosen_ids": [*CHOSEN_IDS, EOS],
            "rejected_ids": [*REJECTED_IDS, EOS],
            "prompt_len": 20,
            "chosen_len": 7,
            "rejected_len": 17,
            "prompt_truncated": False,
            "chosen_truncated": False,
            "rejected_truncated": False,
        }
    ]


def test_exact_ids_plain_tokenizer(plain_tokenizer) -> None:
    out = tokenize_pairs(pairs_table([(PROMPT, CHOSEN, REJECTED)]), plain_tokenizer, 128, 64).to_pylist()[0]
    assert (out["prompt_ids"], out["chosen_ids"], out["rejected_ids"]) == (
        PROMPT_IDS,
        [*CHOSEN_IDS, EOS],
        [*REJECTED_IDS, EOS],
    )


@pytest.mark.parametrize(
    ("max_len", "expected", "truncated"),
    [
        (20, [BOS, *PROMPT_IDS], False),
        (19, [BOS, *PROMPT_IDS[1:]], True),
        (5, [BOS, 201, 201, 272, 28], True),
        (2, [BOS, 28], True),
        (1, [BOS], True),
    ],
)
def test_prompt_left_truncation_keeps_bos_first(
    bos_tokenizer, max_len: int, expected: list, truncated: bool
) -> None:
    out = tokenize_pairs(pairs_table([(PROMPT, CHOSEN, REJECTED)]), bos_tokenizer, max_len, 64).to_pylist()[0]
    assert (out["prompt_ids"], out["prompt_len"], out["prompt_truncated"]) == (
        expected,
        len(expected),
        truncated,
    )


@pytest.mark.parametrize(
    ("max_len", "expected", "truncated"),
    [(19, PROMPT_IDS, False), (18, PROMPT_IDS[1:], True), (4, [201, 201, 272, 28], True), (1, [28], True)],
)
def test_prompt_left_truncation_without_bos(
    plain_tokenizer, max_len: int, expected: list, truncated: bool
) -> None:
    out = tokenize_pairs(pairs_table([(PROMPT, CHOSEN, REJECTED)]), plain_tokenizer, max_len, 64).to_pylist()[
        0
    ]
    assert (out["prompt_ids"], out["prompt_len"], out["prompt_truncated"]) == (
        expected,
        len(expected),
        truncated,
    )


@pytest.mark.parametrize(
    ("max_len", "expected", "truncated"),
    [
        (64, [*CHOSEN_IDS, EOS], False),
        (7, [*CHOSEN_IDS, EOS], False),  # content + EOS fits exactly
        (6, CHOSEN_IDS, True),  # the content alone fits, its EOS does not: cut, no EOS
        (3, CHOSEN_IDS[:3], True),
        (1, CHOSEN_IDS[:1], True),
    ],
)
def test_response_right_truncation(bos_tokenizer, max_len: int, expected: list, truncated: bool) -> None:
    out = tokenize_pairs(pairs_table([(PROMPT, CHOSEN, REJECTED)]), bos_tokenizer, 128, max_len).to_pylist()[
        0
    ]
    assert (out["chosen_ids"], out["chosen_len"], out["chosen_truncated"]) == (
        expected,
        len(expected),
        truncated,
    )
    assert out["rejected_truncated"] is (len(REJECTED_IDS) + 1 > max_len)
    assert out["rejected_ids"] == [*REJECTED_IDS, EOS][:max_len]


@pytest.mark.parametrize("suffix", ["", "</s>", "</s>\n", "</s>  \n\n"])
def test_eos_appended_exactly_once(bos_tokenizer, suffix: str) -> None:
    out = tokenize_pairs(
        pairs_table([(PROMPT, CHOSEN + suffix, REJECTED)]), bos_tokenizer, 128, 64
    ).to_pylist()[0]
    assert out["chosen_ids"] == [*CHOSEN_IDS, EOS]


def test_chat_template_bos_and_eos_are_not_doubled(tmp_path: Path, chat_tokenizer, bos_tokenizer) -> None:
    row = {
        "prompt": [{"role": "user", "content": "What is 2 plus 3?"}],
        "chosen": [{"role": "assistant", "content": "It is 5."}],
        "rejected": [{"role": "assistant", "content": "Maybe 6, who cares."}],
    }
    path = tmp_path / "conv.jsonl"
    path.write_text(json.dumps(row) + "\n")
    pairs, _ = load_pairs(SourceConfig(path=str(path)), "train", tokenizer=chat_tokenizer)
    texts = pairs.to_pylist()[0]
    assert texts["prompt"].startswith("<s>") and texts["chosen"].endswith("</s>")  # the template wrote both
    out = tokenize_pairs(pairs, chat_tokenizer, 128, 64).to_pylist()[0]
    assert out["prompt_ids"] == [BOS, *PROMPT_IDS]  # one BOS although the tokenizer adds one too
    assert out["chosen_ids"] == [*CHOSEN_IDS, EOS]
    assert out["rejected_ids"] == [*REJECTED_IDS, EOS]
    # the BOS-adding tokenizer on the same text without the template's BOS gives the same ids
    assert bos_tokenizer(PROMPT)["input_ids"] == out["prompt_ids"]
    # and with the template's BOS still truncated from the left, the BOS stays first
    cut = tokenize_pairs(pairs, chat_tokenizer, 3, 64).to_pylist()[0]
    assert (cut["prompt_ids"], cut["prompt_truncated"]) == ([BOS, 272, 28], True)


def test_tokenizer_without_eos_is_an_error(bpe_json: str) -> None:
    no_eos = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(bpe_json), bos_token="<s>", pad_token="<pad>"
    )
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match=r"^the tokenizer has no EOS token \(eos_token_id is None\)"):
        tokenize_pairs(pairs_table([(PROMPT, CHOSEN, REJECTED)]), no_eos, 128, 64)


def test_batching_does_not_change_the_result(bos_tokenizer) -> None:
    rows = [(PROMPT * (i + 1), CHOSEN * (i + 1), REJECTED + "</s>" * (i % 2)) for i in range(5)]
    table = pairs_table(rows, split="test")
    whole = tokenize_pairs(table, bos_tokenizer, 30, 10)
    assert tokenize_pairs(table, bos_tokenizer, 30, 10, batch_size=2).equals(whole)
    assert whole.column("id").to_pylist() == [f"test-{i:06d}" for i in range(5)]
    assert whole.column("split").to_pylist() == ["test"] * 5
    assert whole.column("prompt_truncated").to_pylist() == [False, True, True, True, True]


def test_empty_table_and_bad_input(bos_tokenizer) -> None:
    empty = tokenize_pairs(pairs_table([]), bos_tokenizer, 8, 8)
    assert empty.schema == TOKENIZED_SCHEMA and empty.num_rows == 0
    with pytest.raises(ValueError, match="lacks column"):
        tokenize_pairs(
            pairs_table([(PROMPT, CHOSEN, REJECTED)]).drop_columns(["chosen"]), bos_tokenizer, 8, 8
        )
    with pytest.raises(ValueError, match="must be >= 1"):
        tokenize_pairs(pairs_table([(PROMPT, CHOSEN, REJECTED)]), bos_tokenizer, 0, 8)
    with_null = pa.table(
        {"id": ["a"], "split": ["train"], "prompt": ["p"], "chosen": [None], "rejected": ["r"]}
    )
    with pytest.raises(ValueError, match=r"pairs row 0: column 'chosen' is null"):
        tokenize_pairs(with_null, bos_tokenizer, 8, 8)


def test_truncation_helpers() -> None:
    assert truncate_prompt([BOS, 5, 6, 7], 4, BOS) == ([BOS, 5, 6, 7], False)
    assert truncate_prompt([BOS, 5, 6, 7], 3, BOS) == ([BOS, 6, 7], True)
    assert truncate_prompt([BOS, 5, 6, 7], 3, None) == ([5, 6, 7], True)
    assert truncate_prompt([9, 5, 6, 7], 2, BOS) == ([6, 7], True)
    assert truncate_response([5, 6], 3, EOS) == ([5, 6, EOS], False)
    assert truncate_response([5, 6, EOS], 3, EOS) == ([5, 6, EOS], False)
    assert truncate_response([5, 6, 7], 3, EOS) == ([5, 6, 7], True)
    assert truncate_response([], 1, EOS) == ([EOS], False)


WORDS = [
    " It",
    " is",
    " 5",
    ".",
    " Hello",
    ",",
    " nice",
    " to",
    " meet",
    " you",
    "!",
    "\n\nHuman:",
    "\n\nAssistant:",
    " é",
    " 🙂",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    use_bos=st.booleans(),
    prompt_words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=30),
    response_words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=30),
    eos_suffix=st.sampled_from(["", "</s>", "</s>\n"]),
    max_prompt=st.integers(1, 40),
    max_response=st.integers(1, 40),
)
def test_truncation_properties(
    bos_tokenizer,
    plain_tokenizer,
    use_bos: bool,
    prompt_words: list[str],
    response_words: list[str],
    eos_suffix: str,
    max_prompt: int,
    max_response: int,
) -> None:
    tok = bos_tokenizer if use_bos else plain_tokenizer
    prompt, response = "".join(prompt_words), "".join(response_words)
    out = tokenize_pairs(
        pairs_table([(prompt, response + eos_suffix, response)]), tok, max_prompt, max_response
    )
    row = out.to_pylist()[0]

    full_prompt = tok(prompt)["input_ids"]
    assert row["prompt_len"] == len(row["prompt_ids"]) <= max_prompt
    assert row["prompt_truncated"] is (len(full_prompt) > max_prompt)
    if row["prompt_truncated"]:
        if use_bos:
            assert row["prompt_ids"][0] == BOS
            assert row["prompt_ids"][1:] == (
                full_prompt[len(full_prompt) - (max_prompt - 1) :] if max_prompt > 1 else []
            )
        else:
            assert row["prompt_ids"] == full_prompt[-max_prompt:]
    else:
        assert row["prompt_ids"] == full_prompt
    assert row["prompt_ids"].count(BOS) == (1 if use_bos else 0)

    full_response = [*tok(response, add_special_tokens=False)["input_ids"], EOS]
    for name in ("chosen", "rejected"):  # with and without an EOS already in the text: same ids
        ids = row[f"{name}_ids"]
        assert row[f"{name}_len"] == len(ids) <= max_response
        assert row[f"{name}_truncated"] is (len(full_response) > max_response)
        assert ids == full_response[:max_response]
        assert ids.count(EOS) == (0 if row[f"{name}_truncated"] else 1)
        if not row[f"{name}_truncated"]:
            assert ids[-1] == EOS
