"""Several dials on one LM: ``z = z_LM + Σ_i α_i Δ_i``, fused, inside transformers' generate()."""

from __future__ import annotations

from threading import Thread

import pytest
import torch
from transformers import TextIteratorStreamer

from alignheads.models import AlignedLM, CALMHead, IAVHead, merge_iav_dials, token_context
from alignheads.models.aligned import plain_generation_config
from alignheads.models.dials import (
    calm_codes,
    calm_dials_delta,
    combine_dials,
    dial_alpha,
    dial_head_decoder,
    fold_weights,
    iav_dial_logits,
    stack_calm,
)
from alignheads.models.losses import exact_kl
from alignheads.models.row_sampling import seeded_decoding
from tests.helpers.tiny_models import PAD, left_padded_batch, randomise, tiny_llama, tiny_tokenizer

TOL = 1e-5
ALPHA = torch.tensor([1.0, 0.7, -0.5, 2.0])  # one α per dial of `dials()`


def iav_dial(model: torch.nn.Module, seed: int) -> IAVHead:
    """An IAV head on the LM's own lm_head (W_b untouched) with a non-zero W_a."""
    head = IAVHead.from_base_model(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.align.weight.copy_(torch.randn(head.align.weight.shape, generator=gen) * 0.15)
    return head


def dials(model: torch.nn.Module) -> dict:
    """IAV and CALM dials interleaved; CALM ranks differ, and "short"'s position table (6 rows) is
    shorter than the sequences, so its clamp is exercised."""
    return {
        "helpful": iav_dial(model, 1),
        "polite": randomise(CALMHead.from_base_model(model, rank=8), seed=2),
        "brief": iav_dial(model, 3),
        "short": randomise(CALMHead.from_base_model(model, rank=4, max_positions=6), seed=4),
    }


def plain_logits(
    aligned: AlignedLM, ids: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """``z_LM + Σ_i α_i Δ_i`` from each head's own forward (no fusion): α ``(K,)`` or ``(B, K)``."""
    with torch.no_grad():
        hidden = aligned.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        context = token_context(hidden, mask)
        logits = aligned.frozen_head(hidden)
        columns = alpha.expand(ids.shape[0], -1)
        for i, head in enumerate(aligned.heads.values()):
            delta = head(hidden, frozen_head=aligned.frozen_head, context=context).delta
            logits = logits + columns[:, i, None, None] * delta
    return logits


def full_logits(aligned: AlignedLM, ids: torch.Tensor, mask: torch.Tensor, alpha) -> torch.Tensor:
    with torch.no_grad():
        return aligned(input_ids=ids, attention_mask=mask, alpha=alpha, use_cache=False).logits


@pytest.fixture
def aligned() -> AlignedLM:
    model = tiny_llama(tied=False)
    return AlignedLM(model, dials(model))


# --------------------------------------------------------------------------- the maths


def test_fold_weights_on_hand_computed_numbers() -> None:
    w1, w2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[10.0, -4.0]], dtype=torch.float16)
    assert torch.equal(fold_weights([w1, w2], [2.0, 0.5]), torch.tensor([[7.0, 2.0]]))
    assert fold_weights([w1, w2], [0.0, 0.0]).dtype == torch.float32
    assert not fold_weights([w1, w2], [0.0, 0.0]).any()


def test_fused_iav_maths_equals_the_per_dial_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 16, generator=gen)
    weights = [torch.randn(40, 16, generator=gen) for _ in range(3)]
    alpha = torch.tensor([[1.0, 0.5, -2.0], [0.0, 0.0, 0.0], [0.3, 0.0, 1.0]])
    per_dial = iav_dial_logits(hidden, torch.cat(weights), 3)
    assert per_dial.shape == (3, 5, 3, 40)
    for k, weight in enumerate(weights):
        torch.testing.assert_close(per_dial[:, :, k], hidden @ weight.T, atol=TOL, rtol=TOL)
    want = sum(alpha[:, k, None, None] * (hidden @ w.T) for k, w in enumerate(weights))
    got = combine_dials(per_dial, alpha)
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert torch.equal(got[1], torch.zeros(5, 40))  # an all-zero row adds exact zeros
    uniform = sum(a * (hidden @ w.T) for a, w in zip(alpha[0].tolist(), weights, strict=True))
    torch.testing.assert_close(
        hidden @ fold_weights(weights, alpha[0].tolist()).T, uniform, atol=TOL, rtol=TOL
    )


def test_fused_calm_maths_equals_the_per_dial_sum() -> None:
    """Ranks 8 and 4, position tables of 2048 and 6 rows (positions up to 9: the short one clamps)."""
    model = tiny_llama(tied=False)
    heads = [
        randomise(CALMHead.from_base_model(model, rank=8), seed=2),
        randomise(CALMHead.from_base_model(model, rank=4, max_positions=6), seed=4),
    ]
    ids, mask = left_padded_batch([10, 3, 7])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        context = token_context(hidden, mask)
        outputs = [head(hidden, frozen_head=model.lm_head, context=context) for head in heads]
        stack = stack_calm(heads)
        assert (
            stack.down.shape == (12, 32)
            and stack.up.shape == (100, 12)
            and stack.positions.shape == (2048, 12)
        )
        codes, strength = calm_codes(stack, hidden, context)
        for k, out in enumerate(outputs):
            torch.testing.assert_close(strength[..., k], out.strength, atol=TOL, rtol=TOL)
        for alpha in (torch.tensor([1.5, -0.5]), torch.tensor([[1.5, -0.5], [0.0, 0.0], [0.0, 2.0]])):
            columns = alpha.expand(3, -1)
            want = sum(columns[:, k, None, None] * out.delta for k, out in enumerate(outputs))
            got = calm_dials_delta(stack, codes, strength, alpha)
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
            assert want.abs().max() > 0.1
    assert not got[1].any()  # an all-zero row adds exact zeros


def test_dial_alpha_forms() -> None:
    names = ("a", "b", "c")
    assert dial_alpha({"b": 2.0}, names).tolist() == [0.0, 2.0, 0.0]  # missing names are 0
    assert dial_alpha(0.5, names).tolist() == [0.5, 0.5, 0.5]
    assert dial_alpha(torch.tensor(1.0), names).tolist() == [1.0, 1.0, 1.0]
    assert dial_alpha([1, 2, 3], names).dtype == torch.float32
    assert dial_alpha([[1, 2, 3], [4, 5, 6]], names).shape == (2, 3)
    with pytest.raises(ValueError, match=r"unknown dial\(s\) \['x', 'y'\]; the dials are \['a', 'b', 'c'\]"):
        dial_alpha({"x": 1.0, "a": 1.0, "y": 2.0}, names)
    for bad in ([1.0, 2.0], torch.ones(2, 2), torch.ones(2, 3, 1), torch.ones(0, 3)):
        with pytest.raises(ValueError, match="one α per dial"):
            dial_alpha(bad, names)
    with pytest.raises(ValueError, match="real numbers"):
        dial_alpha(torch.tensor([True, False, True]), names)


# --------------------------------------------------------------------------- the output layer


def test_zero_alpha_gives_the_lm_logits_exactly(aligned: AlignedLM) -> None:
    """Every form of an all-zero α, recording or not, and the zero rows of a per-row α: bit for bit."""
    ids, mask = left_padded_batch([7, 4, 6])
    base = aligned.base_logits(ids, mask)
    for zero in (0.0, {}, {"polite": 0.0}, torch.zeros(4), torch.zeros(3, 4)):
        assert torch.equal(full_logits(aligned, ids, mask, zero), base), zero
        with aligned.recording(), torch.no_grad():
            assert torch.equal(aligned(input_ids=ids, attention_mask=mask, alpha=zero).logits, base)
    rows = torch.stack([ALPHA, torch.zeros(4), -ALPHA])
    steered = full_logits(aligned, ids, mask, rows)
    assert torch.equal(steered[1], base[1])
    assert (steered[0] - base[0]).abs().max() > 0.5  # teeth


def test_logits_equal_the_plain_sum_of_the_dials(aligned: AlignedLM) -> None:
    """A uniform α vector, a mapping and a per-row α ``(B, K)`` (mixed IAV and CALM dials)."""
    ids, mask = left_padded_batch([9, 3, 6])
    want = plain_logits(aligned, ids, mask, ALPHA)
    assert (full_logits(aligned, ids, mask, ALPHA) - want).abs().max() <= TOL
    mapping = dict(zip(aligned.dial_names, ALPHA.tolist(), strict=True))
    assert torch.equal(full_logits(aligned, ids, mask, mapping), full_logits(aligned, ids, mask, ALPHA))
    rows = torch.tensor([[1.0, 0.7, -0.5, 2.0], [0.0, 1.0, 0.0, 0.0], [0.3, -1.0, 2.0, 0.5]])
    assert (full_logits(aligned, ids, mask, rows) - plain_logits(aligned, ids, mask, rows)).abs().max() <= TOL
    assert (want - aligned.base_logits(ids, mask)).abs().max() > 0.5


def test_dial_names_alpha_and_one_head_api() -> None:
    model = tiny_llama(tied=False)
    heads = dials(model)
    n_weights = len(model.state_dict())
    aligned = AlignedLM(model, heads, alpha={"brief": 2.0})
    assert aligned.dial_names == ("helpful", "polite", "brief", "short")
    # every dial's weights are in the model's state_dict once (lm_head.dials.<name>.*)
    assert len(model.state_dict()) == n_weights + sum(len(h.state_dict()) for h in heads.values())
    assert aligned.heads == heads
    assert aligned.alpha.tolist() == [0.0, 0.0, 2.0, 0.0]
    with aligned.use_alpha(ALPHA):
        assert torch.equal(aligned.alpha, ALPHA)
    assert aligned.alpha.tolist() == [0.0, 0.0, 2.0, 0.0]
    with pytest.raises(TypeError, match=r"carries 4 dials .*use \.heads\[name\]"):
        aligned.head  # noqa: B018
    with pytest.raises(ValueError, match=r"unknown dial\(s\) \['rude'\]"):
        aligned.alpha = {"rude": 1.0}
    aligned.remove()
    one = AlignedLM(model, heads["helpful"], alpha=0.5)  # one head: today's API
    assert one.dial_names == () and one.alpha == 0.5 and one.head is heads["helpful"]


def test_refuses_a_trained_base_head_and_leaves_the_model_untouched() -> None:
    model = tiny_llama(tied=False)
    trained = randomise(IAVHead.from_base_model(model))  # W_b moved away from lm_head
    calm = randomise(CALMHead.from_base_model(model, rank=4))
    with pytest.raises(ValueError, match="IAV dial 'trained' has a trained base head W_b"):
        AlignedLM(model, {"calm": calm, "trained": trained})
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    assert not model._forward_pre_hooks and not model.base_model._forward_hooks  # no tracker left behind
    with pytest.raises(ValueError, match="no dials given"):
        AlignedLM(model, {})
    with pytest.raises(ValueError, match="vocabulary 100 x hidden 32"):
        AlignedLM(model, {"other": IAVHead.from_base_model(tiny_llama(tied=False, vocab=90))})


def test_cached_weights_follow_alpha_and_in_place_edits(aligned: AlignedLM) -> None:
    """The folded IAV matrix and the CALM stack are rebuilt when α changes, when a head's weights
    are edited in place and when the model moves to another dtype."""
    ids, mask = left_padded_batch([5, 3])
    first = full_logits(aligned, ids, mask, ALPHA)
    second = full_logits(aligned, ids, mask, 2 * ALPHA)
    assert (second - plain_logits(aligned, ids, mask, 2 * ALPHA)).abs().max() <= TOL
    with torch.no_grad():
        aligned.heads["helpful"].align.weight.mul_(-1.0)
        aligned.heads["polite"].up.weight.mul_(3.0)
    edited = full_logits(aligned, ids, mask, ALPHA)
    assert (edited - plain_logits(aligned, ids, mask, ALPHA)).abs().max() <= TOL
    assert (edited - first).abs().max() > 0.1
    aligned.model.double()  # moved to another dtype after installing: the caches follow
    doubled = full_logits(aligned, ids, mask, ALPHA)
    assert doubled.dtype == torch.float64
    assert (doubled - plain_logits(aligned, ids, mask, ALPHA)).abs().max() <= 1e-10


# --------------------------------------------------------------------------- inside generate()


@pytest.mark.parametrize("alpha", [ALPHA, torch.stack([ALPHA, torch.zeros(4), -ALPHA, 0.5 * ALPHA])])
def test_generate_logits_match_full_forward(aligned: AlignedLM, alpha: torch.Tensor) -> None:
    """KV-cached greedy decoding of a left-padded batch, uniform and per-row α: every step's logits
    equal a full forward without cache over the returned sequences (the CALM dials' context too)."""
    ids, mask = left_padded_batch([8, 2, 5, 6])
    new = 7
    out = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        alpha=alpha,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    assert aligned.alpha.tolist() == [1.0] * 4  # α was set for that call only
    full_mask = torch.cat([mask, torch.ones(4, new, dtype=mask.dtype)], 1)
    reference = plain_logits(aligned, out.sequences, full_mask, alpha)
    width = ids.shape[1]
    assert (torch.stack(out.logits, 1) - reference[:, width - 1 : -1]).abs().max() <= TOL


def test_sampling_in_left_padded_batches(aligned: AlignedLM) -> None:
    ids, mask = left_padded_batch([5, 2, 7])
    new = 8
    torch.manual_seed(0)
    out = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        alpha=-ALPHA,
        do_sample=True,
        top_k=0,
        max_new_tokens=new,
        min_new_tokens=new,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
    )
    full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], 1)
    reference = full_logits(aligned, out.sequences, full_mask, -ALPHA)
    assert (torch.stack(out.logits, 1) - reference[:, ids.shape[1] - 1 : -1]).abs().max() <= TOL


def test_beam_search_scores_match_full_forward(aligned: AlignedLM) -> None:
    """A uniform α serves beam search: with length_penalty 0 a beam's score is the sum of its
    tokens' log-probs under a full forward, so the CALM dials' state followed every reordering."""
    ids, mask = left_padded_batch([6, 3], seed=11)
    new, beams = 6, 4
    out = aligned.generate(
        input_ids=ids,
        attention_mask=mask,
        alpha=ALPHA,
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
    seq, width = out.sequences, ids.shape[1]
    full_mask = torch.cat(
        [mask.repeat_interleave(beams, 0), torch.ones(seq.shape[0], new, dtype=mask.dtype)], 1
    )
    logits = full_logits(aligned, seq, full_mask, ALPHA)
    logprobs = torch.log_softmax(logits[:, width - 1 : -1], -1).gather(-1, seq[:, width:, None]).squeeze(-1)
    assert (logprobs.sum(-1) - out.sequences_scores).abs().max() <= 1e-4
    assert len(set(map(tuple, seq.tolist()))) > 2


def test_streaming_with_text_iterator_streamer(aligned: AlignedLM) -> None:
    tokenizer = tiny_tokenizer()
    enc = tokenizer(["w1 w2 w3 w4"], return_tensors="pt")
    kwargs = {**enc, "max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    width = enc["input_ids"].shape[1]
    expected = tokenizer.decode(aligned.generate(**kwargs, alpha=ALPHA)[0, width:], skip_special_tokens=True)
    at_zero = tokenizer.decode(aligned.generate(**kwargs, alpha=0.0)[0, width:], skip_special_tokens=True)
    assert expected != at_zero
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=aligned.generate, kwargs={**kwargs, "alpha": ALPHA, "streamer": streamer})
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert len(chunks) > 1 and "".join(chunks).strip() == expected.strip()


def test_alpha_sweep_generate_matches_separate_calls(aligned: AlignedLM) -> None:
    """Per-row α: an (A, K) sweep in one generate() equals one generate() per sweep point."""
    ids, mask = left_padded_batch([7, 3, 5])
    points = [{"helpful": 1.0}, {"polite": 2.0, "short": -1.0}, ALPHA, 0.0]
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    swept = aligned.alpha_sweep_generate(ids, mask, points, **kwargs)
    assert swept.shape == (4, 3, ids.shape[1] + 8)
    for i, point in enumerate(points):
        assert torch.equal(
            swept[i], aligned.generate(input_ids=ids, attention_mask=mask, alpha=point, **kwargs)
        ), i
    with aligned.original_lm() as lm:
        assert torch.equal(swept[3], lm.generate(input_ids=ids, attention_mask=mask, **kwargs))
    assert not torch.equal(swept[0], swept[1])
    with pytest.raises(ValueError, match="per-row alphas"):
        aligned.generate(
            input_ids=ids,
            attention_mask=mask,
            alpha=torch.zeros(3, 4),
            num_return_sequences=2,
            do_sample=True,
            max_new_tokens=2,
            pad_token_id=PAD,
        )


def test_recording_per_dial_statistics(aligned: AlignedLM) -> None:
    """kl_to_base of the combined distribution, ‖W_a h‖ of each IAV dial and s of each CALM dial,
    all as a full forward computes them; recording leaves the logits bit for bit as they are."""
    ids, mask = left_padded_batch([5, 3])
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": PAD,
    }
    for alpha in (ALPHA, torch.stack([ALPHA, torch.zeros(4)])):
        plain = aligned.generate(**kwargs, alpha=alpha)
        with aligned.recording() as recorder:
            out = aligned.generate(**kwargs, alpha=alpha)
        assert torch.equal(torch.stack(out.logits), torch.stack(plain.logits))
        stats = recorder.stacked()
        assert list(stats) == [
            "align_norm/helpful",
            "strength/polite",
            "align_norm/brief",
            "strength/short",
            "kl_to_base",
        ]
        assert all(v.shape == (2, 4) for v in stats.values())
        width = ids.shape[1]
        full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
        base = aligned.base_logits(out.sequences, full_mask)[:, width - 1 : -1]
        torch.testing.assert_close(
            stats["kl_to_base"], exact_kl(torch.stack(out.logits, 1), base), atol=1e-5, rtol=1e-4
        )
        with torch.no_grad():
            hidden = aligned.backbone(input_ids=out.sequences, attention_mask=full_mask).last_hidden_state
            context = token_context(hidden, full_mask)
            for name, head in aligned.heads.items():
                got = head(hidden, frozen_head=aligned.frozen_head, context=context).token_stats()
                key = "align_norm" if isinstance(head, IAVHead) else "strength"
                want = got[key][:, width - 1 : -1]
                torch.testing.assert_close(stats[f"{key}/{name}"], want, atol=1e-4, rtol=1e-5)
    assert (stats["kl_to_base"][0] > 1e-3).all() and (stats["kl_to_base"][1] == 0).all()


# --------------------------------------------------------------------------- merge and the sweep


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merged_iav_dials_equal_the_unmerged_dials(tied: bool) -> None:
    model = tiny_llama(tied=tied)
    heads = {"helpful": iav_dial(model, 1), "brief": iav_dial(model, 3), "safe": iav_dial(model, 5)}
    alpha = {"helpful": 1.0, "brief": 0.5, "safe": -1.25}
    ids, mask = left_padded_batch([7, 3, 5], seed=2)
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 10,
        "do_sample": False,
        "pad_token_id": PAD,
    }
    aligned = AlignedLM(model, heads, alpha=alpha)
    expected = full_logits(aligned, ids, mask, alpha)
    tokens = aligned.generate(**kwargs)
    base = aligned.base_logits(ids, mask)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    aligned.remove()
    merged = merge_iav_dials(model, heads, alpha)
    assert merged is model and merged.config.tie_word_embeddings is False
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
    assert (got - expected).abs().max() <= TOL
    assert (expected - base).abs().max() > 0.5
    assert torch.equal(merged.generate(**kwargs), tokens)


def test_merge_refuses_calm_and_trained_base_dials() -> None:
    model = tiny_llama(tied=False)
    with pytest.raises(ValueError, match="only IAV dials merge"):
        merge_iav_dials(model, {"calm": CALMHead.from_base_model(model, rank=4)}, {"calm": 1.0})
    with pytest.raises(ValueError, match="trained base head"):
        merge_iav_dials(model, {"x": randomise(IAVHead.from_base_model(model))}, {"x": 1.0})
    with pytest.raises(ValueError, match=r"unknown dial\(s\) \['y'\]"):
        merge_iav_dials(model, {"x": iav_dial(model, 1)}, {"y": 1.0})
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


SETTINGS = {
    "max_new_tokens": 10,
    "do_sample": True,
    "temperature": 0.8,
    "top_p": 0.9,
    "eos_token_id": [62, 5],  # frequent words: rows finish at different steps and get padded
    "pad_token_id": PAD,
}


def same_row(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tokens, the longer row (a batch that ran longer) padded past the shorter's end."""
    n = min(len(a), len(b))
    longer = a if len(a) > n else b
    return torch.equal(a[:n], b[:n]) and bool((longer[n:] == PAD).all())


def test_dial_head_decoder_rows_follow_their_own_alpha_and_seed() -> None:
    """α = 0 rows give the base's seeded samples; a row's output does not depend on the other rows'
    α; the recorded KL is 0 exactly where α is 0; done() removes the dials."""
    model = tiny_llama(tied=False)
    ids, mask = left_padded_batch([4, 6, 2, 5], seed=5)
    seeds = [11, 12, 13, 14]
    with torch.no_grad(), plain_generation_config(model):
        base = model.generate(ids, attention_mask=mask, **seeded_decoding(SETTINGS, seeds))
    decode, done = dial_head_decoder(model, dials(model), SETTINGS)
    alphas = torch.stack([torch.zeros(4), 2 * ALPHA, torch.zeros(4), -2 * ALPHA])
    with torch.no_grad():
        out, recorded = decode(ids, mask, alphas, seeds)
        others = alphas.clone()
        others[1], others[3] = -2 * ALPHA, torch.zeros(4)  # change the other rows' α only
        out_other, _ = decode(ids, mask, others, seeds)
    assert same_row(out[0], base[0]) and same_row(out[2], base[2])
    assert not same_row(out[1], base[1])  # teeth: the dials steer
    assert torch.equal(out_other[0], out[0]) and torch.equal(out_other[2], out[2])
    assert same_row(out_other[3], base[3])
    assert (recorded["kl_to_base"][[0, 2]] == 0).all() and (recorded["kl_to_base"][1] > 0).any()
    assert set(recorded) == {
        "kl_to_base",
        "align_norm/helpful",
        "strength/polite",
        "align_norm/brief",
        "strength/short",
    }
    with pytest.raises(ValueError, match=r"alphas must be \(B, K\) = \(4, 4\)"):
        decode(ids, mask, torch.zeros(4), seeds)
    done()
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
