"""KV-cached decoding sees exactly what a full forward pass sees, inside transformers' generate()."""

from __future__ import annotations

from threading import Thread

import pytest
import torch
from transformers import TextIteratorStreamer

from alignheads.models import AlignedLM, token_context
from alignheads.models.losses import exact_kl
from tests.helpers.tiny_models import PAD, left_padded_batch, make_head, randomise, tiny_llama, tiny_tokenizer

TOL = 1e-5
KINDS = ["iav", "calm"]


def aligned_model(kind: str, *, tied: bool = False, seed: int = 1) -> AlignedLM:
    model = tiny_llama(tied=tied)
    return AlignedLM(model, randomise(make_head(kind, model), seed=seed))


def full_logits(aligned: AlignedLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return aligned(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("kind", KINDS)
def test_stepwise_cached_decoding_matches_full_forward(kind: str) -> None:
    """Prefill a left-padded batch of prompts of lengths 7, 3, 5, then feed 6 tokens one at a
    time through the KV cache; every step's logits equal the full forward's at that position."""
    aligned = aligned_model(kind)
    aligned.alpha = 1.3
    ids, mask = left_padded_batch([7, 3, 5])
    cont, _ = left_padded_batch([6, 6, 6], seed=9)
    all_ids = torch.cat([ids, cont], 1)
    all_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    reference = full_logits(aligned, all_ids, all_mask)

    width = ids.shape[1]
    with torch.no_grad():
        out = aligned(input_ids=ids, attention_mask=mask, use_cache=True)
        assert (out.logits - reference[:, :width]).abs().max() <= TOL
        cache = out.past_key_values
        for step in range(cont.shape[1]):
            out = aligned(
                input_ids=cont[:, step : step + 1],
                attention_mask=all_mask[:, : width + step + 1],
                past_key_values=cache,
                use_cache=True,
            )
            assert (out.logits[:, 0] - reference[:, width + step]).abs().max() <= TOL, step
    # the check has teeth: the head moves the logits far more than the tolerance
    with aligned.use_alpha(0.0):
        assert (full_logits(aligned, all_ids, all_mask) - reference).abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_generate_logits_match_full_forward(kind: str) -> None:
    aligned = aligned_model(kind, tied=True)
    ids, mask = left_padded_batch([8, 2, 5, 6])
    new = 7
    out = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        alpha=0.8,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    assert aligned.alpha == 1.0  # α was set for that call only
    seq = out.sequences
    assert seq.shape == (4, ids.shape[1] + new)
    full_mask = torch.cat([mask, torch.ones(4, new, dtype=mask.dtype)], 1)
    with aligned.use_alpha(0.8):
        reference = full_logits(aligned, seq, full_mask)
    cached = torch.stack(out.logits, 1)
    width = ids.shape[1]
    assert (cached - reference[:, width - 1 : -1]).abs().max() <= TOL


def test_calm_true_position_ignores_left_padding() -> None:
    """A left-padded row gets the same logits as the same tokens alone, unpadded."""
    aligned = aligned_model("calm")
    ids, mask = left_padded_batch([9, 4, 6])
    batch = full_logits(aligned, ids, mask)
    for row, n in enumerate([9, 4, 6]):
        alone = full_logits(aligned, ids[row : row + 1, -n:], mask[row : row + 1, -n:])
        assert (batch[row : row + 1, -n:] - alone).abs().max() <= TOL


def test_calm_context_is_the_causal_mean_of_real_tokens() -> None:
    """Hand check: hidden rows h = 10, 20, 30 (scalars, H = 1) behind one padding token
    (value 99, ignored) → positions 0, 0, 1, 2 and context means 0, 10, 15, 20."""
    hidden = torch.tensor([[[99.0], [10.0], [20.0], [30.0]]])
    mask = torch.tensor([[0, 1, 1, 1]])
    ctx = token_context(hidden, mask)
    assert ctx.positions.tolist() == [[0, 0, 1, 2]]
    assert ctx.context.squeeze(-1).tolist() == [[0.0, 10.0, 15.0, 20.0]]


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_scores_match_full_forward(kind: str) -> None:
    """With length_penalty 0 a beam's score is the sum of its tokens' log-probs; recomputing
    them with a full forward pass over the returned sequences gives the same numbers, so the
    head's running state followed the beams through every cache reordering."""
    aligned = aligned_model(kind, seed=2)
    ids, mask = left_padded_batch([6, 3], seed=11)
    new, beams = 6, 4
    out = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        num_beams=beams,
        num_return_sequences=beams,
        do_sample=False,
        length_penalty=0.0,
        max_new_tokens=new,
        min_new_tokens=new,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=PAD,
    )
    seq = out.sequences
    assert seq.shape == (2 * beams, ids.shape[1] + new)
    width = ids.shape[1]
    prompt_mask = mask.repeat_interleave(beams, 0)
    full_mask = torch.cat([prompt_mask, torch.ones(seq.shape[0], new, dtype=mask.dtype)], 1)
    logits = full_logits(aligned, seq, full_mask)
    logprobs = torch.log_softmax(logits[:, width - 1 : -1], -1).gather(-1, seq[:, width:, None]).squeeze(-1)
    assert (logprobs.sum(-1) - out.sequences_scores).abs().max() <= 1e-4
    assert len(set(map(tuple, seq.tolist()))) > 2  # the beams differ


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_in_left_padded_batches(kind: str) -> None:
    aligned = aligned_model(kind)
    ids, mask = left_padded_batch([5, 2, 7])
    new = 8
    torch.manual_seed(0)
    out = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,
        temperature=1.0,
        max_new_tokens=new,
        min_new_tokens=new,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
        alpha=-0.7,
    )
    seq = out.sequences
    width = ids.shape[1]
    assert seq.shape == (3, width + new)
    assert torch.equal(seq[:, :width], ids)
    full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], 1)
    with aligned.use_alpha(-0.7):
        reference = full_logits(aligned, seq, full_mask)
    assert (torch.stack(out.logits, 1) - reference[:, width - 1 : -1]).abs().max() <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_zero_generates_like_the_base_and_alpha_changes_output(kind: str) -> None:
    aligned = aligned_model(kind)
    ids, mask = left_padded_batch([6, 4], seed=5)
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 10, "do_sample": False}
    kwargs["pad_token_id"] = PAD
    with aligned.original_lm() as lm:
        base = lm.generate(**kwargs)
    if kind == "calm":  # CALM's α = 0 is the frozen LM itself; IAV's is its (perturbed) base head
        assert torch.equal(aligned.generate(**kwargs, alpha=0.0), base)
    assert not torch.equal(aligned.generate(**kwargs, alpha=3.0), base)
    with torch.no_grad():
        out = aligned.head_outputs(ids, mask)
        steered = aligned(input_ids=ids, attention_mask=mask, alpha=-1.5).logits
    assert torch.allclose(steered, out.base_logits - 1.5 * out.delta, atol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_with_text_iterator_streamer(kind: str) -> None:
    """Streaming (batch of one, as transformers' streamers require) from a generate() thread
    yields the same text as the same greedy generation without a streamer, at that α."""
    tokenizer = tiny_tokenizer()
    aligned = aligned_model(kind)
    enc = tokenizer(["w1 w2 w3 w4"], return_tensors="pt")
    kwargs = {**enc, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    width = enc["input_ids"].shape[1]
    expected = tokenizer.decode(aligned.generate(**kwargs, alpha=2.0)[0, width:], skip_special_tokens=True)
    at_zero = tokenizer.decode(aligned.generate(**kwargs, alpha=0.0)[0, width:], skip_special_tokens=True)
    assert expected != at_zero  # so the streamed text shows which α the thread used

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=aligned.generate, kwargs={**kwargs, "alpha": 2.0, "streamer": streamer})
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert len(chunks) > 1
    assert "".join(chunks).strip() == expected.strip()


def test_recording_gives_kl_to_base_and_strengths() -> None:
    aligned = aligned_model("calm")
    ids, mask = left_padded_batch([5, 3])
    with aligned.recording() as rec:
        out = aligned.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=PAD,
        )
    stats = rec.stacked()
    assert set(stats) == {"strength", "modulation_norm", "kl_to_base"}
    assert all(v.shape == (2, 4) for v in stats.values())
    s_max = aligned.head.config.s_max
    assert ((stats["strength"] > 0) & (stats["strength"] < s_max)).all()
    width = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    base = aligned.base_logits(out.sequences, full_mask)[:, width - 1 : -1]
    expected = exact_kl(torch.stack(out.logits, 1), base)
    assert torch.allclose(stats["kl_to_base"], expected, atol=1e-5)
    assert (expected > 1e-3).all()


def test_calm_refuses_calls_without_context() -> None:
    aligned = aligned_model("calm")
    with pytest.raises(RuntimeError, match="needs token context"):
        aligned.model.get_output_embeddings()(torch.zeros(1, 2, 32))
    ids, mask = left_padded_batch([4])
    plain_cache_model = tiny_llama(tied=False)
    with torch.no_grad():
        foreign = plain_cache_model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="did not see"):
            aligned(
                input_ids=ids[:, :1],
                attention_mask=torch.ones(1, 5, dtype=torch.long),
                past_key_values=foreign,
            )
