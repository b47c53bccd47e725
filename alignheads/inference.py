"""Python API for generating with a trained head: load it onto its base, generate at any α,
compare with the plain base model, and summarise what the head did.

::

    from alignheads.inference import load_for_generation, generate, compare_with_base
    aligned, tok = load_for_generation("store/train/<key>/head")
    generate(aligned, tok, ["What is 3 + 4?"], alpha=1.5, max_new_tokens=32)
    compare_with_base(aligned, tok, ["What is 3 + 4?"], alpha=1.0, do_sample=True, seed=0)
    analyze_modulation_patterns(aligned, tok, ["What is 3 + 4?"], alpha=1.0)

Prompts are passed to the model as given; :func:`format_prompt` wraps plain text in the
tokenizer's chat template (the command line does this unless ``--raw``). Any Hugging Face
``generate`` option (``do_sample``, ``temperature``, ``top_p``, ``num_beams``, ``streamer``,
...) passes through. Generation stops at EOS (the tokenizer's plus the model's generation
config's); responses are the new tokens only, decoded without special tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from alignheads.models import AlignedLM, load_aligned, read_head_file
from alignheads.models.modstats import alignment_norm_stats, strength_stats

__all__ = [
    "analyze_modulation_patterns",
    "compare_with_base",
    "format_prompt",
    "generate",
    "generate_base",
    "generate_with_steering_info",
    "head_info",
    "load_for_generation",
]

DEFAULT_MAX_NEW_TOKENS = 64


def load_for_generation(
    heads_dir: str | Path,
    base: str | None = None,
    device: str = "cpu",
    *,
    dtype: str = "float32",
    ignore_base_id: bool = False,
    trust_remote_code: bool = False,
) -> tuple[AlignedLM, Any]:
    """Load the head in ``heads_dir`` onto its base model; returns ``(aligned, tokenizer)``.

    ``base`` (Hub id or directory) defaults to the model recorded in the head's
    ``head_config.json``. The tokenizer pads on the left (batched generation) and gets the EOS
    token as its pad token when it has none. Raises ``HeadMismatchError`` when the base does
    not fit the head (pass ``ignore_base_id=True`` for the same model in another place).
    """
    from alignheads.loading import load_causal_lm, load_tokenizer

    record = read_head_file(heads_dir)
    name = base if base is not None else record.base_model.name_or_path
    if not name:
        raise ValueError(f"{heads_dir}: the head records no base model; pass base=...")
    revision = record.base_model.revision if base is None else None
    model = load_causal_lm(name, revision, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    tokenizer = load_tokenizer(name, revision, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    aligned = load_aligned(heads_dir, model, ignore_base_id=ignore_base_id)
    return aligned, tokenizer


def head_info(aligned: AlignedLM) -> dict[str, Any]:
    """Head type, sizes and current α of an aligned model (for ``info`` displays)."""
    cfg = aligned.head.config
    return {
        "head_type": aligned.head.head_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "alpha": aligned.alpha,
        "base_model": getattr(aligned.model.config, "_name_or_path", None),
        "head_parameters": sum(p.numel() for p in aligned.head.parameters()),
    }


def format_prompt(tokenizer: Any, text: str, *, raw: bool = False) -> str:
    """``text`` as a user turn of the tokenizer's chat template (with the generation prompt).

    Returned unchanged when ``raw``, when the tokenizer has no chat template, or when the text
    already ends with the template's generation prompt (an already formatted prompt, e.g. the
    tiny world's ``"\\n\\nHuman: ...\\n\\nAssistant:"``).
    """
    if raw or not getattr(tokenizer, "chat_template", None):
        return text
    render = tokenizer.apply_chat_template
    opening = render([{"role": "user", "content": "x"}], add_generation_prompt=False, tokenize=False)
    full = render([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    suffix = full[len(opening) :].strip() if full.startswith(opening) else ""
    if suffix and text.rstrip().endswith(suffix):
        return text
    return render([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


# --- generation ---------------------------------------------------------------------------------


def _new_tokens(
    model: Any, tokenizer: Any, prompts: Sequence[str], seed: int | None, kwargs: dict[str, Any]
) -> list[list[int]]:
    """Generated token ids per prompt (up to and including the first EOS)."""
    from alignheads.tasks.sampling import encode_prompts, eos_ids, left_pad, until_eos

    if not prompts:
        return []
    stops = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    input_ids, mask = left_pad(
        encode_prompts(tokenizer, list(prompts), None), pad_id, next(model.parameters()).device
    )
    settings: dict[str, Any] = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
    }
    settings |= kwargs
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=mask, **settings)
    stop = settings["eos_token_id"]
    stop = {int(stop)} if isinstance(stop, int) else {int(i) for i in stop}
    return [until_eos(ids, stop)[0] for ids in out[:, input_ids.shape[1] :].cpu().tolist()]


def _decode(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def generate(
    aligned: AlignedLM,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float | Sequence[float],
    *,
    seed: int | None = None,
    **hf_generate_kwargs: Any,
) -> list[str]:
    """Responses of the aligned model at ``alpha`` to ``prompts`` (one batch, left padded).

    ``alpha`` is one dial for the whole batch, or one per prompt (a sequence as long as
    ``prompts``): an α grid over the same prompt is then decoded in one batched call.

    ``hf_generate_kwargs`` go to ``transformers`` ``generate`` (default ``max_new_tokens`` 64,
    EOS and pad ids from the tokenizer); ``seed`` seeds torch right before generating.
    """
    with aligned.use_alpha(alpha):
        rows = _new_tokens(aligned.model, tokenizer, list(prompts), seed, hf_generate_kwargs)
    return _decode(tokenizer, rows)


def generate_base(
    aligned: AlignedLM, tokenizer: Any, prompts: Sequence[str], *, seed: int | None = None, **kwargs: Any
) -> list[str]:
    """Responses of the plain base model (its own output layer, no head) to ``prompts``."""
    with aligned.original_lm() as lm:
        rows = _new_tokens(lm, tokenizer, list(prompts), seed, kwargs)
    return _decode(tokenizer, rows)


def compare_with_base(
    aligned: AlignedLM, tokenizer: Any, prompts: Sequence[str], alpha: float, seed: int = 0, **kwargs: Any
) -> list[dict[str, Any]]:
    """``[{"prompt", "alpha", "base", "aligned"}]``: the plain base model and the aligned model at
    ``alpha``, both seeded with ``seed`` so that differences come from the head and α, not from
    sampling noise (a CALM head at α = 0 reproduces the base exactly)."""
    prompts = list(prompts)
    base = generate_base(aligned, tokenizer, prompts, seed=seed, **kwargs)
    steered = generate(aligned, tokenizer, prompts, alpha, seed=seed, **kwargs)
    return [
        {"prompt": p, "alpha": float(alpha), "base": b, "aligned": a}
        for p, b, a in zip(prompts, base, steered, strict=True)
    ]


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _recorded_generation(
    aligned: AlignedLM, tokenizer: Any, prompts: list[str], alpha: float, seed: int | None, kwargs: dict
) -> tuple[list[list[int]], dict[str, torch.Tensor], torch.Tensor]:
    """Generate at ``alpha`` while recording the head: token ids per prompt, the recorded
    ``{name: (B, n_steps)}`` statistics, and the ``(B, n_steps)`` mask of real generated tokens."""
    with aligned.use_alpha(alpha), aligned.recording() as recorder:
        rows = _new_tokens(aligned.model, tokenizer, prompts, seed, kwargs)
    recorded = recorder.stacked()
    steps = next(iter(recorded.values())).shape[1] if recorded else 0
    mask = torch.zeros((len(rows), steps), dtype=torch.bool)
    for i, ids in enumerate(rows):
        mask[i, : len(ids)] = True
    return rows, recorded, mask


def _steering_stats(recorded: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, Any]:
    """Statistics of the recorded ``(B, n_steps)`` values over the tokens ``mask`` selects;
    None where no token was generated."""
    out: dict[str, Any] = {
        "n_tokens": int(mask.sum()),
        "kl_mean": recorded["kl_to_base"][mask].double().mean().item() if mask.any() else math.nan,
    }
    if "strength" in recorded:
        s = strength_stats(recorded["strength"], mask)
        out |= {
            "strength_mean": s.mean,
            "utilisation": s.utilisation,
            "high_intensity": s.high_intensity,
            "strength_min": s.min,
            "strength_max": s.max,
        }
    if "align_norm" in recorded:
        # the recorded values are already norms: as 1-vectors their norm is themselves
        n = alignment_norm_stats(recorded["align_norm"].unsqueeze(-1), mask)
        out |= {
            "align_norm_mean": n.mean,
            "align_norm_std": n.std,
            "align_norm_min": n.min,
            "align_norm_max": n.max,
        }
    return _nan_to_none(out)


def analyze_modulation_patterns(
    aligned: AlignedLM,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float = 1.0,
    *,
    seed: int | None = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """What the head did while generating responses to ``prompts`` at ``alpha``.

    Counts the generated tokens up to each response's EOS. Always: ``head_type``, ``alpha``,
    ``n_prompts``, ``n_tokens``, ``kl_mean`` (mean per-token KL(π_α ‖ π_base)), ``responses``.
    CALM: ``strength_mean``, ``utilisation`` (share of tokens with s > 0.5),
    ``high_intensity`` (share with s > 2.0), ``strength_min``, ``strength_max``
    (see :func:`alignheads.models.modstats.strength_stats`). IAV: ``align_norm_mean``,
    ``align_norm_std``, ``align_norm_min``, ``align_norm_max`` of ``‖W_a h_t‖₂``.
    Statistics are None where no token was generated. Use greedy decoding or sampling
    (beam search reorders rows between steps).
    """
    prompts = list(prompts)
    rows, recorded, mask = _recorded_generation(aligned, tokenizer, prompts, alpha, seed, kwargs)
    out: dict[str, Any] = {
        "head_type": aligned.head.head_type,
        "alpha": float(alpha),
        "n_prompts": len(prompts),
    }
    out |= _steering_stats(recorded, mask)
    out["responses"] = _decode(tokenizer, rows)
    return out


def generate_with_steering_info(
    aligned: AlignedLM,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float,
    *,
    seed: int | None = None,
    **hf_generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`generate`, with what the head did for each prompt: ``[{"response", "steering"}]``.

    ``steering`` holds the statistics of :func:`analyze_modulation_patterns` over that
    response's own tokens. With the same ``seed`` the responses are exactly :func:`generate`'s
    (recording reads the logits; it does not change them).
    """
    rows, recorded, mask = _recorded_generation(
        aligned, tokenizer, list(prompts), alpha, seed, hf_generate_kwargs
    )
    responses = _decode(tokenizer, rows)
    return [
        {
            "response": response,
            "steering": _steering_stats({k: v[i : i + 1] for k, v in recorded.items()}, mask[i : i + 1]),
        }
        for i, response in enumerate(responses)
    ]
