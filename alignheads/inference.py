"""Python API for generating with a trained method: load it onto its base, generate at any α,
compare with the plain base model, and summarise what it did.

::

    from alignheads.inference import load_for_generation, load_trained, generate, compare_with_base
    aligned, tok = load_for_generation("store/train/<key>/head")    # a head (IAV, CALM)
    lm, tok = load_trained("store/train/<key>")                      # any method, GenARM and DPO + DeRa too
    generate(aligned, tok, ["What colour is a banana?"], alpha=1.5, max_new_tokens=32)
    compare_with_base(lm, tok, ["Name three fruits."], alpha=1.0, do_sample=True, seed=0)
    analyze_modulation_patterns(aligned, tok, ["What is 3 plus 4?"], alpha=1.0)
    dials, tok = load_dials("store")                                 # the store's newest dial set
    generate(dials, tok, ["Name three fruits."], alpha={"helpful": 1.0, "concise": 0.5})

Every function takes either kind of loaded method: an `AlignedLM` (a head installed as the LM's
output layer, or several dials read from one hidden state: one forward per token) or a
`TwoModelLM` (a fine-tuned copy of the LM decoded next to the base through its registry decoder:
two forwards per token). With dials, α is a mapping ``{dial: α}`` (or one α per dial in
``aligned.dial_names`` order).

Prompts are passed to the model as given; :func:`format_prompt` wraps plain text in the
tokenizer's chat template (the command line does this unless ``--raw``). For a head, any Hugging
Face ``generate`` option (``do_sample``, ``temperature``, ``top_p``, ``num_beams``,
``streamer``, ...) passes through; a two-model method takes ``max_new_tokens``, ``do_sample``,
``temperature`` and ``top_p``. Generation stops at EOS (the tokenizer's plus the model's
generation config's); responses are the new tokens only, decoded without special tokens.

Seeds. With ``seed``, each prompt samples from its own random numbers, seeded from (``seed``, the
prompt's text, ``index``) (:func:`prompt_seeds`, the sweep's own rule: index = sample, or the chat
turn), so different prompts get different draws and a prompt gets the same draws in any batch,
at any α, for the base model and for every method: differences between them come from the
method and α, not from sampling noise. ``seeds`` gives one seed per prompt instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from alignheads.models import AlignedLM, load_aligned, read_head_file
from alignheads.models.modstats import alignment_norm_stats, strength_stats

__all__ = [
    "TwoModelLM",
    "analyze_modulation_patterns",
    "compare_with_base",
    "format_prompt",
    "generate",
    "generate_base",
    "generate_with_steering_info",
    "head_info",
    "alpha_value",
    "load_dials",
    "load_for_generation",
    "load_trained",
    "prompt_seeds",
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
    model, tokenizer = _recorded_base(heads_dir, base, device, dtype, trust_remote_code)
    aligned = load_aligned(heads_dir, model, ignore_base_id=ignore_base_id)
    return aligned, tokenizer


def _recorded_base(heads_dir: str | Path, base: str | None, device: str, dtype: str, trust_remote_code: bool):
    """(model on `device`, left-padding tokenizer) of `base`, default the base model the head in
    `heads_dir` records (at its recorded revision)."""
    from alignheads.loading import load_causal_lm, load_tokenizer

    record = read_head_file(heads_dir)
    name = base if base is not None else record.base_model.name_or_path
    if not name:
        raise ValueError(f"{heads_dir}: the head records no base model; pass base=...")
    revision = record.base_model.revision if base is None else None
    model = load_causal_lm(name, revision, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    return model, _left_padding(load_tokenizer(name, revision, trust_remote_code=trust_remote_code))


class TwoModelLM:
    """A fine-tuned-LM method of the registry (GenARM, DPO + DeRa) loaded for generation: the
    base LM and its tuned copy side by side, decoded at α through the method's own decoder
    (`Method.decoder`: two KV caches, the logits combined every step, per-token KL to the base
    recorded). ``model`` is the base LM; ``alpha`` the dial used when a call gives none."""

    def __init__(self, method: Any, loaded: Any, alpha: float = 1.0) -> None:
        self.method, self.loaded, self.alpha = method, loaded, alpha

    @property
    def model(self) -> Any:
        return self.loaded.base

    @property
    def head_type(self) -> str:
        return self.method.name

    @contextmanager
    def use_alpha(self, alpha: float | Sequence[float] | None) -> Iterator[TwoModelLM]:
        previous = self.alpha
        if alpha is not None:
            self.alpha = alpha
        try:
            yield self
        finally:
            self.alpha = previous


DIALS = "dials"  # what method_name calls several dials on one LM


def method_name(lm: AlignedLM | TwoModelLM) -> str:
    """The registry name of a loaded method (`iav`, `calm`, `genarm`, `dpo-dera`), or `dials`."""
    if isinstance(lm, TwoModelLM):
        return lm.head_type
    return DIALS if lm.dial_names else lm.head.head_type


def load_dials(
    path: str | Path,
    base: str | None = None,
    device: str = "cpu",
    *,
    dtype: str = "float32",
    ignore_base_id: bool = False,
    trust_remote_code: bool = False,
) -> tuple[AlignedLM, Any]:
    """Load a dial set onto its base model: every dial's head on one LM, read from one hidden
    state (`z = z_base + Σ_i α_i Δ_i(h)`); returns ``(aligned, tokenizer)`` with every α at 0.

    ``path``: a dial-set artifact (``<store>/dials/<key>``) or a store (its newest dial set).
    Give α per call as a mapping, ``generate(aligned, tok, prompts, alpha={"helpful": 1.0,
    "concise": 0.5})`` (missing dials at 0, unknown ones refused). ``base`` defaults to the model
    the first dial's head records.
    """
    from alignheads.models.head_io import load_head
    from alignheads.tasks.dial_set import find_dial_set, read_dial_set

    rows = read_dial_set(find_dial_set(path))
    heads_dirs = {r["name"]: Path(r["train_path"]) / "head" for r in rows}
    model, tokenizer = _recorded_base(next(iter(heads_dirs.values())), base, device, dtype, trust_remote_code)
    heads = {n: load_head(d, model, ignore_base_id=ignore_base_id).eval() for n, d in heads_dirs.items()}
    return AlignedLM(model, heads, alpha=0.0), tokenizer


def alpha_value(aligned: AlignedLM | TwoModelLM, alpha: Any) -> Any:
    """``alpha`` as results report it: a float, or for dials ``{dial: α}`` over every dial."""
    if isinstance(aligned, AlignedLM) and aligned.dial_names:
        from alignheads.models.dials import dial_alpha

        vector = dial_alpha(alpha, aligned.dial_names)
        if vector.dim() != 1:
            raise ValueError("give the dials one α vector here (a mapping or K numbers), not one per row")
        return dict(zip(aligned.dial_names, (float(a) for a in vector), strict=True))
    return float(alpha)


def load_trained(
    path: str | Path,
    base: str | None = None,
    device: str = "cpu",
    *,
    dtype: str = "float32",
    ignore_base_id: bool = False,
    trust_remote_code: bool = False,
) -> tuple[AlignedLM | TwoModelLM, Any]:
    """Load any trained method for generation; returns ``(lm, tokenizer)``.

    ``path``: a train artifact (``<store>/train/<key>``), the directory in it that holds the
    result (``head/`` or ``model/``), or any head directory. A head gives an `AlignedLM` (as
    :func:`load_for_generation`); GenARM and DPO + DeRa give a `TwoModelLM`, whose base (Hub id or
    directory) defaults to the model the artifact was trained on (from the store's manifests).
    """
    from alignheads.models.head_io import CONFIG_FILE
    from alignheads.models.methods import method
    from alignheads.storage.manifest import MANIFEST, read_manifest

    path = Path(path)
    options = {"dtype": dtype, "ignore_base_id": ignore_base_id, "trust_remote_code": trust_remote_code}
    if (path / CONFIG_FILE).is_file():
        return load_for_generation(path, base, device, **options)
    artifact = path if (path / MANIFEST).is_file() else path.parent
    if not (artifact / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{path}: neither a head directory ({CONFIG_FILE}) nor a train artifact (<store>/train/<key>)"
        )
    entry = method(read_manifest(artifact, "train").info["kind"])
    saved = artifact / entry.saved_as
    if entry.saved_as == "head":
        return load_for_generation(saved, base, device, **options)
    from alignheads.loading import load_causal_lm, load_tokenizer
    from alignheads.tasks.train import trained_base

    name, revision = (base, None) if base is not None else trained_base(artifact)
    model = load_causal_lm(name, revision, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    tokenizer = _left_padding(load_tokenizer(name, revision, trust_remote_code=trust_remote_code))
    loaded = entry.load(saved, model, {"dtype": dtype, "trust_remote_code": trust_remote_code})
    return TwoModelLM(entry, loaded), tokenizer


def _left_padding(tokenizer: Any) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def head_info(aligned: AlignedLM | TwoModelLM) -> dict[str, Any]:
    """Method, sizes and current α of a loaded method (for ``info`` displays)."""
    if isinstance(aligned, TwoModelLM):
        base = aligned.model
        return {
            "head_type": aligned.head_type,
            "method": aligned.head_type,
            "vocab_size": base.get_output_embeddings().weight.shape[0],
            "hidden_size": base.config.get_text_config().hidden_size,
            "alpha": aligned.alpha,
            "base_model": getattr(base.config, "_name_or_path", None),
            "lm_forwards_per_token": aligned.method.lm_forwards_per_token,
            "tuned_parameters": sum(p.numel() for p in aligned.loaded.tuned.parameters()),
        }
    if aligned.dial_names:
        heads = aligned.heads
        first = next(iter(heads.values())).config
        return {
            "head_type": DIALS,
            "method": DIALS,
            "dials": {name: head.head_type for name, head in heads.items()},
            "vocab_size": first.vocab_size,
            "hidden_size": first.hidden_size,
            "alpha": alpha_value(aligned, aligned.alpha),
            "base_model": getattr(aligned.model.config, "_name_or_path", None),
            "head_parameters": sum(p.numel() for h in heads.values() for p in h.parameters()),
            "lm_forwards_per_token": 1,
        }
    cfg = aligned.head.config
    return {
        "head_type": aligned.head.head_type,
        "method": aligned.head.head_type,
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


def prompt_seeds(seed: int, prompts: Sequence[str], index: int = 0) -> list[int]:
    """One seed per prompt from (``seed``, the prompt's text, ``index``): the sweep's rule
    (`models.row_sampling.row_seed`, index = the sample; the chat loop passes its turn), so a
    prompt's draws depend on nothing else (not its batch, not the method, not α)."""
    from alignheads.models.row_sampling import row_seed

    return [row_seed(seed, text, index) for text in prompts]


def _seeds(prompts: Sequence[str], seed: int | None, seeds: Sequence[int] | None) -> list[int] | None:
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        return [int(s) for s in seeds]
    return None if seed is None else prompt_seeds(seed, prompts)


def _seeded(model: Any, kwargs: dict[str, Any], seeds: list[int] | None) -> dict[str, Any]:
    """Hugging Face `generate` keywords that sample each row from its own seed
    (`models.row_sampling`: greedy decoding over per-row Gumbel noise, after top-k, temperature
    and top-p; unset ones come from the model's generation config, as `generate` takes them).
    Unchanged without seeds, or when decoding greedily."""
    gen = getattr(model, "generation_config", None)
    if seeds is None or not kwargs.get("do_sample", getattr(gen, "do_sample", False)):
        return kwargs
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TopKLogitsWarper

    from alignheads.models.row_sampling import seeded_generate_kwargs

    rest = dict(kwargs)
    rest.pop("do_sample", None)
    temperature = rest.pop("temperature", None) or getattr(gen, "temperature", None) or 1.0
    top_p = rest.pop("top_p", None) or getattr(gen, "top_p", None) or 1.0
    top_k = rest.pop("top_k", getattr(gen, "top_k", None))
    processors = LogitsProcessorList(rest.pop("logits_processor", None) or [])
    if top_k:
        processors.append(TopKLogitsWarper(int(top_k)))
    sampled = seeded_generate_kwargs(seeds, do_sample=True, temperature=temperature, top_p=top_p)
    processors.extend(sampled["logits_processor"])
    return rest | {"do_sample": False, "logits_processor": processors}


def _encoded(tokenizer: Any, model: Any, prompts: list[str]):
    """(left-padded input ids, mask, stop ids, pad id) of prompts for `model`."""
    from alignheads.tasks.sampling import encode_prompts, eos_ids, left_pad

    stops = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    input_ids, mask = left_pad(encode_prompts(tokenizer, prompts, None), pad_id, device)
    return input_ids, mask, stops, pad_id


def _new_tokens(
    model: Any, tokenizer: Any, prompts: Sequence[str], seeds: list[int] | None, kwargs: dict[str, Any]
) -> list[list[int]]:
    """Generated token ids per prompt (up to and including the first EOS), through `generate`."""
    from alignheads.models.kv_cache import with_prefix_cache
    from alignheads.tasks.sampling import until_eos

    if not prompts:
        return []
    input_ids, mask, stops, pad_id = _encoded(tokenizer, model, list(prompts))
    settings: dict[str, Any] = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
    }
    settings |= _seeded(model, kwargs, seeds)
    with torch.inference_mode():  # the in-place KV cache unless the caller chose one
        out = model.generate(input_ids, attention_mask=mask, **with_prefix_cache(model, settings))
    stop = settings["eos_token_id"]
    stop = {int(stop)} if isinstance(stop, int) else {int(i) for i in stop}
    return [until_eos(ids, stop)[0] for ids in out[:, input_ids.shape[1] :].cpu().tolist()]


# what a two-model method's decoder takes (guided decoding has no beams, streamers, top-k, ...)
_TWO_MODEL_OPTIONS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k"}


def _two_model_tokens(
    lm: TwoModelLM, tokenizer: Any, prompts: list[str], seeds: list[int] | None, kwargs: dict[str, Any]
) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """Token ids per prompt and the recorded ``{"kl_to_base": (B, N)}`` of a two-model method at
    its α, through the registry's decoder (each row from its own seed)."""
    from alignheads.tasks.sampling import until_eos

    unknown = set(kwargs) - _TWO_MODEL_OPTIONS
    if unknown or kwargs.get("top_k"):
        raise TypeError(
            f"{lm.head_type} decodes with max_new_tokens, do_sample, temperature and top_p only "
            f"(got {sorted(unknown) or ['top_k']})"
        )
    if not prompts:
        return [], {}
    input_ids, mask, stops, pad_id = _encoded(tokenizer, lm.model, prompts)
    settings = {
        "max_new_tokens": kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        "do_sample": bool(kwargs.get("do_sample", False)),
        "temperature": kwargs.get("temperature") or 1.0,
        "top_p": kwargs.get("top_p") or 1.0,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
    }
    if seeds is None:  # unseeded: fresh seeds from torch's global generator
        seeds = torch.randint(0, 2**60, (len(prompts),)).tolist()
    alpha = lm.alpha
    alphas = torch.tensor(
        [float(a) for a in alpha] if isinstance(alpha, Sequence) else [float(alpha)] * len(prompts),
        dtype=torch.float32,
        device=input_ids.device,
    )
    decode, done = lm.method.decoder(lm.loaded, settings)
    try:
        with torch.inference_mode():
            out, recorded = decode(input_ids, mask, alphas, seeds)
    finally:
        done()
    rows = [until_eos(ids, set(stops))[0] for ids in out[:, input_ids.shape[1] :].cpu().tolist()]
    return rows, recorded


def _decode(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def generate(
    aligned: AlignedLM | TwoModelLM,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float | Sequence[float] | Mapping[str, float],
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    **hf_generate_kwargs: Any,
) -> list[str]:
    """Responses of the method at ``alpha`` to ``prompts`` (one batch, left padded).

    ``alpha`` is one dial for the whole batch, or one per prompt (a sequence as long as
    ``prompts``): an α grid over the same prompt is then decoded in one batched call. With dials
    (:func:`load_dials`) it is ``{dial: α}`` (missing dials at 0), K numbers in
    ``aligned.dial_names`` order, or one such row per prompt ``(B, K)``.

    ``hf_generate_kwargs`` go to ``transformers`` ``generate`` (default ``max_new_tokens`` 64,
    EOS and pad ids from the tokenizer). ``seed``: each prompt samples from its own seed
    (:func:`prompt_seeds`); ``seeds``: one seed per prompt, given (module docstring).
    """
    prompts = list(prompts)
    row_seeds = _seeds(prompts, seed, seeds)
    with aligned.use_alpha(alpha):
        if isinstance(aligned, TwoModelLM):
            rows, _ = _two_model_tokens(aligned, tokenizer, prompts, row_seeds, hf_generate_kwargs)
        else:
            rows = _new_tokens(aligned.model, tokenizer, prompts, row_seeds, hf_generate_kwargs)
    return _decode(tokenizer, rows)


def generate_base(
    aligned: AlignedLM | TwoModelLM,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    **kwargs: Any,
) -> list[str]:
    """Responses of the plain base model (its own output layer, no head; for a two-model method
    the base LM alone) to ``prompts``; with the same seeds, the draws of :func:`generate`."""
    prompts = list(prompts)
    row_seeds = _seeds(prompts, seed, seeds)
    if isinstance(aligned, TwoModelLM):
        rows = _new_tokens(aligned.model, tokenizer, prompts, row_seeds, kwargs)
    else:
        with aligned.original_lm() as lm:
            rows = _new_tokens(lm, tokenizer, prompts, row_seeds, kwargs)
    return _decode(tokenizer, rows)


def compare_with_base(
    aligned: AlignedLM | TwoModelLM,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float,
    seed: int = 0,
    *,
    seeds: Sequence[int] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """``[{"prompt", "alpha", "base", "aligned"}]``: the plain base model and the method at
    ``alpha``, each prompt seeded alike for both (from ``seed``, or ``seeds``) so that
    differences come from the method and α, not from sampling noise (a CALM head at α = 0
    reproduces the base exactly)."""
    prompts = list(prompts)
    row_seeds = _seeds(prompts, seed, seeds)
    base = generate_base(aligned, tokenizer, prompts, seeds=row_seeds, **kwargs)
    steered = generate(aligned, tokenizer, prompts, alpha, seeds=row_seeds, **kwargs)
    reported = alpha_value(aligned, alpha)
    return [
        {"prompt": p, "alpha": reported, "base": b, "aligned": a}
        for p, b, a in zip(prompts, base, steered, strict=True)
    ]


def _nan_to_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _recorded_generation(
    aligned: AlignedLM | TwoModelLM,
    tokenizer: Any,
    prompts: list[str],
    alpha: float,
    seeds: list[int] | None,
    kwargs: dict,
) -> tuple[list[list[int]], dict[str, torch.Tensor], torch.Tensor]:
    """Generate at ``alpha`` while recording what the method did: token ids per prompt, the
    recorded ``{name: (B, n_steps)}`` statistics (the per-token KL to the base; a head's own
    statistics), and the ``(B, n_steps)`` mask of real generated tokens."""
    if isinstance(aligned, TwoModelLM):
        with aligned.use_alpha(alpha):
            rows, recorded = _two_model_tokens(aligned, tokenizer, prompts, seeds, kwargs)
    else:
        with aligned.use_alpha(alpha), aligned.recording() as recorder:
            rows = _new_tokens(aligned.model, tokenizer, prompts, seeds, kwargs)
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
    for key, values in recorded.items():  # dials: `strength/<dial>`, `align_norm/<dial>`
        kind, _, dial = key.partition("/")
        if kind == "strength" and dial:
            s = strength_stats(values, mask)
            out |= {f"strength_mean/{dial}": s.mean, f"utilisation/{dial}": s.utilisation}
        elif kind == "align_norm" and dial:
            out[f"align_norm_mean/{dial}"] = alignment_norm_stats(values.unsqueeze(-1), mask).mean
    return _nan_to_none(out)


def analyze_modulation_patterns(
    aligned: AlignedLM | TwoModelLM,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float = 1.0,
    *,
    seed: int | None = 0,
    seeds: Sequence[int] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """What the method did while generating responses to ``prompts`` at ``alpha``.

    Counts the generated tokens up to each response's EOS. Always: ``head_type``, ``alpha``,
    ``n_prompts``, ``n_tokens``, ``kl_mean`` (mean per-token KL(π_α ‖ π_base)), ``responses``.
    CALM: ``strength_mean``, ``utilisation`` (share of tokens with s > 0.5),
    ``high_intensity`` (share with s > 2.0), ``strength_min``, ``strength_max``
    (see :func:`alignheads.models.modstats.strength_stats`). IAV: ``align_norm_mean``,
    ``align_norm_std``, ``align_norm_min``, ``align_norm_max`` of ``‖W_a h_t‖₂``. GenARM and
    DPO + DeRa: the KL only. Statistics are None where no token was generated. Use greedy decoding or sampling
    (beam search reorders rows between steps).
    """
    prompts = list(prompts)
    row_seeds = _seeds(prompts, seed, seeds)
    rows, recorded, mask = _recorded_generation(aligned, tokenizer, prompts, alpha, row_seeds, kwargs)
    out: dict[str, Any] = {
        "head_type": method_name(aligned),
        "alpha": alpha_value(aligned, alpha),
        "n_prompts": len(prompts),
    }
    out |= _steering_stats(recorded, mask)
    out["responses"] = _decode(tokenizer, rows)
    return out


def generate_with_steering_info(
    aligned: AlignedLM | TwoModelLM,
    tokenizer: Any,
    prompts: Sequence[str],
    alpha: float,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    **hf_generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`generate`, with what the method did for each prompt: ``[{"response", "steering"}]``.

    ``steering`` holds the statistics of :func:`analyze_modulation_patterns` over that
    response's own tokens. With the same ``seed`` the responses are exactly :func:`generate`'s
    (recording reads the logits; it does not change them).
    """
    prompts = list(prompts)
    rows, recorded, mask = _recorded_generation(
        aligned, tokenizer, prompts, alpha, _seeds(prompts, seed, seeds), hf_generate_kwargs
    )
    responses = _decode(tokenizer, rows)
    return [
        {
            "response": response,
            "steering": _steering_stats({k: v[i : i + 1] for k, v in recorded.items()}, mask[i : i + 1]),
        }
        for i, response in enumerate(responses)
    ]
