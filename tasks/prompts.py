"""The α-sweep's prompts: the data artifact's test split, a prompts file, or a named prompt set.

Every source gives an ordered list of (prompt_id, text) with distinct texts; the order fixes
the sweep's batches (and so its common random numbers), so it is part of the cache key
through `prompt_fingerprint`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from alignheads.config import SweepConfig
from alignheads.storage.fingerprint import fingerprint
from alignheads.storage.tables import read_table

Prompt = tuple[str, str]  # (prompt_id, text)


def _distinct(items: Iterator[Prompt], limit: int) -> list[Prompt]:
    """The first `limit` items with distinct texts (the first id of a text wins)."""
    seen: set[str] = set()
    out: list[Prompt] = []
    for pid, text in items:
        if text in seen:
            continue
        seen.add(text)
        out.append((pid, text))
        if len(out) == limit:
            break
    return out


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(place, raw row) of a prompts file; `place` names the file and line/index for errors."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                yield f"{path}, line {line_no}", line
    elif suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}, line {line_no}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {line_no}: not valid JSON: {exc}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("prompts"), list):
            data = data["prompts"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts (strings or objects with 'prompt')")
        for index, row in enumerate(data):
            yield f"{path}, item {index}", row
    else:
        raise ValueError(f"{path}: unsupported prompts file type {suffix!r} (use .txt, .jsonl or .json)")


def _prompt_text(place: str, row: Any) -> str:
    if isinstance(row, str):
        text = row
    elif isinstance(row, dict):
        if "prompt" not in row:
            raise ValueError(f"{place}: field 'prompt' is missing (fields: {sorted(row)})")
        text = row["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"{place}: field 'prompt' must be a string, got {type(text).__name__}")
    else:
        raise ValueError(f"{place}: expected a string or an object with a 'prompt' field")
    if not text.strip():
        raise ValueError(f"{place}: field 'prompt' is empty")
    return text


def load_prompts_file(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Prompts of a .txt (one per line, blank lines skipped), .jsonl ('prompt' field per line) or
    .json file (a list of strings or of objects with 'prompt', or {"prompts": [...]}).

    Returns the first `limit` distinct prompts as (f"p{i:05d}", text), `i` = the prompt's index
    in the file. Raises FileNotFoundError / ValueError naming the file (and line) when the file
    is missing, holds no prompt, or a row is malformed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    rows = ((f"p{i:05d}", _prompt_text(place, row)) for i, (place, row) in enumerate(_file_rows(path)))
    prompts = _distinct(rows, limit if limit is not None else -1)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def prompt_set(data_path: str | Path | None, sweep: SweepConfig) -> list[Prompt]:
    """The sweep's prompts: the first `n_prompts` distinct prompts of `prompts_file` or of the named
    `prompt_set` when set, else of the data artifact's test split (in table order, id = the first pair's id)."""
    if sweep.prompts_file:
        return load_prompts_file(sweep.prompts_file, sweep.n_prompts)
    if sweep.prompt_set:
        from alignheads.tasks.prompt_sets import load_prompt_set

        return load_prompt_set(
            sweep.prompt_set, sweep.n_prompts, sweep.prompt_set_source, sweep.prompt_set_revision
        )
    if data_path is None:
        raise ValueError(
            "sweep.prompts_file is empty and no data artifact was given to take test prompts from"
        )
    pairs = read_table(Path(data_path), "pairs").select(["id", "split", "prompt"])
    test = pairs.filter(pc.equal(pairs.column("split"), "test"))
    prompts = _distinct(
        zip(test.column("id").to_pylist(), test.column("prompt").to_pylist(), strict=True), sweep.n_prompts
    )
    if not prompts:
        raise ValueError(f"{data_path}: the pairs table has no test prompts to generate from")
    return prompts


def prompt_fingerprint(prompts: Sequence[Prompt]) -> str:
    """SHA-256 of the ordered (id, text) list: order matters (it fixes the batches)."""
    return fingerprint([[pid, text] for pid, text in prompts])
