"""`loading.load_output_layer_only`: the LM built on "meta" with only its output layer read from
the checkpoint's safetensors: untied and tied output layers, sharded checkpoints, float16 and
bfloat16 storage, and one clear line when no file holds the layer."""

from __future__ import annotations

import json

import pytest
import torch

from alignheads.loading import load_causal_lm, load_output_layer_only, model_shape, read_safetensors_tensor
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


def _auto_shape(path) -> tuple[int, int]:
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(path)).get_text_config()
    return text.vocab_size, text.hidden_size


def test_model_shape_reads_a_plain_config_as_autoconfig_does(tmp_path):
    from tests.helpers.tiny_models import tiny_gemma2

    tiny_llama(tied=False, vocab=96, hidden=24).save_pretrained(tmp_path / "llama")
    tiny_gemma2(vocab=80).save_pretrained(tmp_path / "gemma2")
    for name, expected in (("llama", (96, 24)), ("gemma2", (80, 32))):
        assert model_shape(str(tmp_path / name)) == _auto_shape(tmp_path / name) == expected


def test_model_shape_of_a_multimodal_config_is_its_text_models(tmp_path):
    """A nested text config holds the sizes that count, whatever the top level says: AutoConfig
    reads it, not the JSON."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=77, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    LlavaConfig(text_config=text, vision_config=vision).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"vocab_size": 5, "hidden_size": 3}))
    assert model_shape(str(tmp_path)) == _auto_shape(tmp_path) == (77, 16)
