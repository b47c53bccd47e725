"""Named evaluation prompt sets for the α-sweep: HH-RLHF's test split, AlpacaEval, Arena-Hard.

Each set is a Hugging Face dataset and a rule that takes the prompt out of a row; the sweep uses
its first N distinct prompts. ``source`` replaces the Hub id with a local file or directory of
the same shape (a mirror, or a test fixture), read by the same code as preference data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignheads.config import SourceConfig
from alignheads.tasks.formats import HH_ASSISTANT
from alignheads.tasks.ingest import DataError, format_location, source_rows

Prompt = tuple[str, str]  # (prompt_id, text)


def _hh_prompt(row: dict[str, Any]) -> str:
    """HH-RLHF: the dialogue in ``chosen`` up to and including its last ``\\n\\nAssistant:``."""
    text = row["chosen"]
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError("field 'chosen' has no '\\n\\nAssistant:' turn")
    return text[: cut + len(HH_ASSISTANT)]


def _alpaca_prompt(row: dict[str, Any]) -> str:
    """AlpacaEval: the ``instruction`` field."""
    return row["instruction"]


def _arena_prompt(row: dict[str, Any]) -> str:
    """Arena-Hard: the first user turn, ``turns[0]["content"]`` (or a plain ``prompt`` field)."""
    if "prompt" in row and isinstance(row["prompt"], str):
        return row["prompt"]
    return row["turns"][0]["content"]


@dataclass(frozen=True)
class PromptSet:
    """Where a named set lives on the Hub and how a row gives its prompt."""

    path: str
    subset: str | None
    split: str
    prompt: Callable[[dict[str, Any]], str]


PROMPT_SETS: dict[str, PromptSet] = {
    "hh-rlhf": PromptSet("Anthropic/hh-rlhf", None, "test", _hh_prompt),
    "alpacaeval": PromptSet("tatsu-lab/alpaca_eval", "alpaca_eval", "eval", _alpaca_prompt),
    "arena-hard": PromptSet("lmarena-ai/arena-hard-auto-v0.1", None, "train", _arena_prompt),
}


def load_prompt_set(
    name: str, limit: int, source: str | None = None, revision: str | None = None
) -> list[Prompt]:
    """The first ``limit`` distinct prompts of the named set as ``(f"{name}-{row:05d}", text)``.

    ``source``: a local file/directory of the same shape, or another Hub id (default: the set's
    own id). A row without the prompt field raises DataError naming the file, row and field.
    """
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r} (known: {', '.join(PROMPT_SETS)})")
    spec = PROMPT_SETS[name]
    where = source or spec.path
    src = SourceConfig(
        path=where, split=spec.split, subset=None if source else spec.subset, revision=revision
    )
    seen: set[str] = set()
    prompts: list[Prompt] = []
    with contextlib.closing(source_rows(src, spec.split)) as rows:
        for raw in rows:
            if raw.problem is not None:
                raise DataError(
                    f"{format_location(where, raw.row, raw.line, raw.problem.field)}: {raw.problem}"
                )
            try:
                text = spec.prompt(raw.data)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                place = format_location(where, raw.row, raw.line, None)
                raise DataError(f"{place}: not a {name} row ({type(exc).__name__}: {exc})") from None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{format_location(where, raw.row, raw.line, None)}: empty {name} prompt")
            if text in seen:
                continue
            seen.add(text)
            prompts.append((f"{name}-{raw.row:05d}", text))
            if len(prompts) == limit:
                break
    if not prompts:
        raise DataError(f"{where}: the {name} prompt set holds no prompts")
    return prompts
