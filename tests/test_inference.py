"""The Python generation API: load a head onto its base, generate at α, compare, analyse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignheads.inference import (
    analyze_modulation_patterns,
    compare_with_base,
    format_prompt,
    generate,
    generate_base,
    generate_with_steering_info,
    head_info,
    load_for_generation,
)
from alignheads.models import BaseModelInfo, save_head
from alignheads.models.modstats import strength_stats
from tests.helpers.tiny_models import make_head, randomise, tiny_llama, tiny_tokenizer

PROMPTS = ["w3 w4 w5", "w10 w11", "w20 w21 w22 w23", "w40"]
GREEDY = {"do_sample": False, "max_new_tokens": 8}
SAMPLED = {"do_sample": True, "top_k": 0, "max_new_tokens": 8}


def make_world(root: Path) -> dict[str, Path]:
    """A tiny Llama + tokenizer saved to `root/model` and randomised IAV and CALM heads for it."""
    model_dir = root / "model"
    model = tiny_llama(tied=False)
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    info = BaseModelInfo.from_model(model, name_or_path=str(model_dir))
    dirs = {"model": model_dir}
    for seed, kind in enumerate(("iav", "calm"), start=1):
        dirs[kind] = save_head(randomise(make_head(kind, model), seed=seed), root / kind, base_model=info)
    return dirs


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("genworld"))


@pytest.fixture(scope="module")
def calm(world):
    return load_for_generation(world["calm"])


@pytest.fixture(scope="module")
def iav(world):
    return load_for_generation(world["iav"])


def test_load_for_generation_uses_the_recorded_base(world, calm):
    aligned, tok = calm
    assert tok.padding_side == "left"
    info = head_info(aligned)
    assert info["head_type"] == "calm"
    assert Path(info["base_model"]).resolve() == world["model"].resolve()
    assert info["vocab_size"] == 100


def test_generate_returns_one_response_per_prompt_and_alpha_matters(iav):
    aligned, tok = iav
    at0 = generate(aligned, tok, PROMPTS, alpha=0.0, **GREEDY)
    at3 = generate(aligned, tok, PROMPTS, alpha=3.0, **GREEDY)
    assert len(at0) == len(at3) == len(PROMPTS)
    assert all(isinstance(r, str) and r for r in at0)
    assert all(not r.startswith(p) for r, p in zip(at0, PROMPTS, strict=True))  # new tokens only
    assert "[PAD]" not in " ".join(at0) and "[EOS]" not in " ".join(at0)  # no special tokens
    assert at0 != at3
    assert aligned.alpha == 1.0  # α restored after the call
    # deterministic: greedy twice, sampled with the same seed twice
    assert generate(aligned, tok, PROMPTS, alpha=3.0, **GREEDY) == at3
    a = generate(aligned, tok, PROMPTS, alpha=1.0, seed=7, **SAMPLED)
    assert generate(aligned, tok, PROMPTS, alpha=1.0, seed=7, **SAMPLED) == a


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_generate_takes_one_alpha_per_prompt_in_one_call(kind, iav, calm):
    """A per-prompt α list decodes like one call per α (greedy), in one batched call."""
    aligned, tok = iav if kind == "iav" else calm
    before = aligned.alpha
    alphas = [0.0, 1.0, 2.5, -1.0]
    together = generate(aligned, tok, PROMPTS, alphas, **GREEDY)
    apart = [generate(aligned, tok, [p], a, **GREEDY)[0] for p, a in zip(PROMPTS, alphas, strict=True)]
    assert together == apart
    grid = generate(aligned, tok, [PROMPTS[0]] * 3, [0.0, 1.0, 2.5], **GREEDY)
    assert grid == [generate(aligned, tok, [PROMPTS[0]], a, **GREEDY)[0] for a in (0.0, 1.0, 2.5)]
    assert len(set(grid)) > 1  # the dial changes the answer
    assert aligned.alpha == before and isinstance(aligned.alpha, float)  # the wrapper's own α is back


def test_generate_stops_at_eos(calm):
    aligned, tok = calm
    full = generate_base(aligned, tok, PROMPTS[:1], max_new_tokens=8, do_sample=False)[0].split()
    assert len(full) == 8
    # make the third generated token an end of sequence: the response stops right after it
    stop = tok.convert_tokens_to_ids(full[2])
    cut = generate_base(aligned, tok, PROMPTS[:1], max_new_tokens=8, do_sample=False, eos_token_id=stop)[0]
    assert cut.split() == full[: full.index(full[2]) + 1]


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_compare_with_base_calm_alpha_zero_is_the_base(calm, settings):
    aligned, tok = calm
    rows = compare_with_base(aligned, tok, PROMPTS, alpha=0.0, seed=3, **settings)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["base"] == r["aligned"] for r in rows)
    steered = compare_with_base(aligned, tok, PROMPTS, alpha=4.0, seed=3, **settings)
    assert [r["base"] for r in steered] == [r["base"] for r in rows]  # same seed: same base
    assert any(r["base"] != r["aligned"] for r in steered)


def test_analyze_modulation_patterns_calm(calm):
    aligned, tok = calm
    stats = analyze_modulation_patterns(aligned, tok, PROMPTS, alpha=1.0, seed=5, **SAMPLED)
    assert stats["head_type"] == "calm" and stats["n_prompts"] == len(PROMPTS)
    assert 0 < stats["n_tokens"] <= len(PROMPTS) * SAMPLED["max_new_tokens"]
    assert 0.0 <= stats["high_intensity"] <= stats["utilisation"] <= 1.0
    assert 0.0 <= stats["strength_min"] <= stats["strength_mean"] <= stats["strength_max"]
    assert stats["kl_mean"] >= 0.0
    assert stats["responses"] == generate(aligned, tok, PROMPTS, alpha=1.0, seed=5, **SAMPLED)

    # the same numbers as strength_stats over the recorded strengths of the counted tokens
    from alignheads.inference import _new_tokens, prompt_seeds

    with aligned.use_alpha(1.0), aligned.recording() as rec:
        rows = _new_tokens(aligned.model, tok, PROMPTS, prompt_seeds(5, PROMPTS), dict(SAMPLED))
    strength = rec.stacked()["strength"]
    mask = torch.zeros_like(strength, dtype=torch.bool)
    for i, ids in enumerate(rows):
        mask[i, : len(ids)] = True
    ref = strength_stats(strength, mask)
    assert stats["n_tokens"] == ref.n_tokens
    for key, value in [
        ("strength_mean", ref.mean),
        ("utilisation", ref.utilisation),
        ("high_intensity", ref.high_intensity),
        ("strength_min", ref.min),
        ("strength_max", ref.max),
    ]:
        assert math.isclose(stats[key], value, rel_tol=1e-9), key


def test_analyze_modulation_patterns_iav(iav):
    aligned, tok = iav
    stats = analyze_modulation_patterns(aligned, tok, PROMPTS, alpha=1.0, **GREEDY)
    assert stats["head_type"] == "iav"
    assert "strength_mean" not in stats
    assert 0.0 < stats["align_norm_min"] <= stats["align_norm_mean"] <= stats["align_norm_max"]
    assert stats["align_norm_std"] >= 0.0
    # the norms are ‖W_a h‖ at the positions that produced the generated tokens
    one = analyze_modulation_patterns(aligned, tok, PROMPTS[:1], alpha=1.0, **GREEDY)
    prompt_ids = tok(PROMPTS[0])["input_ids"]
    ids = torch.tensor([prompt_ids + tok(one["responses"][0])["input_ids"]])
    with torch.no_grad():
        norms = aligned.head_outputs(ids).align_logits[0].double().norm(dim=-1)
    start = len(prompt_ids) - 1
    assert math.isclose(
        norms[start : start + one["n_tokens"]].mean().item(), one["align_norm_mean"], rel_tol=1e-4
    )


@pytest.mark.parametrize("kind", ["calm", "iav"])
def test_generate_with_steering_info_per_prompt(kind, calm, iav):
    aligned, tok = {"calm": calm, "iav": iav}[kind]
    rows = generate_with_steering_info(aligned, tok, PROMPTS, 1.0, seed=5, **SAMPLED)
    # the same responses as plain generation with the same seed
    assert [r["response"] for r in rows] == generate(aligned, tok, PROMPTS, alpha=1.0, seed=5, **SAMPLED)
    # per prompt, the statistics equal the aggregate analysis of that prompt alone
    # (one-row batches: no padding, so the numbers must match exactly up to float error)
    one = generate_with_steering_info(aligned, tok, PROMPTS[:1], 1.0, seed=5, **SAMPLED)[0]["steering"]
    alone = analyze_modulation_patterns(aligned, tok, PROMPTS[:1], alpha=1.0, seed=5, **SAMPLED)
    for key, value in one.items():
        assert math.isclose(value, alone[key], rel_tol=1e-9, abs_tol=1e-12), key
    # token counts add up to the whole batch's count
    batch = analyze_modulation_patterns(aligned, tok, PROMPTS, alpha=1.0, seed=5, **SAMPLED)
    assert sum(r["steering"]["n_tokens"] for r in rows) == batch["n_tokens"]
    stat = "strength_mean" if kind == "calm" else "align_norm_mean"
    assert all(r["steering"][stat] is not None for r in rows if r["steering"]["n_tokens"])


def test_format_prompt_wraps_in_the_chat_template():
    tok = tiny_tokenizer()
    assert format_prompt(tok, "w3 w4") == "w3 w4"  # no template: unchanged
    tok.chat_template = (
        "{%- for m in messages -%}{{- '\\n\\nHuman: ' + m['content'] -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '\\n\\nAssistant:' -}}{%- endif -%}"
    )
    assert format_prompt(tok, "hi there") == "\n\nHuman: hi there\n\nAssistant:"
    assert format_prompt(tok, "hi there", raw=True) == "hi there"
    already = "\n\nHuman: hi there\n\nAssistant:"
    assert format_prompt(tok, already) == already  # already formatted: not wrapped twice
