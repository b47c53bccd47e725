"""Build the test-size world once and check what it leaves on disk and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignheads.world.build import build_world, format_report, tiny_test_config
from alignheads.world.reward import reward

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("world")
    return out, build_world(out, tiny_test_config(), progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_exactly_the_documented_layout(world: tuple[Path, dict]) -> None:
    out, _ = world
    assert {p.name for p in out.iterdir()} == {"model", "train.jsonl", "test.jsonl", "report.json"}
    files = {p.name for p in (out / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    # Nothing pickled: no .bin/.pt/.pkl weights anywhere.
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]


def test_model_and_tokenizer_load_with_plain_transformers(world: tuple[Path, dict]) -> None:
    out, report = world
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == report["n_parameters"]
    assert len(tok) == report["vocab_size"] == model.config.vocab_size
    assert not model.config.tie_word_embeddings
    assert tok.padding_side == "left"
    # Left-padded batched greedy decoding works and stops on EOS for a simple question.
    prompts = [
        "\n\nHuman: What sound does a cow make?\n\nAssistant:",
        "\n\nHuman: Say moon two times.\n\nAssistant:",
    ]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out_ids = model.generate(**enc, do_sample=False, max_new_tokens=40)
    new = out_ids[:, enc["input_ids"].shape[1] :]
    assert (new == tok.eos_token_id).any(dim=1).all()


def test_pair_files_have_the_configured_counts_and_fields(world: tuple[Path, dict]) -> None:
    out, report = world
    cfg = tiny_test_config()
    train, test = _jsonl(out / "train.jsonl"), _jsonl(out / "test.jsonl")
    assert len(train) == cfg.n_train_pairs == report["n_train_pairs"]
    assert len(test) == cfg.n_test_pairs == report["n_test_pairs"]
    # held-out means unseen: every test prompt is its own and none is a training prompt
    train_prompts = {row["prompt"] for row in train}
    assert report["test_prompts_distinct"] == len({row["prompt"] for row in test}) == cfg.n_test_pairs
    assert report["test_prompts_unseen_in_train"] == cfg.n_test_pairs
    assert not train_prompts & {row["prompt"] for row in test}
    for row in train + test:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v for v in row.values())
        assert reward(row["prompt"], row["chosen"]) > reward(row["prompt"], row["rejected"])


def test_report_base_samples_lie_strictly_between(world: tuple[Path, dict]) -> None:
    out, report = world
    assert report["pair_accuracy"] == 1.0
    assert report["reward_rejected_mean"] < report["reward_base_mean"] < report["reward_chosen_mean"]
    assert report["between"] is True
    assert report["base_samples"] == tiny_test_config().report_samples
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))


def test_report_means_match_the_pair_files(world: tuple[Path, dict]) -> None:
    out, report = world
    test = _jsonl(out / "test.jsonl")
    chosen = sum(reward(r["prompt"], r["chosen"]) for r in test) / len(test)
    rejected = sum(reward(r["prompt"], r["rejected"]) for r in test) / len(test)
    assert report["reward_chosen_mean"] == pytest.approx(chosen)
    assert report["reward_rejected_mean"] == pytest.approx(rejected)


def test_format_report_prints_the_three_means(world: tuple[Path, dict]) -> None:
    _, report = world
    text = format_report(report)
    for key in ("reward_chosen_mean", "reward_base_mean", "reward_rejected_mean"):
        assert f"{report[key]:+.3f}" in text
    assert "strictly between rejected and chosen: yes" in text
