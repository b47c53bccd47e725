"""Preference-data ingestion: every source kind and format, every bad-row kind in both modes."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignheads.config import SourceConfig
from alignheads.tasks.formats import DataError, split_conversation
from alignheads.tasks.ingest import (
    PAIRS_SCHEMA,
    REJECTS_SCHEMA,
    BadRowError,
    EmptyDatasetError,
    FormatDetectionError,
    detect_format,
    load_pairs,
)

# ------------------------------------------------------------------------------------------ helpers

Q = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"


def line_of(row: Any) -> bytes:
    if isinstance(row, bytes):
        return row
    if isinstance(row, str):
        return row.encode("utf-8")
    return json.dumps(row).encode("utf-8")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join(line_of(r) + b"\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def src(path: Path | str, **kw: Any) -> SourceConfig:
    return SourceConfig(path=str(path), **kw)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


TRL_ROWS = [
    {"prompt": "Q0", "chosen": "good 0", "rejected": "bad 0"},
    {"prompt": "Q1", "chosen": "good 1", "rejected": "bad 1"},
    {"prompt": "Q2", "chosen": "good 2", "rejected": "bad 2"},
]


def trl_expected(path: Path | str, split: str = "train", n: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "id": f"{split}-{i:06d}",
            "split": split,
            "prompt": f"Q{i}",
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
            "source": str(path),
            "row": i,
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------------------ TRL strings, files


def test_trl_jsonl_exact_table_and_ids(tmp_path: Path) -> None:
    rows = [
        {"id": 7, "prompt": "Q0", "chosen": "good 0", "rejected": "bad 0"},
        {"id": "abc", "prompt": "Q1", "chosen": "good 1", "rejected": "bad 1"},
        {"prompt": "Q2", "chosen": "good 2", "rejected": "bad 2"},
        {"id": True, "prompt": "Q3", "chosen": "good 3", "rejected": "bad 3"},  # bool: not an id
        {"id": " ", "prompt": "Q4", "chosen": "good 4", "rejected": "bad 4"},  # blank: not an id
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    pairs, rejects = load_pairs(src(path), "train")
    assert pairs.schema == PAIRS_SCHEMA
    assert rejects.schema == REJECTS_SCHEMA
    assert rejects.num_rows == 0
    assert pairs.column("id").to_pylist() == ["7", "abc", "train-000002", "train-000003", "train-000004"]
    assert pairs.slice(2, 1).to_pylist() == [
        {
            "id": "train-000002",
            "split": "train",
            "prompt": "Q2",
            "chosen": "good 2",
            "rejected": "bad 2",
            "source": str(path),
            "row": 2,
        }
    ]


@pytest.mark.parametrize("shape", ["list", "data", "rows", "json-lines"])
def test_trl_json_shapes(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "pairs.json"
    if shape == "list":
        path.write_text(json.dumps(TRL_ROWS))
    elif shape == "json-lines":  # JSON Lines named .json (common on the Hub)
        write_jsonl(path, TRL_ROWS)
    else:
        path.write_text(json.dumps({"version": 1, shape: TRL_ROWS}))
    pairs, rejects = load_pairs(src(path), "test")
    assert pairs.to_pylist() == trl_expected(path, "test")
    assert rejects.num_rows == 0


def test_trl_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "pairs.parquet", TRL_ROWS)
    pairs, rejects = load_pairs(src(path), "train")
    assert pairs.to_pylist() == trl_expected(path)
    assert rejects.num_rows == 0


def test_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"".join(line_of(r) + b"\n" for r in TRL_ROWS))
    assert load_pairs(src(path), "train")[0].to_pylist() == trl_expected(path)


def test_dahoas_full_hh_rlhf_is_trl(tmp_path: Path) -> None:
    row = {"prompt": Q, "response": " It is 5.", "chosen": " It is 5.", "rejected": " Maybe 6, who cares."}
    assert detect_format(row) == "trl"
    pairs, _ = load_pairs(src(write_jsonl(tmp_path / "d.jsonl", [row])), "train")
    assert pairs.select(["prompt", "chosen", "rejected"]).to_pylist() == [
        {"prompt": Q, "chosen": " It is 5.", "rejected": " Maybe 6, who cares."}
    ]


# -------------------------------------------------------------------------------------- Anthropic HH


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        pytest.param(
            Q + " It is 5.",
            Q + " Maybe 6, who cares.",
            (Q, " It is 5.", " Maybe 6, who cares."),
            id="single-turn",
        ),
        pytest.param(  # common prefix runs past the marker into " S": cut at the marker
            "\n\nHuman: Can you help?\n\nAssistant: Sure, here it is.",
            "\n\nHuman: Can you help?\n\nAssistant: Sorry, no.",
            ("\n\nHuman: Can you help?\n\nAssistant:", " Sure, here it is.", " Sorry, no."),
            id="shared-first-letter",
        ),
        pytest.param(
            "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: And 2 plus 3?\n\nAssistant: It is 5.",
            "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: And 2 plus 3?\n\nAssistant: No.",
            ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: And 2 plus 3?\n\nAssistant:", " It is 5.", " No."),
            id="multi-turn-shared-history",
        ),
        pytest.param(  # the dialogues diverge in an earlier turn: prompt = up to the last shared marker
            "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Thanks\n\nAssistant: Welcome.",
            "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Rude\n\nAssistant: Yes.",
            (
                "\n\nHuman: Hi\n\nAssistant:",
                " Hello!\n\nHuman: Thanks\n\nAssistant: Welcome.",
                " Go away.\n\nHuman: Rude\n\nAssistant: Yes.",
            ),
            id="diverging-earlier-turn",
        ),
        pytest.param(  # one response continues the other
            Q + " Yes",
            Q + " Yes, definitely",
            (Q, " Yes", " Yes, definitely"),
            id="prefix-response",
        ),
    ],
)
def test_hh_raw_split(tmp_path: Path, chosen: str, rejected: str, expected: tuple[str, str, str]) -> None:
    row = {"chosen": chosen, "rejected": rejected}
    assert detect_format(row) == "hh"
    pairs, _ = load_pairs(src(write_jsonl(tmp_path / "hh.jsonl", [row])), "train")
    got = pairs.to_pylist()[0]
    assert (got["prompt"], got["chosen"], got["rejected"]) == expected


# ------------------------------------------------------------------------------------ conversational

CONV_EXPLICIT = {
    "prompt": [msg("user", "What is 2 plus 3?")],
    "chosen": [msg("assistant", "It is 5.")],
    "rejected": [msg("assistant", "Maybe 6, who cares.")],
}
CONV_IMPLICIT = {
    "chosen": [msg("user", "What is 2 plus 3?"), msg("assistant", "It is 5.")],
    "rejected": [msg("user", "What is 2 plus 3?"), msg("assistant", "Maybe 6, who cares.")],
}
HH_RENDERED = (Q, " It is 5.", " Maybe 6, who cares.")


def _texts(pairs: pa.Table) -> list[tuple[str, str, str]]:
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs.to_pylist()]


@pytest.mark.parametrize("row", [CONV_EXPLICIT, CONV_IMPLICIT], ids=["explicit-prompt", "implicit-prompt"])
@pytest.mark.parametrize("tok", [None, "plain_tokenizer"], ids=["no-tokenizer", "no-template"])
def test_conversational_rendered_hh_style(tmp_path: Path, row: dict, tok: str | None, request) -> None:
    tokenizer = request.getfixturevalue(tok) if tok else None
    assert detect_format(row) == "conversational"
    pairs, _ = load_pairs(src(write_jsonl(tmp_path / "c.jsonl", [row])), "train", tokenizer=tokenizer)
    assert _texts(pairs) == [HH_RENDERED]


@pytest.mark.parametrize("row", [CONV_EXPLICIT, CONV_IMPLICIT], ids=["explicit-prompt", "implicit-prompt"])
def test_conversational_rendered_with_chat_template(tmp_path: Path, row: dict, chat_tokenizer) -> None:
    pairs, _ = load_pairs(src(write_jsonl(tmp_path / "c.jsonl", [row])), "train", tokenizer=chat_tokenizer)
    assert _texts(pairs) == [("<s>" + Q, " It is 5.</s>", " Maybe 6, who cares.</s>")]


def test_conversational_multi_turn_and_system(tmp_path: Path) -> None:
    history = [msg("system", "Be nice."), msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "2+3?")]
    rows = [
        # implicit prompt: shared history, different final answers
        {"chosen": [*history, msg("assistant", "5.")], "rejected": [*history, msg("assistant", "6.")]},
        # implicit prompt diverging at a user turn: the prompt stops before the last shared assistant turn
        {
            "chosen": [
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("user", "Thanks"),
                msg("assistant", "Welcome."),
            ],
            "rejected": [
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("user", "Bye"),
                msg("assistant", "Ok."),
            ],
        },
        # UltraFeedback-binarized shape: a plain-string prompt next to full conversations
        {
            "prompt": "2+3?",
            "chosen": [msg("user", "2+3?"), msg("assistant", "5.")],
            "rejected": [msg("user", "2+3?"), msg("assistant", "6.")],
        },
        # explicit prompt repeated at the start of chosen/rejected: removed
        {
            "prompt": [msg("user", "2+3?")],
            "chosen": [msg("user", "2+3?"), msg("assistant", "5.")],
            "rejected": [msg("user", "2+3?"), msg("assistant", "6.")],
        },
    ]
    pairs, rejects = load_pairs(src(write_jsonl(tmp_path / "c.jsonl", rows)), "train")
    assert rejects.num_rows == 0
    assert _texts(pairs) == [
        ("\n\nSystem: Be nice.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+3?\n\nAssistant:", " 5.", " 6."),
        (
            "\n\nHuman: Hi\n\nAssistant:",
            " Hello!\n\nHuman: Thanks\n\nAssistant: Welcome.",
            " Hello!\n\nHuman: Bye\n\nAssistant: Ok.",
        ),
        ("\n\nHuman: 2+3?\n\nAssistant:", " 5.", " 6."),
        ("\n\nHuman: 2+3?\n\nAssistant:", " 5.", " 6."),
    ]


def test_conversational_parquet_with_uneven_message_keys(tmp_path: Path, chat_tokenizer) -> None:
    # Arrow gives every message of a column every struct key; the missing ones come back null
    # and are dropped before the messages reach a chat template.
    named = dict(CONV_EXPLICIT, chosen=[{"role": "assistant", "content": "Five.", "name": "bot"}])
    path = write_parquet(tmp_path / "c.parquet", [named, CONV_EXPLICIT])
    read_back = pq.read_table(path).to_pylist()
    assert read_back[1]["chosen"] == [{"role": "assistant", "content": "It is 5.", "name": None}]
    assert split_conversation(read_back[1])[1] == [{"role": "assistant", "content": "It is 5."}]
    assert split_conversation(read_back[0])[1] == [{"role": "assistant", "content": "Five.", "name": "bot"}]
    pairs, _ = load_pairs(src(path), "train", tokenizer=chat_tokenizer)
    assert _texts(pairs) == [
        ("<s>" + Q, " Five.</s>", " Maybe 6, who cares.</s>"),
        ("<s>" + Q, " It is 5.</s>", " Maybe 6, who cares.</s>"),
    ]


def test_chat_template_failure_is_a_bad_row(tmp_path: Path, chat_tokenizer) -> None:
    bad = dict(CONV_EXPLICIT, prompt=[msg("system", "Be nice."), msg("user", "Hi")])
    path = write_jsonl(tmp_path / "c.jsonl", [CONV_EXPLICIT, bad])
    with pytest.raises(BadRowError) as info:
        load_pairs(src(path), "train", tokenizer=chat_tokenizer)
    assert (
        str(info.value)
        == f"{path}: row 1 (line 2), field 'prompt': chat template failed: unsupported role: system"
    )
    pairs, rejects = load_pairs(src(path), "train", on_bad_rows="skip", tokenizer=chat_tokenizer)
    assert (pairs.num_rows, rejects.column("field").to_pylist()) == (1, ["prompt"])


# ------------------------------------------------------------------------------ format detection


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "trl"),
        ({"prompt": "q", "response": "a", "chosen": "a", "rejected": "b"}, "trl"),
        ({"prompt": "q", "chosen": "a"}, "trl"),  # incomplete, but unambiguous: validation names 'rejected'
        ({"chosen": Q + " a", "rejected": Q + " b"}, "hh"),
        (CONV_EXPLICIT, "conversational"),
        (CONV_IMPLICIT, "conversational"),
        ({"prompt": [msg("user", "q")], "chosen": "a", "rejected": "b"}, "conversational"),
    ],
)
def test_detect_format(row: dict, fmt: str) -> None:
    assert detect_format(row) == fmt


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"question": "q", "answer": "a"},
            "cannot detect the preference format from the keys found ('question', 'answer'): expected "
            "'prompt'/'chosen'/'rejected' strings (trl), 'chosen'/'rejected' dialogues (hh) "
            "or lists of {role, content} messages (conversational)",
        ),
        ({"chosen": "a"}, "cannot detect the preference format from the keys found ('chosen'): "),
        ({}, "cannot detect the preference format from the keys found (none): "),
        ([1, 2], "cannot detect the preference format: the row is a list, not an object"),
    ],
)
def test_detect_format_errors_name_the_keys(row: Any, message: str) -> None:
    with pytest.raises(FormatDetectionError) as info:
        detect_format(row)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_undetectable_first_row_is_an_error_naming_file_and_keys(tmp_path: Path, mode: str) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}, TRL_ROWS[0]])
    with pytest.raises(FormatDetectionError) as info:
        load_pairs(src(path), "train", on_bad_rows=mode)
    assert str(info.value).startswith(
        f"{path}: row 0 (line 1): cannot detect the preference format from the keys found ('question', 'answer')"
    )
    assert isinstance(info.value, DataError)


def test_detection_uses_the_first_readable_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", ["{not json", {"chosen": Q + " a", "rejected": Q + " b"}])
    pairs, rejects = load_pairs(src(path), "train", on_bad_rows="skip")
    assert _texts(pairs) == [(Q, " a", " b")]
    assert rejects.column("row").to_pylist() == [0]


HH_WITH_PROMPT = {"prompt": Q, "chosen": Q + " It is 5.", "rejected": Q + " Maybe 6."}


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [HH_WITH_PROMPT])
    auto, _ = load_pairs(src(path), "train")  # detected as TRL: the texts are kept as they are
    assert _texts(auto) == [(Q, Q + " It is 5.", Q + " Maybe 6.")]
    hh, _ = load_pairs(src(path), "train", fmt="hh")  # the dialogues are split, the prompt column ignored
    assert _texts(hh) == [(Q, " It is 5.", " Maybe 6.")]


@pytest.mark.parametrize(
    ("fmt", "rows", "field", "reason"),
    [
        ("trl", [{"chosen": Q + " a", "rejected": Q + " b"}], "prompt", "missing field"),
        ("conversational", TRL_ROWS, "chosen", "expected a list of {role, content} messages, got str"),
        ("hh", TRL_ROWS, "chosen", "cannot parse the dialogue: no '\\n\\nAssistant:' turn"),
    ],
)
def test_explicit_format_that_does_not_fit(
    tmp_path: Path, fmt: str, rows: list, field: str, reason: str
) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(BadRowError) as info:
        load_pairs(src(path), "train", fmt=fmt)
    assert (info.value.row, info.value.field, info.value.reason) == (0, field, reason)


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", TRL_ROWS)
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        load_pairs(src(path), "train", fmt="csv")
    with pytest.raises(ValueError, match="on_bad_rows must be 'error' or 'skip', got 'ignore'"):
        load_pairs(src(path), "train", on_bad_rows="ignore")


# ---------------------------------------------------------------------------------------- bad rows

HH_GOOD = [
    {"chosen": Q + " It is 5.", "rejected": Q + " Maybe 6."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
]
CONV_GOOD = [CONV_EXPLICIT, dict(CONV_EXPLICIT, chosen=[msg("assistant", "Five.")])]
TRL_GOOD = [TRL_ROWS[0], TRL_ROWS[1]]


def _conv(**fields: Any) -> dict[str, Any]:
    return dict(CONV_EXPLICIT, **fields)


# (good rows of the file's format, the bad row written between them, field, reason)
BAD_ROWS = {
    "trl-missing-prompt": (TRL_GOOD, {"chosen": "a", "rejected": "b"}, "prompt", "missing field"),
    "trl-missing-chosen": (TRL_GOOD, {"prompt": "q", "rejected": "b"}, "chosen", "missing field"),
    "trl-missing-rejected": (TRL_GOOD, {"prompt": "q", "chosen": "a"}, "rejected", "missing field"),
    "trl-null": (
        TRL_GOOD,
        {"prompt": "q", "chosen": None, "rejected": "b"},
        "chosen",
        "missing value (null)",
    ),
    "trl-wrong-type": (
        TRL_GOOD,
        {"prompt": "q", "chosen": 5, "rejected": "b"},
        "chosen",
        "expected a string for format 'trl', got int",
    ),
    "trl-list-instead-of-string": (
        TRL_GOOD,
        {"prompt": "q", "chosen": "a", "rejected": [msg("assistant", "b")]},
        "rejected",
        "expected a string for format 'trl', got list (a message list: use format 'conversational')",
    ),
    "trl-empty": (TRL_GOOD, {"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty string"),
    "trl-whitespace": (
        TRL_GOOD,
        {"prompt": "q", "chosen": "a", "rejected": " \n\t"},
        "rejected",
        "whitespace-only string",
    ),
    "trl-identical": (
        TRL_GOOD,
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        "rejected",
        "identical to 'chosen'",
    ),
    "malformed-json": (
        TRL_GOOD,
        '{"prompt": "q", "chosen": ',
        None,
        "malformed JSON: Expecting value (column 27)",
    ),
    "malformed-json-delimiter": (
        TRL_GOOD,
        '{"prompt": "q" "chosen": "a"}',
        None,
        "malformed JSON: Expecting ',' delimiter (column 16)",
    ),
    "non-utf8": (
        TRL_GOOD,
        b'{"prompt": "q\xff", "chosen": "a", "rejected": "b"}',
        None,
        "not valid UTF-8 (invalid start byte at byte 13)",
    ),
    "not-an-object": (TRL_GOOD, "[1, 2]", None, "expected a JSON object, got array"),
    "duplicate-id": (
        [dict(TRL_ROWS[0], id="a"), dict(TRL_ROWS[1], id="b")],
        dict(TRL_ROWS[2], id="a"),
        "id",
        "duplicate id 'a' (first used by row 0)",
    ),
    "hh-no-assistant": (
        HH_GOOD,
        {"chosen": "\n\nHuman: Hi there", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},
        "chosen",
        "cannot parse the dialogue: no '\\n\\nAssistant:' turn",
    ),
    "hh-no-assistant-rejected": (
        HH_GOOD,
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "Hello"},
        "rejected",
        "cannot parse the dialogue: no '\\n\\nAssistant:' turn",
    ),
    "hh-no-common-prefix": (
        HH_GOOD,
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Bye\n\nAssistant: Bye"},
        "rejected",
        "cannot parse the dialogue: no common prompt with 'chosen' ending in '\\n\\nAssistant:'",
    ),
    "hh-empty-response": (
        HH_GOOD,
        {"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},
        "chosen",
        "empty response after the prompt's last '\\n\\nAssistant:'",
    ),
    "hh-identical": (
        HH_GOOD,
        {"chosen": Q + " 5", "rejected": Q + " 5"},
        "rejected",
        "identical to 'chosen'",
    ),
    "hh-missing-rejected": (HH_GOOD, {"chosen": Q + " 5"}, "rejected", "missing field"),
    "conv-missing-role": (CONV_GOOD, _conv(chosen=[{"content": "x"}]), "chosen", "message 0: missing 'role'"),
    "conv-missing-content": (
        CONV_GOOD,
        _conv(prompt=[msg("system", "s"), {"role": "user"}]),
        "prompt",
        "message 1: missing 'content'",
    ),
    "conv-message-not-object": (
        CONV_GOOD,
        _conv(rejected=["Hello"]),
        "rejected",
        "message 0: expected an object with 'role' and 'content', got str",
    ),
    "conv-content-not-string": (
        CONV_GOOD,
        _conv(chosen=[{"role": "assistant", "content": 5}]),
        "chosen",
        "message 0: 'content' must be a string, got int",
    ),
    "conv-empty-content": (
        CONV_GOOD,
        _conv(chosen=[msg("assistant", "  ")]),
        "chosen",
        "message 0: empty 'content'",
    ),
    "conv-empty-list": (CONV_GOOD, _conv(rejected=[]), "rejected", "empty message list"),
    "conv-not-a-list": (
        CONV_GOOD,
        _conv(chosen="It is 5."),
        "chosen",
        "expected a list of {role, content} messages, got str",
    ),
    "conv-response-not-assistant": (
        CONV_GOOD,
        _conv(chosen=[msg("user", "It is 5.")]),
        "chosen",
        "message 0: expected role 'assistant', got 'user'",
    ),
    "conv-identical": (
        CONV_GOOD,
        _conv(rejected=[msg("assistant", "It is 5.")]),
        "rejected",
        "identical to 'chosen'",
    ),
    "conv-implicit-no-common-prompt": (
        CONV_GOOD,
        {
            "chosen": [msg("user", "a"), msg("assistant", "b")],
            "rejected": [msg("user", "c"), msg("assistant", "d")],
        },
        "rejected",
        "no common prompt with 'chosen' followed by an assistant message in both",
    ),
}


def _bad_file(tmp_path: Path, case: str) -> tuple[Path, Any, str | None, str]:
    good, bad, field, reason = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "data.jsonl", [good[0], bad, good[1]])
    return path, bad, field, reason


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_error_names_file_row_and_field(tmp_path: Path, case: str) -> None:
    path, _, field, reason = _bad_file(tmp_path, case)
    with pytest.raises(BadRowError) as info:
        load_pairs(src(path), "train")
    err = info.value
    assert (err.file, err.row, err.line, err.field, err.reason) == (str(path), 1, 2, field, reason)
    where = f"{path}: row 1 (line 2)" + (f", field '{field}'" if field else "")
    assert str(err) == f"{where}: {reason}"


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_skipped_into_rejects(tmp_path: Path, case: str) -> None:
    path, bad, field, reason = _bad_file(tmp_path, case)
    pairs, rejects = load_pairs(src(path), "train", on_bad_rows="skip")
    assert pairs.column("row").to_pylist() == [0, 2]
    assert rejects.schema == REJECTS_SCHEMA
    raw = line_of(bad).decode("utf-8", errors="backslashreplace")
    assert rejects.to_pylist() == [
        {"split": "train", "source": str(path), "row": 1, "field": field, "reason": reason, "raw": raw}
    ]
    assert pairs.num_rows + rejects.num_rows == 3


def test_message_example_from_the_brief(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    rows: list[Any] = [dict(r, prompt=f"Q{i}") for i, r in enumerate(TRL_ROWS * 6)][:17]
    rows.append({"prompt": "q", "chosen": "", "rejected": "b"})
    write_jsonl(Path("data/train.jsonl"), rows)
    with pytest.raises(
        BadRowError, match=r"^data/train\.jsonl: row 17 \(line 18\), field 'chosen': empty string$"
    ):
        load_pairs(src("data/train.jsonl"), "train")


def test_skip_mode_counts_add_up_and_raw_is_truncated(tmp_path: Path) -> None:
    long_bad = {"prompt": "x" * 5000, "chosen": "", "rejected": "b"}
    rows = [TRL_ROWS[0], long_bad, "not json", TRL_ROWS[1], {"prompt": "q"}, TRL_ROWS[2]]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    pairs, rejects = load_pairs(src(path), "train", on_bad_rows="skip")
    assert pairs.column("row").to_pylist() == [0, 3, 5]
    assert rejects.column("row").to_pylist() == [1, 2, 4]
    assert pairs.num_rows + rejects.num_rows == len(rows)
    raw = rejects.column("raw").to_pylist()
    assert raw[0] == json.dumps(long_bad)[:2000] and len(raw[0]) == 2000
    assert raw[1] == "not json"


def test_blank_lines_are_not_rows_but_lines_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        line_of(TRL_ROWS[0]) + b"\n\n   \n" + line_of({"prompt": "q", "chosen": "", "rejected": "b"}) + b"\n"
    )
    with pytest.raises(BadRowError) as info:
        load_pairs(src(path), "train")
    assert (info.value.row, info.value.line) == (1, 4)


def test_windows_line_endings_and_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(line_of(r) + b"\r\n" for r in TRL_ROWS))
    assert load_pairs(src(path), "train")[0].to_pylist() == trl_expected(path)


def test_parquet_bad_row_has_no_line(tmp_path: Path) -> None:
    rows = [TRL_ROWS[0], {"prompt": "q", "chosen": None, "rejected": "b"}]
    path = write_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(BadRowError) as info:
        load_pairs(src(path), "train")
    assert str(info.value) == f"{path}: row 1, field 'chosen': missing value (null)"
    assert info.value.line is None
    _, rejects = load_pairs(src(path), "train", on_bad_rows="skip")
    assert rejects.to_pylist() == [
        {
            "split": "train",
            "source": str(path),
            "row": 1,
            "field": "chosen",
            "reason": "missing value (null)",
            "raw": '{"prompt": "q", "chosen": null, "rejected": "b"}',
        }
    ]


def test_json_list_with_a_non_object_row(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([TRL_ROWS[0], "oops", TRL_ROWS[1]]))
    with pytest.raises(BadRowError, match=r"p\.json: row 1: expected a JSON object, got string$"):
        load_pairs(src(path), "train")
    pairs, rejects = load_pairs(src(path), "train", on_bad_rows="skip")
    assert (pairs.num_rows, rejects.column("raw").to_pylist()) == (2, ['"oops"'])


def test_bad_row_error_pickles_with_its_attributes() -> None:
    err = BadRowError("f.jsonl", 3, "chosen", "empty string", line=4)
    back = pickle.loads(pickle.dumps(err))
    assert (back.file, back.row, back.field, back.reason, back.line, str(back)) == (
        "f.jsonl",
        3,
        "chosen",
        "empty string",
        4,
        "f.jsonl: row 3 (line 4), field 'chosen': empty string",
    )


# ------------------------------------------------------------------------------ limit, empty, missing


@pytest.mark.parametrize(("limit", "n"), [(1, 1), (2, 2), (3, 3), (10, 3)])
def test_limit_keeps_the_first_rows(tmp_path: Path, limit: int, n: int) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", TRL_ROWS)
    pairs, _ = load_pairs(src(path, limit=limit), "train")
    assert pairs.to_pylist() == trl_expected(path, n=n)


def test_limit_counts_bad_rows_too(tmp_path: Path) -> None:
    rows = [TRL_ROWS[0], {"prompt": "q"}, TRL_ROWS[1], TRL_ROWS[2]]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    pairs, rejects = load_pairs(src(path, limit=3), "train", on_bad_rows="skip")
    assert (pairs.column("row").to_pylist(), rejects.column("row").to_pylist()) == ([0, 2], [1])
    # the row after the limit is never read: a broken row there does not matter
    write_jsonl(path, [*TRL_ROWS, "broken"])
    assert load_pairs(src(path, limit=3), "train")[0].num_rows == 3


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", b""), ("e.jsonl", b"\n \n"), ("e.json", b"[]"), ("e.json", b'{"data": []}')],
)
def test_empty_dataset_is_an_error(tmp_path: Path, mode: str, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EmptyDatasetError) as info:
        load_pairs(src(path), "train", on_bad_rows=mode)
    assert str(info.value) == f"{path}: no rows (an empty dataset cannot be used)"


def test_empty_parquet_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(EmptyDatasetError, match="no rows"):
        load_pairs(src(path), "train")


def test_no_valid_rows_is_an_error_in_skip_mode(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "", "rejected": "b"}, "{"])
    with pytest.raises(EmptyDatasetError) as info:
        load_pairs(src(path), "train", on_bad_rows="skip")
    assert str(info.value) == (
        f"{path}: no valid rows: all 2 rows read were rejected "
        f"(first: {path}: row 0 (line 1), field 'chosen': empty string)"
    )


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "sub/missing.json"])
def test_missing_local_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(FileNotFoundError) as info:
        load_pairs(src(path), "train")
    assert str(info.value) == f"{path}: preference data file not found"


def test_missing_relative_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^data/train\.jsonl: preference data file not found$"):
        load_pairs(src("data/train.jsonl"), "train")
    with pytest.raises(FileNotFoundError, match=r"^\./pairs: preference data file not found$"):
        load_pairs(src("./pairs"), "train")


def test_unsupported_and_unreadable_files(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"p\.csv: unsupported file type"):
        load_pairs(src(csv), "train")
    broken = tmp_path / "p.json"
    broken.write_text('[{"prompt": "q",')
    with pytest.raises(DataError, match=r"p\.json: not valid JSON: Expecting property name"):
        load_pairs(src(broken), "train")
    obj = tmp_path / "o.json"
    obj.write_text('{"train": []}')
    with pytest.raises(
        DataError, match=r"o\.json: expected a JSON list of rows or an object with a 'data' or 'rows' list"
    ):
        load_pairs(src(obj), "train")
    notpq = tmp_path / "p.parquet"
    notpq.write_text("not parquet")
    with pytest.raises(DataError, match=r"p\.parquet: not a readable Parquet file"):
        load_pairs(src(notpq), "train")


# ----------------------------------------------------- Hugging Face datasets (a local dataset directory)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    """Keep `load_dataset`'s Arrow cache inside the test's tmp dir."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hf_load_dataset_local_directory(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "my-dataset"
    root.mkdir()
    write_jsonl(root / "train.jsonl", TRL_ROWS)
    write_jsonl(root / "test.jsonl", [{"prompt": "T", "chosen": "good", "rejected": "bad"}])
    pairs, rejects = load_pairs(src(root), "train")
    assert pairs.to_pylist() == trl_expected(root)
    assert rejects.num_rows == 0
    assert hf_cache.is_dir()  # it really went through `datasets`
    # the Hub split may differ from the name the rows get
    held_out, _ = load_pairs(src(root, split="test"), "eval")
    assert held_out.select(["id", "split", "prompt"]).to_pylist() == [
        {"id": "eval-000000", "split": "eval", "prompt": "T"}
    ]
    limited, _ = load_pairs(src(root, limit=2), "train")
    assert limited.num_rows == 2


def test_hf_subset_falls_back_to_data_dir(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "hh"
    for sub, prompt in (("harmless-base", "harmless"), ("helpful-base", "helpful")):
        (root / sub).mkdir(parents=True)
        write_jsonl(
            root / sub / "train.jsonl",
            [
                {
                    "chosen": f"\n\nHuman: {prompt}\n\nAssistant: a",
                    "rejected": f"\n\nHuman: {prompt}\n\nAssistant: b",
                }
            ],
        )
    pairs, _ = load_pairs(src(root, subset="helpful-base"), "train")
    assert _texts(pairs) == [("\n\nHuman: helpful\n\nAssistant:", " a", " b")]


def test_hf_bad_rows_and_errors(tmp_path: Path, hf_cache: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    write_jsonl(root / "train.jsonl", [TRL_ROWS[0], {"prompt": "q", "chosen": "", "rejected": "b"}])
    with pytest.raises(BadRowError) as info:
        load_pairs(src(root), "train")
    assert str(info.value) == f"{root}: row 1, field 'chosen': empty string"
    pairs, rejects = load_pairs(src(root), "train", on_bad_rows="skip")
    assert (pairs.num_rows, rejects.num_rows) == (1, 1)
    with pytest.raises(
        DataError, match=r"cannot load Hugging Face dataset \(split 'validation'\): Unknown split"
    ):
        load_pairs(src(root, split="validation"), "train")


def test_check_sources_names_every_missing_file_with_its_setting(tmp_path, monkeypatch):
    """Checked before any stage runs (issue 21, item 5): each missing local file with the setting
    that names it; Hub ids and the tiny world's pairs are not files to check."""
    from alignheads.config import RunConfig
    from alignheads.tasks.ingest import check_sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "pairs.csv").write_text("a,b\n")
    ok = RunConfig.model_validate({"data": {"train": "pairs.jsonl", "test": "org/hh-rlhf"}})
    check_sources(ok)
    check_sources(RunConfig())  # the tiny world's pairs
    bad = RunConfig.model_validate(
        {
            "data": {"train": "missing.jsonl", "test": str(tmp_path / "gone" / "test.parquet")},
            "sweep": {"prompts_file": "prompts.txt"},
        }
    )
    with pytest.raises(FileNotFoundError) as info:
        check_sources(bad)
    assert str(info.value) == (
        "data.train: preference data file missing.jsonl not found; "
        f"data.test: preference data file {tmp_path / 'gone' / 'test.parquet'} not found; "
        f"sweep.prompts_file: prompts file prompts.txt not found (relative paths are read from {tmp_path})"
    )
    with pytest.raises(DataError, match=r"data\.train: pairs\.csv: unsupported file type"):
        check_sources(RunConfig.model_validate({"data": {"train": "pairs.csv"}}))
