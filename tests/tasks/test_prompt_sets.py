"""Named prompt sets (HH-RLHF test, AlpacaEval, Arena-Hard): the loading code on local files of
the same shape as the Hub datasets, and the sweep's prompt choice."""

from __future__ import annotations

import json

import pytest

from alignheads.config import ConfigError, SweepConfig, load_config
from alignheads.tasks.ingest import DataError
from alignheads.tasks.prompt_sets import PROMPT_SETS, load_prompt_set
from alignheads.tasks.prompts import prompt_set

HH_ROWS = [
    {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
    {  # a two-turn dialogue: the prompt keeps the whole history up to the last assistant turn
        "chosen": "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
        "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 7.",
    },
    {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hey.", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."},  # repeat
    {
        "chosen": "\n\nHuman: Name a colour.\n\nAssistant: Red.",
        "rejected": "\n\nHuman: Name a colour.\n\nAssistant: ?",
    },
]
ALPACA_ROWS = [
    {
        "instruction": "Write a haiku about rain.",
        "output": "...",
        "generator": "gpt4",
        "dataset": "helpful_base",
    },
    {"instruction": "List three fruits.", "output": "...", "generator": "gpt4", "dataset": "oasst"},
]
ARENA_ROWS = [
    {
        "question_id": "a1",
        "category": "arena-hard-v0.1",
        "cluster": "c",
        "turns": [{"content": "Prove 1+1=2."}],
    },
    {
        "question_id": "a2",
        "category": "arena-hard-v0.1",
        "cluster": "c",
        "turns": [{"content": "Sort a list in C."}],
    },
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hh_rlhf_test_prompts_are_the_dialogues_up_to_the_last_assistant_turn(tmp_path):
    src = _jsonl(tmp_path / "hh-test.jsonl", HH_ROWS)
    prompts = load_prompt_set("hh-rlhf", 10, src)
    assert prompts == [
        ("hh-rlhf-00000", "\n\nHuman: Hi?\n\nAssistant:"),
        ("hh-rlhf-00001", "\n\nHuman: 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"),
        ("hh-rlhf-00003", "\n\nHuman: Name a colour.\n\nAssistant:"),  # row 2 repeats row 0's prompt
    ]
    assert load_prompt_set("hh-rlhf", 2, src) == prompts[:2]  # the first N distinct


def test_alpacaeval_json_and_arena_hard_jsonl(tmp_path):
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps(ALPACA_ROWS))
    assert load_prompt_set("alpacaeval", 5, str(alpaca)) == [
        ("alpacaeval-00000", "Write a haiku about rain."),
        ("alpacaeval-00001", "List three fruits."),
    ]
    arena = _jsonl(tmp_path / "question.jsonl", ARENA_ROWS)
    assert [t for _, t in load_prompt_set("arena-hard", 5, arena)] == ["Prove 1+1=2.", "Sort a list in C."]


def test_rows_of_another_shape_are_named(tmp_path):
    src = _jsonl(tmp_path / "wrong.jsonl", [ALPACA_ROWS[0], {"question": "no instruction field"}])
    with pytest.raises(DataError, match=r"wrong.jsonl: row 1 \(line 2\): not a alpacaeval row \(KeyError"):
        load_prompt_set("alpacaeval", 5, src)
    with pytest.raises(ValueError, match="unknown prompt set 'mt-bench'"):
        load_prompt_set("mt-bench", 5, src)
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="holds no prompts"):
        load_prompt_set("hh-rlhf", 5, empty)


def test_the_sweep_takes_the_named_set_and_the_config_checks_it(tmp_path):
    src = _jsonl(tmp_path / "hh-test.jsonl", HH_ROWS)
    sweep = SweepConfig(prompt_set="hh-rlhf", prompt_set_source=src, n_prompts=2)
    assert [pid for pid, _ in prompt_set(None, sweep)] == ["hh-rlhf-00000", "hh-rlhf-00001"]
    assert set(PROMPT_SETS) == {"hh-rlhf", "alpacaeval", "arena-hard"}
    assert PROMPT_SETS["hh-rlhf"].path == "Anthropic/hh-rlhf" and PROMPT_SETS["hh-rlhf"].split == "test"
    for override, message in [
        (
            "sweep.prompt_set=mmlu",
            "sweep.prompt_set: Input should be 'hh-rlhf', 'alpacaeval', 'arena-hard' or 'tiny-world'",
        ),
        ("sweep.prompt_set_source=x.jsonl", "prompt_set_source / prompt_set_revision need a prompt_set"),
        ("sweep.prompts_file=p.txt", "also set sweep.prompt_set=null"),  # the default's set is named
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="either prompts_file or prompt_set"):
        load_config(None, ["sweep.prompt_set=hh-rlhf", "sweep.prompts_file=p.txt"])


def test_the_tiny_worlds_own_set_gives_as_many_distinct_prompts_as_asked_for():
    """`tiny-world`: prompts of the world's templates from a stream of their own, no download."""
    sweep = SweepConfig(prompt_set="tiny-world", n_prompts=1500)
    prompts = prompt_set(None, sweep)
    assert len(prompts) == 1500 == len({t for _, t in prompts})
    assert prompts[0][0] == "tiny-world-00000" and all(t.endswith("\n\nAssistant:") for _, t in prompts)
    assert prompt_set(None, SweepConfig(prompt_set="tiny-world", n_prompts=5)) == prompts[:5]  # a prefix
