"""The reference pass's top-k (`sorted_topk`, `partition_topk`, `untied_topk`) is
`torch.topk(sorted=True)` bit for bit, tie order included, and `topk_reference` is the former torch.topk-based extraction bit for
bit; also the vectorised packing and the float16 rounding of the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refpass_bench import legacy_topk_reference  # benchmarks/ is on pytest's pythonpath

from alignheads.models.reference import (
    pack_batch,
    partition_topk,
    sorted_topk,
    topk_reference,
    untied_topk,
)
from alignheads.storage.refcache import rounded


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same_as_torch(logits: torch.Tensor, k: int, topk=sorted_topk) -> None:
    values, ids = topk(logits, k)
    want_values, want_ids = logits.topk(k, dim=-1, sorted=True)
    assert ids.dtype == torch.int32 and values.dtype == logits.dtype
    assert torch.equal(_bits(values), _bits(want_values)), k
    assert torch.equal(ids.long(), want_ids), k


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 97, generator=gen) * 4
    ties = torch.randint(0, 6, (300, 97), generator=gen).float()  # ties everywhere
    some = x.clone()
    some[::7, 3] = some[::7, 5]  # a tie here and there, inside or outside the top k
    some[::11, 10] = some[::11].max(-1).values  # a tie with the maximum
    signed_zero = torch.randn(64, 97, generator=gen)
    signed_zero[:, :40] = 0.0
    signed_zero[::2, 40:60] = -0.0  # -0.0 next to +0.0: equal values, other bits
    special = torch.randn(8, 97, generator=gen)
    special[0, 4] = float("inf")
    special[1, :] = float("-inf")
    special[2, 9] = float("nan")  # one NaN: torch ranks it first
    special[3, :50] = float("nan")  # more NaNs than small k
    special[4, ::2] = float("inf")
    return {"random": x, "ties": ties, "some ties": some, "signed zero": signed_zero, "special": special}


@pytest.mark.parametrize("name", list(_inputs()))
@pytest.mark.parametrize("k", [1, 2, 7, 32, 96, 97])
def test_partition_topk_and_sorted_topk_are_torch_topk_bit_for_bit(name, k):
    _assert_same_as_torch(_inputs()[name], k, partition_topk)
    _assert_same_as_torch(_inputs()[name], k)


def test_sorted_topk_on_real_logits_shapes_and_edges():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(50, 16, generator=gen), torch.randn(512, 16, generator=gen)
    logits = torch.nn.functional.linear(hidden, weight)
    for k in (1, 64, 256, 512):  # k = 1: torch.topk's heap, the others: the partition
        _assert_same_as_torch(logits, k)
        _assert_same_as_torch(logits, k, partition_topk)
    _assert_same_as_torch(torch.zeros(0, 512), 64, partition_topk)  # a batch without scored tokens
    _assert_same_as_torch(logits[:, ::2], 8, partition_topk)  # a non-contiguous view
    _assert_same_as_torch(logits.double(), 8)  # not float32: torch.topk itself
    with torch.inference_mode():
        _assert_same_as_torch(logits, 64, partition_topk)


def test_untied_topk_flags_exactly_the_rows_whose_answer_depends_on_tie_breaking():
    x = np.array(
        [
            [1.0, 5.0, 3.0, 4.0, 2.0],  # distinct
            [1.0, 5.0, 5.0, 4.0, 2.0],  # equal values inside the top 3
            [1.0, 5.0, 3.0, 3.0, 2.0],  # a value equal to the 3rd outside the top 3
            [1.0, 5.0, 3.0, 4.0, np.nan],  # a NaN
            [0.0, 5.0, -0.0, 4.0, 2.0],  # ±0 below the top 3: no tie that matters
            [5.0, 3.0, 3.0, 3.0, 3.0],  # the 3rd value four times
        ],
        dtype=np.float32,
    )
    values, ids, tied = untied_topk(x, 3)
    assert tied.tolist() == [False, True, True, True, False, True]
    assert values.dtype == np.float32 and ids.dtype == np.int32
    assert values[0].tolist() == [5.0, 4.0, 3.0] and ids[0].tolist() == [1, 3, 2]
    assert values[4].tolist() == [5.0, 4.0, 2.0] and ids[4].tolist() == [1, 3, 4]
    # every row of an all-distinct input is untied and exact
    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(40 * 33, dtype=np.float32)).reshape(40, 33) - 600
    values, ids, tied = untied_topk(y, 5)
    want = torch.from_numpy(y).topk(5, dim=-1)
    assert not tied.any()
    assert np.array_equal(values, want.values.numpy()) and np.array_equal(ids, want.indices.numpy())


@pytest.mark.parametrize("k", [1, 16, 64, 200])
def test_topk_reference_equals_the_torch_topk_extraction_bit_for_bit(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.nn.functional.linear(
        torch.randn(120, 24, generator=gen), torch.randn(200, 24, generator=gen)
    )
    logits[::9, 7] = logits[::9, 8]  # some ties
    targets = torch.randint(0, 200, (120,), generator=gen)
    got = topk_reference(logits, targets, k)
    want = legacy_topk_reference(logits, targets, k)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(_bits(g), _bits(w))
    # and what it stands for: top-k of the log-softmax (equal up to rounding)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got[2], lp.topk(k, -1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[0], lp.gather(-1, targets[:, None])[:, 0], atol=1e-5, rtol=0)


def test_pack_batch_takes_numpy_arrays_like_lists():
    prompts = [[5, 6], [], [7], [1, 2, 3]]
    responses = [[8, 9, 2], [4, 5], [], [6]]
    want = pack_batch(prompts, responses, pad_id=0)
    as_arrays = [np.asarray(p, np.int32) for p in prompts], [np.asarray(r, np.int32) for r in responses]
    got = pack_batch(*as_arrays, pad_id=0)
    for name in ("input_ids", "attention_mask", "rows", "cols", "targets", "counts", "prefix_lens"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert getattr(got, name).dtype == torch.int64, name
    assert want.input_ids.tolist() == [[5, 6, 8, 9, 2], [4, 5, 0, 0, 0], [7, 0, 0, 0, 0], [1, 2, 3, 6, 0]]
    assert want.counts.tolist() == [3, 1, 0, 1] and want.targets.tolist() == [8, 9, 2, 5, 6]
    assert pack_batch([[]], [[]], pad_id=3).input_ids.tolist() == [[3]]


def test_float16_rounding_is_numpys():
    special = [0.0, -0.0, 1e-8, -1e-8, 6e-8, 3e-5, 65504.0, 65520.0, 1e6, -1e6, np.inf, -np.inf]
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [np.array(special, np.float32), (rng.standard_normal(10_000) * 10.0 ** rng.integers(-8, 5, 10_000))]
    ).astype(np.float32)
    # random bit patterns: every exponent, subnormals and ties included
    bits = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([values, bits[~np.isnan(bits)]])
    values = values[: values.size // 2 * 2].reshape(-1, 2)
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    got = rounded(values, "float16")
    assert got.dtype == np.float16 and got.shape == values.shape
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert rounded(values, "float32").dtype == np.float32
    wide = values.astype(np.float64) / 3  # not float32: numpy's own cast (one rounding)
    with np.errstate(over="ignore"):
        assert np.array_equal(
            rounded(wide, "float16").view(np.uint16), wide.astype(np.float16).view(np.uint16)
        )
