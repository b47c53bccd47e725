"""One trained method loaded for the stages that sample or score it: calibrate, generate and the
held-out accuracy share one load per method (`tasks.method_sweep`).

Loading is lazy: nothing is read until a stage needs the model, so a run whose artifacts are all
complete loads nothing. :attr:`LoadedMethod.loads` counts the loads (0 or 1), which the pipeline
logs per method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignheads.config import SweepConfig
from alignheads.models.methods import Method, method
from alignheads.tasks.prompts import Prompt
from alignheads.tasks.sampling import decoding_settings, eos_ids, sample_batches

__all__ = ["LoadedMethod", "MethodParts", "Sampler", "resolve_device"]

# sample(prompts, alphas, desc) -> `tasks.sampling.sample_batches` rows: every (α, prompt, sample)
Sampler = Callable[[Sequence[Prompt], Sequence[float], str], list[dict[str, Any]]]


def resolve_device(device: str) -> str:
    """`auto`: CUDA when visible, else the CPU; any other name as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass(frozen=True)
class MethodParts:
    """What one load gives: the registry entry, the base LM on its device, its tokenizer, the pad
    and stop ids, and the method's trained part loaded for that LM (`Method.load`)."""

    entry: Method
    model: Any
    tokenizer: Any
    pad_id: int
    stops: list[int]
    loaded: Any


class LoadedMethod:
    """The method trained at `train_path` (its registry name `head`), loaded on first use and kept
    until :meth:`close` (or the end of a ``with`` block)."""

    def __init__(self, head: str, train_path: str | Path, model_source: dict[str, Any], device: str = "auto"):
        self.head = head
        self.train_path = Path(train_path)
        self.model_source = dict(model_source)
        self.device = device
        self.loads = 0
        self._parts: MethodParts | None = None

    def parts(self) -> MethodParts:
        """The loaded method (loading it the first time)."""
        if self._parts is None:
            from alignheads.tasks.train import load_run_model

            entry = method(self.head)
            model, tokenizer, _ = load_run_model(self.model_source)
            model = model.to(resolve_device(self.device))
            loaded = entry.load(self.train_path / entry.saved_as, model, self.model_source)
            stops = eos_ids(tokenizer, model)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
            self._parts = MethodParts(entry, model, tokenizer, pad_id, stops, loaded)
            self.loads += 1
        return self._parts

    @contextmanager
    def sampler(self, sweep: SweepConfig, progress: bool = True) -> Iterator[Sampler]:
        """``sample(prompts, alphas, desc) -> rows`` with `sweep`'s decoding settings, all α
        batched together with one α per row; the method's decoder is removed from the LM on exit,
        so the same load can be sampled again or scored."""
        p = self.parts()
        decode, done = p.entry.decoder(p.loaded, decoding_settings(sweep, p.stops, p.pad_id))

        def sample(prompts: Sequence[Prompt], alphas: Sequence[float], desc: str) -> list[dict[str, Any]]:
            return sample_batches(decode, p.tokenizer, prompts, alphas, sweep, p.stops, p.pad_id, p.model, progress, desc)

        try:
            yield sample
        finally:
            done()

    def close(self) -> None:
        """Drop the loaded model (a later use loads it again, and counts)."""
        self._parts = None

    def __enter__(self) -> LoadedMethod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
