"""Sampling with one seed per row: the same (prompt, sample) draws the same random numbers
whatever batch it is decoded in, whatever α its row carries and whoever decodes it.

transformers' `generate()` samples every row from torch's one global RNG stream, so a row's
draws depend on its position in the batch and on the other rows. Here sampling is done by the
Gumbel-max trick instead: for scores ``s`` (the log-probabilities up to a constant, after
temperature and top-p), ``argmax(s + G)`` with ``G = −log(−log U)``, ``U ~ Uniform(0, 1)``
per token, is a draw from ``softmax(s)`` — the same distribution `do_sample=True` draws from.
Each row owns a ``torch.Generator`` seeded from its own seed and draws one uniform per
vocabulary entry per step, so its noise sequence is fixed by its seed alone. Decoding then runs
*greedily* over the noisy scores (`do_sample=False`), which every decoder supports: transformers'
`generate()` (KV cache, left padding, streaming) and the two-model loop of `models.guided`.

This gives common random numbers per row: at α = 0 and with any head whose Δ is zero the rows
reproduce the base model's samples exactly, and a batch that mixes several α of one prompt
compares them on the same draws.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["RowSeededSampler", "row_seed", "seeded_decoding", "seeded_generate_kwargs", "warpers"]


def row_seed(seed: int, *parts: Any) -> int:
    """A 60-bit seed from a base seed and any JSON-able parts (a prompt's text, a sample index, a
    chat turn): the same inputs give the same seed in every process."""
    blob = json.dumps([int(seed), *parts], sort_keys=True, ensure_ascii=False, default=str)
    return int(hashlib.sha256(blob.encode("utf-8")).hexdigest()[:15], 16)


def warpers(temperature: float, top_p: float) -> list[Any]:
    """transformers' own temperature and top-p processors for these settings (none at 1, 1)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    out: list[Any] = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


class RowSeededSampler:
    """A logits processor ``(input_ids (B, T), scores (B, V)) -> (B, V)`` that warps the scores
    (temperature, top-p) and adds per-row Gumbel noise; greedy decoding over its output samples.

    `seeds`: one per row, in batch order (B = len(seeds)); a batch of another size is refused,
    since rows and seeds would no longer match (beam search, several return sequences).
    The generators live on the scores' device and are created at the first step.
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0, top_p: float = 1.0) -> None:
        if not seeds:
            raise ValueError("RowSeededSampler needs one seed per row, got none")
        self.seeds = [int(s) for s in seeds]
        self.warpers = warpers(temperature, top_p)
        self._generators: list[torch.Generator] | None = None

    def noise(self, vocab: int, device: torch.device) -> Tensor:
        """``(B, V)`` float32 Gumbel noise, each row from its own generator (one step's worth)."""
        if self._generators is None:
            self._generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, device=device, dtype=torch.float32) for g in self._generators]
        )
        # U = 0 gives −inf (never chosen); rand never returns 1.
        return -torch.log(-torch.log(uniform))

    def select_rows(self, index: Tensor) -> None:
        """Keep the rows ``index`` (ascending positions in the current batch) and their generators,
        each where its stream stands: a decoder whose finished rows leave the batch calls this."""
        picked = [int(i) for i in index.tolist()]
        self.seeds = [self.seeds[i] for i in picked]
        if self._generators is not None:
            self._generators = [self._generators[i] for i in picked]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(
                f"{scores.shape[0]} rows for {len(self.seeds)} row seeds: per-row seeding needs one "
                "row per seed (no beam search, num_return_sequences = 1)"
            )
        scores = scores.float()
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        return scores + self.noise(scores.shape[-1], scores.device)


def seeded_generate_kwargs(
    seeds: Sequence[int], *, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0
) -> dict[str, Any]:
    """Keywords for transformers' `generate()`: greedy decoding, plus (when sampling) a
    `RowSeededSampler` for these row seeds, so each row samples from its own seed. Pass no
    `temperature`/`top_p`/`do_sample` of your own next to them."""
    from transformers import LogitsProcessorList

    if not do_sample:
        return {"do_sample": False}
    return {
        "do_sample": False,
        "logits_processor": LogitsProcessorList([RowSeededSampler(seeds, temperature, top_p)]),
    }


def seeded_decoding(decoding: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """Keywords for a decoder (transformers' `generate()` or `models.guided.guided_decode`) from
    the sweep's decoding settings (max_new_tokens, do_sample, temperature, top_p, eos_token_id,
    pad_token_id), each row sampling from its own seed (`seeded_generate_kwargs`)."""
    fixed = {k: decoding[k] for k in ("max_new_tokens", "eos_token_id", "pad_token_id")}
    sampling = seeded_generate_kwargs(
        seeds, do_sample=decoding["do_sample"], temperature=decoding["temperature"], top_p=decoding["top_p"]
    )
    return fixed | sampling
