"""Held-out means unseen: test pairs and sweep prompts that repeat a training prompt word for word
are counted, and left out by default (`data.train_overlap: drop`), through the real data stage."""

from __future__ import annotations

import json

import pytest

from alignheads.config import DataConfig, SourceConfig, SweepConfig
from alignheads.loading import load_tokenizer
from alignheads.storage.fingerprint import tokenizer_fingerprint
from alignheads.storage.tables import read_table
from alignheads.tasks import data as data_stage
from alignheads.tasks.prompts import sweep_prompt_sets
from tests.helpers.tiny_models import tiny_tokenizer
from tests.helpers.word_pairs import word_pairs


@pytest.fixture()
def overlapping(tmp_path):
    train, test = word_pairs(6, 0), word_pairs(10, 1)
    test[1]["prompt"], test[4]["prompt"] = train[0]["prompt"], train[3]["prompt"]  # two repeats
    for split, rows in (("train", train), ("test", test)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    return tmp_path, tok, train, test


def _data(tmp_path, tok, policy):
    cfg = DataConfig(
        train=SourceConfig(path=str(tmp_path / "train.jsonl")),
        test=SourceConfig(path=str(tmp_path / "test.jsonl")),
        train_overlap=policy,
    )
    plan = data_stage.plan_data(cfg, None, None, tokenizer_fingerprint(tok))
    return data_stage.run_data(tmp_path / f"store-{policy}", plan, tok)


def test_test_pairs_repeating_a_training_prompt_are_dropped_and_counted(overlapping):
    tmp_path, tok, train, test = overlapping
    dropped, kept = _data(tmp_path, tok, "drop"), _data(tmp_path, tok, "keep")
    assert dropped.key != kept.key  # the policy is in the key
    assert dropped.manifest.info["overlap"] == {"test_pairs_with_train_prompt": 2, "dropped": 2, "policy": "drop"}
    assert kept.manifest.info["overlap"] == {"test_pairs_with_train_prompt": 2, "dropped": 0, "policy": "keep"}
    pairs = read_table(dropped.path, "pairs").to_pylist()
    train_prompts = {p["prompt"] for p in train}
    held_out = [p["prompt"] for p in pairs if p["split"] == "test"]
    assert len(held_out) == 8 and not train_prompts & set(held_out)
    assert dropped.manifest.info["pairs"] == {"train": 6, "test": 8}


def test_sweep_prompts_skip_training_prompts_and_calibration_prompts_follow_them(overlapping, tmp_path):
    _, tok, train, _ = overlapping
    kept = _data(tmp_path, tok, "keep")  # the test split still holds the two repeats
    file = tmp_path / "prompts.json"  # JSON keeps each prompt's exact text
    file.write_text(json.dumps([train[0]["prompt"], "fresh one", train[1]["prompt"], "two", "three"]))
    from_file = SweepConfig(prompts_file=str(file), n_prompts=2)
    evaluation, calibration, counts = sweep_prompt_sets(kept.path, from_file, 1, "drop")
    assert [t for _, t in evaluation] == ["fresh one", "two"] and [t for _, t in calibration] == ["three"]
    assert counts == {"dropped_train_prompts": 2}
    evaluation, calibration, counts = sweep_prompt_sets(kept.path, SweepConfig(n_prompts=5), 3, "drop")
    assert counts["dropped_train_prompts"] == 2 and len(evaluation) == 5 and len(calibration) == 3
    assert not {t for _, t in evaluation} & {t for _, t in calibration}  # disjoint
    assert not {t for _, t in evaluation + calibration} & {p["prompt"] for p in train}
    # 'keep' uses them; too few prompts for both sets is one clear error
    assert sweep_prompt_sets(kept.path, SweepConfig(n_prompts=9), 0, "keep")[2] == {"dropped_train_prompts": 0}
    with pytest.raises(ValueError, match="fewer than sweep.n_prompts \\+ evaluate.calibration_prompts = 5 \\+ 4"):
        sweep_prompt_sets(kept.path, SweepConfig(n_prompts=5), 4, "drop")
