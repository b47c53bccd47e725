"""Head directories: save → load round trip, exact file contents, mismatched bases refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import alignheads
from alignheads.models import (
    AlignedLM,
    BaseModelInfo,
    HeadFormatError,
    HeadMismatchError,
    load_aligned,
    load_head,
    save_head,
)
from alignheads.models.head_io import CONFIG_FILE, WEIGHTS_FILE
from tests.helpers.tiny_models import left_padded_batch, make_head, randomise, tiny_llama

KINDS = ["iav", "calm"]


def saved_head(kind: str, tmp_path: Path, *, name: str = "org/tiny-llama") -> tuple[Path, torch.nn.Module]:
    model = tiny_llama(tied=True)
    head = randomise(make_head(kind, model))
    info = BaseModelInfo.from_model(model, name_or_path=name, revision="abc123")
    out = save_head(head, tmp_path / kind, base_model=info, training={"lr": 1e-5, "beta": 0.1})
    return out, head


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_logits(kind: str, tmp_path: Path) -> None:
    head_dir, head = saved_head(kind, tmp_path)
    assert sorted(p.name for p in head_dir.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])

    with safe_open(str(head_dir / WEIGHTS_FILE), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["head_type"] == kind
    assert keys == {name for name, _ in head.named_parameters()}

    record = json.loads((head_dir / CONFIG_FILE).read_text())
    assert record["format"] == "alignheads-head" and record["format_version"] == 1
    assert record["head_type"] == kind
    assert record["base_model"] == {
        "name_or_path": "org/tiny-llama",
        "revision": "abc123",
        "vocab_size": 100,
        "hidden_size": 32,
    }
    assert record["hyperparameters"] == head.config.model_dump()
    assert record["training"] == {"lr": 1e-5, "beta": 0.1}
    assert record["alignheads_version"] == alignheads.__version__

    model = tiny_llama(tied=True)
    loaded = load_head(head_dir, BaseModelInfo.from_model(model, name_or_path="org/tiny-llama"))
    assert type(loaded) is type(head) and loaded.config == head.config
    for (name, a), (_, b) in zip(head.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
        assert b.requires_grad

    ids, mask = left_padded_batch([6, 3])
    with torch.no_grad():
        original = AlignedLM(tiny_llama(tied=True), head)(
            input_ids=ids, attention_mask=mask, alpha=1.5
        ).logits
        reloaded = load_aligned(head_dir, model, alpha=1.5, ignore_base_id=True)
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, original)


def test_mismatched_bases_are_refused_naming_the_difference(tmp_path: Path) -> None:
    head_dir, _ = saved_head("calm", tmp_path)
    same = tiny_llama(tied=True)
    with pytest.raises(HeadMismatchError, match=r"vocabulary size: head 100, base 90") as info:
        load_head(
            head_dir, BaseModelInfo.from_model(tiny_llama(tied=True, vocab=90), name_or_path="org/tiny-llama")
        )
    assert "hidden size" not in str(info.value) and "model id" not in str(info.value)
    with pytest.raises(HeadMismatchError, match=r"hidden size: head 32, base 48"):
        load_head(
            head_dir,
            BaseModelInfo.from_model(tiny_llama(tied=True, hidden=48), name_or_path="org/tiny-llama"),
        )
    with pytest.raises(
        HeadMismatchError, match=r"model id: head trained on 'org/tiny-llama', given 'org/other'"
    ):
        load_head(head_dir, BaseModelInfo.from_model(same, name_or_path="org/other"))
    with pytest.raises(HeadMismatchError, match=r"model id.*vocabulary size.*hidden size"):
        load_head(head_dir, BaseModelInfo(name_or_path="x/y", vocab_size=7, hidden_size=8))
    # the same model under another name loads when asked to
    load_head(head_dir, BaseModelInfo.from_model(same, name_or_path="org/other"), ignore_base_id=True)


def test_local_base_ids_are_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    model = tiny_llama(tied=False)
    monkeypatch.chdir(tmp_path)
    info = BaseModelInfo.from_model(model, name_or_path="base")
    assert info.name_or_path == str(base_dir.resolve())
    head_dir = save_head(make_head("iav", model), tmp_path / "h", base_model=info)
    load_head(head_dir, BaseModelInfo.from_model(model, name_or_path=str(base_dir)))


def test_broken_head_directories_name_file_and_field(tmp_path: Path) -> None:
    head_dir, _ = saved_head("iav", tmp_path)
    config_path = head_dir / CONFIG_FILE
    record = json.loads(config_path.read_text())

    config_path.write_text(json.dumps(record | {"format_version": 99}))
    with pytest.raises(HeadFormatError, match=r"head_config.json: field 'format_version' is 99"):
        load_head(head_dir)

    config_path.write_text(json.dumps(record | {"head_type": "lora"}))
    with pytest.raises(HeadFormatError, match=r"field 'head_type': unknown head type 'lora'"):
        load_head(head_dir)

    broken = dict(record, hyperparameters=record["hyperparameters"] | {"vocab_size": -1})
    config_path.write_text(json.dumps(broken))
    with pytest.raises(HeadFormatError, match=r"hyperparameters.*vocab_size"):
        load_head(head_dir)

    config_path.write_text(json.dumps(record))
    other, _ = saved_head("calm", tmp_path / "other")
    (head_dir / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(
        HeadFormatError, match=r"head_model.safetensors: tensor names do not match an? iav head"
    ):
        load_head(head_dir)

    with pytest.raises(HeadFormatError, match="not found"):
        load_head(tmp_path / "nowhere")
