"""Build the test-size world once and check what it leaves on disk and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignheads.world.build import build_world, format_report, tiny_test_config
from alignheads.world.layout import OBJECTIVES_DIR, objective_pair_files
from alignheads.world.reward import OBJECTIVES, TERMS, objective_scores, reward, reward_terms

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("world")
    return out, build_world(out, tiny_test_config(), progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_writes_exactly_the_documented_layout(world: tuple[Path, dict]) -> None:
    out, _ = world
    assert {p.name for p in out.iterdir()} == {
        "model",
        "train.jsonl",
        "test.jsonl",
        "objectives",
        "report.json",
    }
    assert {p.name for p in (out / OBJECTIVES_DIR).iterdir()} == set(OBJECTIVES)
    for name in OBJECTIVES:
        assert {p.name for p in (out / OBJECTIVES_DIR / name).iterdir()} == {"train.jsonl", "test.jsonl"}
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


def test_objective_pair_files_have_the_configured_counts_and_unseen_test_prompts(
    world: tuple[Path, dict],
) -> None:
    out, _ = world
    cfg = tiny_test_config()
    main_train = {row["prompt"] for row in _jsonl(out / "train.jsonl")}
    for name in OBJECTIVES:
        files = objective_pair_files(out, name)
        assert set(files) == {"train", "test"}
        train, test = _jsonl(files["train"]), _jsonl(files["test"])
        assert (len(train), len(test)) == (cfg.n_objective_train_pairs, cfg.n_objective_test_pairs)
        test_prompts = [row["prompt"] for row in test]
        assert len(set(test_prompts)) == len(test)
        assert not set(test_prompts) & (main_train | {row["prompt"] for row in train})
    with pytest.raises(ValueError, match="unknown objective 'funny'"):
        objective_pair_files(out, "funny")


def test_objectives_report_matches_a_recount_of_the_files(world: tuple[Path, dict]) -> None:
    out, report = world
    assert set(report["objectives"]) == set(OBJECTIVES)
    for name, section in report["objectives"].items():
        files = objective_pair_files(out, name)
        train, test = _jsonl(files["train"]), _jsonl(files["test"])
        assert (section["n_train_pairs"], section["n_test_pairs"]) == (len(train), len(test))
        rows = train + test
        wins = [
            objective_scores(r["prompt"], r["chosen"])[name]
            > objective_scores(r["prompt"], r["rejected"])[name]
            for r in rows
        ]
        assert section["chosen_beats_rate"] == sum(wins) / len(rows) == 1.0
        assert set(section["other_terms"]) == set(TERMS) - set(OBJECTIVES[name])
        for term, stats in section["other_terms"].items():
            diffs = [
                reward_terms(r["prompt"], r["chosen"])[term] - reward_terms(r["prompt"], r["rejected"])[term]
                for r in rows
            ]
            assert stats["tie_rate"] == pytest.approx(sum(d == 0 for d in diffs) / len(rows))
            assert stats["mean_diff"] == pytest.approx(sum(diffs) / len(rows), abs=1e-12)


def test_format_report_prints_one_line_per_objective(world: tuple[Path, dict]) -> None:
    _, report = world
    cfg = tiny_test_config()
    lines = format_report(report).splitlines()
    for name in OBJECTIVES:
        (line,) = [ln for ln in lines if ln.strip().startswith(name + " ")]
        assert f"{cfg.n_objective_train_pairs} train, {cfg.n_objective_test_pairs} test" in line
        assert "beats 100.0%" in line


def test_format_report_names_the_terms_that_do_not_always_tie(world: tuple[Path, dict]) -> None:
    _, report = world
    changed = json.loads(json.dumps(report))
    changed["objectives"]["helpful"]["other_terms"]["length"] = {"tie_rate": 0.975, "mean_diff": -0.0125}
    (line,) = [ln for ln in format_report(changed).splitlines() if ln.strip().startswith("helpful ")]
    assert line.endswith("ties: length 97.5% (mean diff -0.013); others 100%")
