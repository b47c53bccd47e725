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


def _source_prompts(data_path: str | Path | None, sweep: SweepConfig, limit: int) -> list[Prompt]:
    """The first `limit` distinct prompts of the sweep's source: `prompts_file`, the named
    `prompt_set`, else the data artifact's test split (in table order, id = the first pair's id)."""
    if sweep.prompts_file:
        return load_prompts_file(sweep.prompts_file, limit)
    if sweep.prompt_set == "tiny-world":  # generated here, as many as asked for
        from alignheads.world.corpus import evaluation_prompts

        return [(f"tiny-world-{i:05d}", text) for i, text in enumerate(evaluation_prompts(limit))]
    if sweep.prompt_set:
        from alignheads.tasks.prompt_sets import load_prompt_set

        return load_prompt_set(sweep.prompt_set, limit, sweep.prompt_set_source, sweep.prompt_set_revision)
    if data_path is None:
        raise ValueError(
            "sweep.prompts_file is empty and no data artifact was given to take test prompts from"
        )
    test = _split(data_path, "test")
    prompts = _distinct(zip(test.column("id").to_pylist(), test.column("prompt").to_pylist(), strict=True), limit)
    if not prompts:
        raise ValueError(f"{data_path}: the pairs table has no test prompts to generate from")
    return prompts


def _split(data_path: str | Path, split: str):
    pairs = read_table(Path(data_path), "pairs").select(["id", "split", "prompt"])
    return pairs.filter(pc.equal(pairs.column("split"), split))


def train_prompts(data_path: str | Path | None) -> set[str]:
    """The distinct training prompts of the data artifact (empty without one)."""
    if data_path is None:
        return set()
    return set(_split(data_path, "train").column("prompt").to_pylist())


def prompt_set(data_path: str | Path | None, sweep: SweepConfig) -> list[Prompt]:
    """The sweep's evaluation prompts: the first `n_prompts` distinct prompts of the source that
    are not training prompts (`data.train_overlap: keep` is handled by `sweep_prompt_sets`)."""
    return sweep_prompt_sets(data_path, sweep, 0)[0]


def sweep_prompt_sets(
    data_path: str | Path | None, sweep: SweepConfig, n_calibration: int, train_overlap: str = "drop"
) -> tuple[list[Prompt], list[Prompt], dict[str, int]]:
    """(evaluation prompts, calibration prompts, counts): the source's first `sweep.n_prompts`
    distinct prompts, then the next `n_calibration`, so the two sets are disjoint. With
    `train_overlap` 'drop' every prompt that is word for word a training prompt of the data
    artifact is left out first (counted in ``counts["dropped_train_prompts"]``).

    Raises ValueError when the source holds fewer prompts than both sets need.
    """
    want = sweep.n_prompts + n_calibration
    seen = train_prompts(data_path) if train_overlap == "drop" else set()
    # read more than needed: some may be dropped as training prompts
    limit = want + len(seen) if sweep.prompts_file or sweep.prompt_set else -1
    source = _source_prompts(data_path, sweep, limit)
    kept = [p for p in source if p[1] not in seen]
    counts = {"dropped_train_prompts": len(source) - len(kept)}
    if n_calibration and len(kept) < want:
        raise ValueError(
            f"the sweep's prompt source holds {len(kept)} distinct usable prompts "
            f"({counts['dropped_train_prompts']} training prompts left out), fewer than "
            f"sweep.n_prompts + evaluate.calibration_prompts = {sweep.n_prompts} + {n_calibration}: "
            "lower one of them or give more prompts"
        )
    if not kept:
        raise ValueError("the sweep's prompt source holds no prompt that is not a training prompt")
    return kept[: sweep.n_prompts], kept[sweep.n_prompts : want], counts


def validation_prompt_set(
    data_path: str | Path | None,
    sweep: SweepConfig,
    n_calibration: int,
    n_validation: int,
    train_overlap: str = "drop",
) -> list[Prompt]:
    """The validation prompts of a search (`alignheads tune`): the source's next `n_validation`
    distinct prompts after the sweep's `sweep.n_prompts` evaluation prompts and its
    `n_calibration` calibration prompts (as `sweep_prompt_sets` orders them), so disjoint from
    both. Raises ValueError when the source holds too few."""
    if n_validation < 1:
        raise ValueError(f"n_validation must be >= 1, got {n_validation}")
    ahead = sweep.model_copy(update={"n_prompts": sweep.n_prompts + n_calibration})
    try:
        return sweep_prompt_sets(data_path, ahead, n_validation, train_overlap)[1]
    except ValueError as exc:
        raise ValueError(
            f"{exc} (a search also takes {n_validation} validation prompts after them: lower the "
            "search space's validation_prompts)"
        ) from None


PROMPTS_STAGE = "prompts"
PROMPTS_VERSION = 1
PROMPTS_TABLE = "prompts"


def save_prompt_set(store: str | Path, prompts: Sequence[Prompt]) -> Path:
    """The ordered prompt set as an artifact of its own, `<store>/prompts/<key>/` (table `prompts`:
    `prompt_id, prompt`), keyed by its fingerprint; returns its path. Stages are handed this
    path rather than the prompts, so flow-run parameters stay small whatever the set's size."""
    import pyarrow as pa

    from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
    from alignheads.storage.fingerprint import artifact_key
    from alignheads.storage.tables import write_table

    if not prompts:
        raise ValueError("the prompt set is empty")
    config = {"sha256": prompt_fingerprint(prompts), "n": len(prompts)}
    key = artifact_key(PROMPTS_STAGE, config, {}, PROMPTS_VERSION)

    def build(staging: Path) -> ArtifactContent:
        table = pa.table({"prompt_id": [p for p, _ in prompts], "prompt": [t for _, t in prompts]})
        return ArtifactContent(tables={PROMPTS_TABLE: write_table(table, staging, PROMPTS_TABLE)}, info=config)

    return ensure_artifact(Path(store), PROMPTS_STAGE, key, PROMPTS_VERSION, config, {}, build).path


def read_prompt_set(path: str | Path) -> list[Prompt]:
    """The prompts of a `save_prompt_set` artifact, in order."""
    table = read_table(Path(path), PROMPTS_TABLE)
    return list(zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist(), strict=True))


def prompt_set_identity(path: str | Path) -> dict[str, Any]:
    """``{"sha256", "n"}`` of a `save_prompt_set` artifact (what cache keys hold of a prompt set)."""
    from alignheads.storage.manifest import read_manifest

    info = read_manifest(Path(path), PROMPTS_STAGE).info
    return {"sha256": info["sha256"], "n": info["n"]}


def prompt_fingerprint(prompts: Sequence[Prompt]) -> str:
    """SHA-256 of the ordered (id, text) list: order matters (it fixes the batches)."""
    return fingerprint([[pid, text] for pid, text in prompts])
