"""`loading.load_output_layer_only`: the LM built on "meta" with only its output layer read from
the checkpoint's safetensors: untied and tied output layers, sharded checkpoints, float16 and
bfloat16 storage, and one clear line when no file holds the layer."""

from __future__ import annotations

import json

import pytest
import torch

from alignheads.loading import load_causal_lm, load_output_layer_only, read_safetensors_tensor
from alignheads.models.head_io import BaseModelInfo
from tests.helpers.tiny_models import tiny_llama


def _devices(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_only_the_output_layer_is_read_bit_for_bit(tmp_path, tied, shard):
    saved = tiny_llama(tied=tied)
    kwargs = {"max_shard_size": shard} if shard else {}
    saved.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    if tied:  # transformers stores a tied output layer once, under the embedding's name
        stored = (
            json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
            if shard
            else None
        )
        assert stored is None or "lm_head.weight" not in stored

    model = load_output_layer_only(str(tmp_path))
    whole = load_causal_lm(str(tmp_path))
    assert torch.equal(model.lm_head.weight, whole.lm_head.weight)
    assert model.lm_head.weight.device.type == "cpu" and not model.lm_head.weight.requires_grad
    assert _devices(model.model) == {"meta"}  # not one backbone weight has storage
    assert not model.training
    assert BaseModelInfo.from_model(model) == BaseModelInfo.from_model(whole)  # what a saved head records


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_is_read_as_stored(tmp_path, dtype):
    tiny_llama(tied=False).to(getattr(torch, dtype)).save_pretrained(tmp_path)
    model = load_output_layer_only(str(tmp_path), dtype=dtype)
    whole = load_causal_lm(str(tmp_path), dtype=dtype)
    assert model.lm_head.weight.dtype == getattr(torch, dtype)
    assert torch.equal(model.lm_head.weight, whole.lm_head.weight)


def test_a_checkpoint_without_the_output_layer_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama(tied=False).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"no safetensors file holds the output layer's weight \(looked for lm_head.weight\)"
    ):
        load_output_layer_only(str(tmp_path))


def test_a_truncated_tensor_is_named(tmp_path):
    tiny_llama(tied=False).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])
    header_len = int.from_bytes(data[:8], "little")
    last = max(json.loads(data[8 : 8 + header_len]).items(),
               key=lambda kv: kv[1]["data_offsets"][1] if kv[0] != "__metadata__" else -1)[0]  # fmt: skip
    with pytest.raises(ValueError, match=f"{last} is truncated"):
        read_safetensors_tensor(path, last)
