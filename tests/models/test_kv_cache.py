"""The in-place KV cache decodes bit for bit what transformers' own `DynamicCache` decodes."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from alignheads.models import AlignedLM
from alignheads.models.guided import guided_decode
from alignheads.models.kv_cache import PrefixBufferLayer, prefix_cache, with_prefix_cache
from alignheads.models.row_sampling import seeded_decoding
from tests.helpers.tiny_models import (
    EOS,
    PAD,
    left_padded_batch,
    make_head,
    randomise,
    tiny_gemma2,
    tiny_llama,
)

SAMPLED = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_p": 0.95, "eos_token_id": [EOS], "pad_token_id": PAD}
SEEDS = [11, 12, 13, 14]


def _generate(model, ids, mask, cache, **kwargs):
    with torch.inference_mode():
        return model.generate(
            ids, attention_mask=mask, past_key_values=cache, output_logits=True, return_dict_in_generate=True, **kwargs
        )


def _same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits)
    for x, y in zip(a.logits, b.logits, strict=True):
        assert torch.equal(x, y)  # bit for bit, not within a tolerance


@pytest.mark.parametrize("reserve", [12, 0, 3])
def test_sampled_generate_is_bit_identical_to_dynamic_cache(reserve: int) -> None:
    """Seeded sampling over a left-padded batch, with room for every new token (12), none (each
    step grows the buffer by doubling) and too little (3): same tokens and same logits."""
    model = tiny_llama(tied=False)
    ids, mask = left_padded_batch([7, 3, 5, 6])
    kwargs = seeded_decoding(SAMPLED, SEEDS)
    expected = _generate(model, ids, mask, DynamicCache(config=model.config), **kwargs)
    cache = prefix_cache(model, reserve)
    got = _generate(model, ids, mask, cache, **seeded_decoding(SAMPLED, SEEDS))
    _same(expected, got)
    layer = cache.layers[0]
    assert isinstance(layer, PrefixBufferLayer)
    assert layer.keys.shape[-2] == got.sequences.shape[1] - 1  # the last token is never fed back
    if reserve >= SAMPLED["max_new_tokens"]:  # no regrowth: the first buffer held everything
        assert layer._key_buffer.shape[-2] == ids.shape[1] + reserve


def test_beam_search_reorders_through_a_copy() -> None:
    """Beam search replaces the layers' tensors each step (reorder); the next update copies them
    into a new buffer, and the beams come out as with DynamicCache."""
    model = tiny_llama(tied=False)
    ids, mask = left_padded_batch([6, 4])
    settings = {"max_new_tokens": 8, "num_beams": 3, "do_sample": False, "pad_token_id": PAD}
    expected = _generate(model, ids, mask, DynamicCache(config=model.config), **settings)
    got = _generate(model, ids, mask, prefix_cache(model, 8), **settings)
    assert torch.equal(expected.sequences, got.sequences)


def test_crop_then_update_overwrites_the_cropped_positions() -> None:
    """A crop (speculative decoding's rollback) leaves a shorter view of the same buffer; the next
    update writes over the cropped positions, as DynamicCache's concatenation would."""
    torch.manual_seed(0)
    ours, theirs = PrefixBufferLayer(reserve=4), DynamicLayer()
    for t in (5, 1, 1):
        k, v = torch.randn(2, 3, t, 4), torch.randn(2, 3, t, 4)
        for layer in (ours, theirs):
            layer.update(k, v)
    for layer in (ours, theirs):
        layer.crop(-2)
    k, v = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    (k1, v1), (k2, v2) = ours.update(k, v), theirs.update(k, v)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert k1.shape[-2] == 8 and ours.get_seq_length() == 8


def test_sliding_window_layers_stay_transformers_own() -> None:
    """Gemma-2 alternates sliding-window and full layers: only the full ones are buffered, and
    greedy decoding is unchanged."""
    model = tiny_gemma2()
    cache = prefix_cache(model, 10)
    kinds = {type(layer) for layer in cache.layers}
    assert kinds == {PrefixBufferLayer, DynamicSlidingWindowLayer}
    ids, mask = left_padded_batch([7, 4])
    settings = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": PAD}
    _same(_generate(model, ids, mask, DynamicCache(config=model.config), **settings), _generate(model, ids, mask, cache, **settings))


def test_with_prefix_cache_leaves_a_chosen_cache_alone() -> None:
    model = tiny_llama(tied=False)
    mine = DynamicCache(config=model.config)
    assert with_prefix_cache(model, {"past_key_values": mine})["past_key_values"] is mine
    assert "past_key_values" not in with_prefix_cache(model, {"cache_implementation": "static"})
    assert "past_key_values" not in with_prefix_cache(model, {"use_cache": False})
    chosen = with_prefix_cache(model, {"max_new_tokens": 9})["past_key_values"]
    assert all(isinstance(layer, PrefixBufferLayer) and layer.reserve == 9 for layer in chosen.layers)


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_aligned_generate_matches_the_default_cache(kind: str) -> None:
    """AlignedLM.generate uses the in-place cache unless told otherwise: per-row α, seeded
    sampling, same tokens and logits as with transformers' DynamicCache."""
    model = tiny_llama(tied=False)
    aligned = AlignedLM(model, randomise(make_head(kind, model)))
    ids, mask = left_padded_batch([7, 3, 5, 6])
    alphas = torch.tensor([0.0, 0.5, 1.0, 2.0])
    with torch.inference_mode():
        ours = aligned.generate(
            ids, attention_mask=mask, alpha=alphas, output_logits=True, return_dict_in_generate=True,
            **seeded_decoding(SAMPLED, SEEDS),
        )  # fmt: skip
        default = aligned.generate(
            ids, attention_mask=mask, alpha=alphas, output_logits=True, return_dict_in_generate=True,
            past_key_values=DynamicCache(config=model.config), **seeded_decoding(SAMPLED, SEEDS),
        )  # fmt: skip
    _same(default, ours)


def test_guided_decode_matches_base_generate_with_the_base_rule() -> None:
    """Guided decoding (its own loop, two in-place caches) with a rule that returns the base
    logits samples what the base model's generate() samples, token for token."""
    base, other = tiny_llama(tied=False, seed=0), tiny_llama(tied=False, seed=3)
    ids, mask = left_padded_batch([7, 3, 5, 6])
    out = guided_decode(base, other, ids, mask, lambda z_base, z_other, alpha: z_base, 0.0, **seeded_decoding(SAMPLED, SEEDS))
    with torch.inference_mode():
        expected = base.generate(
            ids, attention_mask=mask, past_key_values=DynamicCache(config=base.config), **seeded_decoding(SAMPLED, SEEDS)
        )
    assert torch.equal(out.sequences, expected)


def test_without_a_config_the_layers_are_added_on_first_use() -> None:
    """A model with no config (the cache cannot know its layers ahead) gets in-place layers as
    each layer first writes, holding what DynamicCache holds."""
    torch.manual_seed(0)
    ours, theirs = prefix_cache(object(), reserve=2), DynamicCache()
    for t in (3, 1, 1, 1):  # the third token overflows the reserve: the buffer grows
        for layer in (0, 1):
            k, v = torch.randn(2, 2, t, 4), torch.randn(2, 2, t, 4)
            (k1, v1), (k2, v2) = ours.update(k, v, layer), theirs.update(k, v, layer)
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert [type(layer) for layer in ours.layers] == [PrefixBufferLayer, PrefixBufferLayer]
    assert ours.get_seq_length(1) == theirs.get_seq_length(1) == 6


def test_batch_selection_keeps_the_rows_and_writes_in_place_again() -> None:
    """Finished rows leaving (`models.guided`): the cache keeps the chosen rows' keys and values
    and its room, so the next step writes into the buffer without another copy."""
    model = tiny_llama(tied=False)
    ids, mask = left_padded_batch([7, 3, 5, 6])
    cache = prefix_cache(model, 8)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        keys, values = layer.keys.clone(), layer.values.clone()
        cache.batch_select_indices(torch.tensor([1, 3]))
        assert torch.equal(layer.keys, keys[[1, 3]]) and torch.equal(layer.values, values[[1, 3]])
        assert layer._key_buffer.shape[-2] == ids.shape[1] + 8  # the room came along
        buffer = layer._key_buffer.data_ptr()
        step = torch.tensor([[5], [6]])
        step_mask = torch.cat([mask[[1, 3]], torch.ones(2, 1, dtype=mask.dtype)], dim=-1)
        model(input_ids=step, attention_mask=step_mask, past_key_values=cache, use_cache=True)
        assert layer._key_buffer.data_ptr() == buffer and layer.keys.shape[-2] == ids.shape[1] + 1
        assert torch.equal(layer.keys[:, :, :-1], keys[[1, 3]])
