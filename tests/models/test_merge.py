"""A merged IAV checkpoint is a plain HF model that reproduces the aligned model at that α."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignheads.models import AlignedLM, merge_iav, save_head
from alignheads.models.merge import MERGE_RECORD
from tests.helpers.tiny_models import PAD, left_padded_batch, make_head, randomise, tiny_llama, tiny_tokenizer


def base_checkpoint(tmp_path: Path, *, tied: bool) -> Path:
    base_dir = tmp_path / "base"
    tiny_llama(tied=tied).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    return base_dir


@pytest.mark.parametrize(("tied", "alpha"), [(True, 1.7), (False, -0.8)], ids=["tied", "untied"])
def test_merged_checkpoint_matches_aligned_model(tmp_path: Path, tied: bool, alpha: float) -> None:
    base_dir = base_checkpoint(tmp_path, tied=tied)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head = randomise(make_head("iav", model))  # W_a ≠ 0 and W_b ≠ the LM's lm_head
    assert head.align.weight.abs().min() > 0
    heads_dir = save_head(head, tmp_path / "heads" / "iav", base_model=model)

    out = merge_iav(heads_dir, alpha, tmp_path / "merged")
    assert json.loads((out / MERGE_RECORD).read_text())["alpha"] == alpha

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # no project code involved
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)
    assert merged.get_output_embeddings().weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
    assert AutoTokenizer.from_pretrained(out)("w1 w2").input_ids == [4, 5]

    aligned = AlignedLM(model, head, alpha=alpha)
    ids, mask = left_padded_batch([7, 3, 5], seed=2)
    with torch.no_grad():
        expected = aligned(input_ids=ids, attention_mask=mask).logits
        got = merged(input_ids=ids, attention_mask=mask).logits
        base = aligned.base_logits(ids, mask)
    assert (got - expected).abs().max() <= 1e-4
    assert (expected - base).abs().max() > 0.5  # the merge carries a real change

    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 12, "do_sample": False}
    kwargs["pad_token_id"] = PAD
    assert torch.equal(merged.generate(**kwargs), aligned.generate(**kwargs))


def test_merge_refuses_calm_heads_and_existing_outputs(tmp_path: Path) -> None:
    base_dir = base_checkpoint(tmp_path, tied=False)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    calm_dir = save_head(make_head("calm", model), tmp_path / "calm", base_model=model)
    with pytest.raises(ValueError, match="only IAV heads merge"):
        merge_iav(calm_dir, 1.0, tmp_path / "out")
    iav_dir = save_head(make_head("iav", model), tmp_path / "iav", base_model=model)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken exists"):
        merge_iav(iav_dir, 1.0, tmp_path / "taken")
    other = tmp_path / "other"
    tiny_llama(tied=False, vocab=90).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary size: head 100, base 90"):
        merge_iav(iav_dir, 1.0, tmp_path / "out", base_model=other, ignore_base_id=True)
    assert not (tmp_path / "out").exists()


def test_merge_command_line(tmp_path: Path, capsys) -> None:
    """`alignheads merge --heads DIR --alpha A --out DIR`, as a user runs it."""
    from alignheads.cli import main

    base_dir = base_checkpoint(tmp_path, tied=False)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    head = randomise(make_head("iav", model))
    heads_dir = save_head(head, tmp_path / "iav", base_model=model)
    out = tmp_path / "merged"
    assert main(["merge", "--heads", str(heads_dir), "--alpha", "0.5", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = head.base.weight.detach() + 0.5 * head.align.weight.detach()
    assert torch.allclose(merged.get_output_embeddings().weight, expected, atol=1e-6)

    assert main(["merge", "--heads", str(heads_dir), "--alpha", "1", "--out", str(out)]) == 1
    assert "merged exists" in capsys.readouterr().err
    calm_dir = save_head(make_head("calm", model), tmp_path / "calm", base_model=model)
    assert main(["merge", "--heads", str(calm_dir), "--alpha", "1", "--out", str(tmp_path / "x")]) == 1
    assert "only IAV heads merge" in capsys.readouterr().err


def test_merge_head_shortcut_permissions_and_overwrite_hint(tmp_path: Path, capsys) -> None:
    """`merge --head iav` takes the store's newest IAV head; the checkpoint is readable by others
    as the umask allows (safetensors writes 0600, mkdtemp 0700); a taken --out names --overwrite
    (issue 21, items 6 and 8)."""
    import os
    import stat

    from alignheads.cli import main
    from alignheads.storage.manifest import write_manifest

    base_dir = base_checkpoint(tmp_path, tied=False)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    artifact = tmp_path / "store" / "train" / "k1"
    head = randomise(make_head("iav", model))
    save_head(head, artifact / "head", base_model=model)
    write_manifest(
        artifact, stage="train", key="k1", stage_version=1, config={}, inputs={}, info={"kind": "iav"}
    )
    out = tmp_path / "merged"
    store = ["--set", f"store={tmp_path / 'store'}"]
    previous = os.umask(0o022)
    try:
        assert main(["merge", "--head", "iav", "--alpha", "1", "--out", str(out), *store]) == 0
    finally:
        os.umask(previous)
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = head.base.weight.detach() + head.align.weight.detach()
    assert torch.allclose(merged.get_output_embeddings().weight, expected, atol=1e-6)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes["merged"] == 0o755 and modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o755, 0o644}, modes
    capsys.readouterr()
    assert main(["merge", "--head", "iav", "--alpha", "2", "--out", str(out), *store]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {out} exists; choose another --out, or pass --overwrite to replace it"
    )
    assert main(["merge", "--alpha", "2", "--out", str(out), *store]) == 2  # neither --heads nor --head
