"""`alignheads export --format trl`: the pairs of a real reference cache with TRL's column names, as
Parquet that the real `datasets` reads, each ref_*_logps the reference model's own summed
response log-prob (recomputed here from the tokenized ids, independently of the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignheads.cli import main
from alignheads.config import RefPassConfig
from alignheads.storage.tables import read_table
from alignheads.tasks.export import EXPORT_RECORD, TRL_COLUMNS, export_trl
from tests.helpers.tiny_models import tiny_llama
from tests.helpers.word_pairs import pair_store


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return pair_store(tmp_path_factory.mktemp("trl"), tiny_llama(tied=False), RefPassConfig(k=8, device="cpu"))


def _summed_logps(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].double().log_softmax(-1)
    start = len(prompt)
    return float(sum(logps[start + j - 1, t] for j, t in enumerate(response)))


def test_trl_columns_load_with_datasets_and_hold_the_reference_logps(pairs, tmp_path: Path) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM

    done = export_trl(pairs.store, tmp_path / "trl")
    assert done.refpass_key == pairs.refpass.name and done.rows == {"test": 16, "train": 64}
    ds = load_dataset(
        "parquet",
        data_files={split: str(path) for split, path in done.files.items()},
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert ds["train"].column_names == list(TRL_COLUMNS) and ds["train"].num_rows == 64

    texts = read_table(pairs.data, "pairs").to_pylist()
    tokenized = read_table(pairs.tokenize, "tokenized").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(pairs.model_dir).eval()
    for split in ("train", "test"):
        rows = ds[split].to_list()
        tok_rows = [t for t in tokenized if t["split"] == split]
        by_id = {(t["split"], t["id"]): t for t in texts}
        assert len(rows) == len(tok_rows)
        for row, tok in zip(rows, tok_rows, strict=True):  # the cache's (tokenized) order
            text = by_id[(split, tok["id"])]
            assert (row["prompt"], row["chosen"], row["rejected"]) == (
                text["prompt"],
                text["chosen"],
                text["rejected"],
            )
            want_c = _summed_logps(model, tok["prompt_ids"], tok["chosen_ids"])
            want_r = _summed_logps(model, tok["prompt_ids"], tok["rejected_ids"])
            assert row["ref_chosen_logps"] == pytest.approx(want_c, abs=1e-3)
            assert row["ref_rejected_logps"] == pytest.approx(want_r, abs=1e-3)
            assert row["ref_chosen_logps"] != row["ref_rejected_logps"]
    record = json.loads((done.out / EXPORT_RECORD).read_text())
    assert record["refpass"] == done.refpass_key and record["skipped_truncated"] == {"test": 0, "train": 0}


def test_the_cli_writes_the_newest_reference_cache_and_refuses_a_taken_directory(pairs, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["export", "--format", "trl", "--out", str(out), "--set", f"store={pairs.store}"]) == 0
    assert "TRL preference pairs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_RECORD, "test.parquet", "train.parquet"]
    assert main(["export", "--format", "trl", "--out", str(out), "--set", f"store={pairs.store}"]) == 1
    assert "exists" in capsys.readouterr().err
    code = main(["export", "--format", "trl", "--out", str(tmp_path / "x"), "--refpass", "nothex;", "--set",
                 f"store={pairs.store}"])  # fmt: skip
    assert code == 1 and "not an artifact key" in capsys.readouterr().err
