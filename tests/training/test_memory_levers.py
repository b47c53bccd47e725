"""What keeps a head's training small without changing what it computes.

* A frozen IAV base head is the LM's output layer in memory (`trainees.share_frozen_base`): one
  ``V x H`` weight where there were two, the same values, the LM untouched.
* glibc maps large blocks on their own from the loop's start (`loop.mmap_large_allocations`):
  every chunk's logits, never a decoding batch's mid-size blocks.
"""

from __future__ import annotations

import platform

import pytest
import torch

from alignheads.config import IAVTrainConfig
from alignheads.models.losses import chunk_tokens
from alignheads.models.methods import method
from alignheads.models.trainees import share_frozen_base
from alignheads.tasks.training.loop import MMAP_THRESHOLD_BYTES, mmap_large_allocations
from tests.helpers.tiny_models import tiny_llama


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("features", ["cached", "backbone"])
def test_a_frozen_base_head_is_the_output_layer_in_memory(tied, features):
    model = tiny_llama(tied=tied)
    layer = model.get_output_embeddings()
    want = layer.weight.detach().clone()
    trainee = method("iav").trainee(model, IAVTrainConfig(features=features), "cpu")
    base = trainee.module.base.weight
    assert base.data_ptr() == layer.weight.data_ptr() and base is not layer.weight
    assert not base.requires_grad and torch.equal(base, want)
    assert all(p is not base for p in trainee.module.parameters() if p.requires_grad)
    trainee.module.to(torch.float64)  # a conversion of the head re-points its own Parameter only
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, want)


def test_a_trained_base_head_keeps_its_own_copy():
    model = tiny_llama(tied=False)
    trainee = method("iav").trainee(model, IAVTrainConfig(base_head="trained", kl="topk"), "cpu")
    base = trainee.module.base.weight
    assert base.requires_grad and base.data_ptr() != model.lm_head.weight.data_ptr()
    torch.testing.assert_close(base, model.lm_head.weight, atol=0, rtol=0)


def test_an_output_layer_in_another_dtype_is_not_shared():
    """A bf16 LM under a float32 head: W_b is an upcast copy, not the layer's storage."""
    model = tiny_llama(tied=False).to(torch.bfloat16)
    head = method("iav").trainee(model, IAVTrainConfig(features="cached"), "cpu").module
    assert head.base.weight.dtype == torch.float32
    assert head.base.weight.data_ptr() != model.lm_head.weight.data_ptr()
    assert torch.equal(head.base.weight, model.lm_head.weight.float())


def test_share_frozen_base_shares_a_bias_too():
    layer = torch.nn.Linear(4, 6)
    base = torch.nn.Linear(4, 6)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        base.bias.copy_(layer.bias)
    base.requires_grad_(False)
    share_frozen_base(base, layer)
    assert base.weight.data_ptr() == layer.weight.data_ptr()
    assert base.bias.data_ptr() == layer.bias.data_ptr()
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_large_blocks_are_mapped_on_their_own_under_glibc():
    assert mmap_large_allocations() == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("vocab", [512, 32_000, 128_256, 262_144])
def test_every_chunks_logits_reach_the_mapping_threshold(vocab: int):
    """A chunk's float32 logits, the blocks that must go back to the system as soon as they are
    freed, are at least the threshold whatever the vocabulary (a chunk is LOGITS_PER_CHUNK logits
    less part of a row), while the threshold stays at the 8 MiB under which the sweeps' per-call
    blocks come from the heap (benchmarks/malloc_bench.py: 1 MiB made sampling ~20 % slower)."""
    assert chunk_tokens(vocab) * vocab * 4 >= MMAP_THRESHOLD_BYTES == 8 << 20
