"""The α-sweep section of a run config (`sweep:`): which α, which prompts, how to decode.

Kept in its own module so that the generation stage can be used (and tested) on its own; the
run config embeds it as `RunConfig.sweep`. Every field carries a description for the Prefect
UI's form.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["SweepConfig"]


class SweepConfig(BaseModel):
    """α-sweep generation: for every trained head and every α, responses to the evaluation prompts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alphas: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0],
        min_length=1,
        description="Values of the dial α to generate at (one cached artifact per head and α)",
    )
    n_prompts: int = Field(
        64, gt=0, description="Use the first N distinct prompts (test split, or the prompts file)"
    )
    prompts_file: str | None = Field(
        None,
        description=(
            "Prompts for real runs instead of the test split: .txt (one prompt per line), "
            ".jsonl (objects with a 'prompt' field) or .json (a list of strings or of such objects)"
        ),
    )
    prompt_set: Literal["hh-rlhf", "alpacaeval", "arena-hard"] | None = Field(
        None,
        description=(
            "A named evaluation prompt set from the Hub instead of the test split: HH-RLHF's test "
            "split, AlpacaEval or Arena-Hard (its first n_prompts distinct prompts)"
        ),
    )
    prompt_set_source: str | None = Field(
        None,
        description="Local file or directory (or another Hub id) of the same shape as the named "
        "prompt set; empty reads the set from the Hub",
    )
    prompt_set_revision: str | None = Field(None, description="Hub revision of the prompt set (pin it)")
    n_samples: int = Field(1, gt=0, description="Responses per prompt (sampling only when > 1)")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false)")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off)")
    max_new_tokens: int = Field(48, gt=0, description="Maximum generated tokens per response (EOS included)")
    max_prompt_length: int | None = Field(
        None,
        gt=0,
        description="Keep only the last N prompt tokens (the first BOS is kept); empty keeps whole prompts",
    )
    seed: int = Field(
        0,
        ge=0,
        description=(
            "Base seed; a batch's seed depends only on it, the sample index and the batch index, "
            "so every head and α sees the same random numbers"
        ),
    )
    batch_size: int = Field(
        32, gt=0, description="Prompts per generate() call (part of the cache key: it fixes the random draws)"
    )

    @field_validator("alphas")
    @classmethod
    def _finite_distinct(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"every α must be a finite number, got {bad}")
        seen: set[float] = set()
        dupes = sorted({v for v in values if v in seen or seen.add(v)})
        if dupes:
            raise ValueError(f"α listed more than once: {dupes}")
        return [float(v) + 0.0 for v in values]  # + 0.0 turns -0.0 into 0.0

    @model_validator(mode="after")
    def _one_prompt_source(self) -> SweepConfig:
        if self.prompt_set is not None and self.prompts_file:
            raise ValueError("give either prompts_file or prompt_set, not both")
        if self.prompt_set is None and (self.prompt_set_source or self.prompt_set_revision):
            raise ValueError("prompt_set_source / prompt_set_revision need a prompt_set")
        return self

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> SweepConfig:
        if self.n_samples > 1 and not self.do_sample:
            raise ValueError(
                f"n_samples is {self.n_samples} but do_sample is false: greedy decoding gives the same "
                "response every time; set do_sample: true or n_samples: 1"
            )
        return self

    def decoding(self) -> dict:
        """The settings the generated text depends on (besides model, head, α and prompts).

        Greedy decoding ignores temperature and top-p, so they are left out then.
        """
        out = {
            "do_sample": self.do_sample,
            "n_samples": self.n_samples,
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_length": self.max_prompt_length,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        if self.do_sample:
            out |= {"temperature": self.temperature, "top_p": self.top_p}
        return out
