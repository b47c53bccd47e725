"""Preference-data ingestion: local JSONL/JSON/Parquet files or Hugging Face datasets -> pairs + rejects.

`load_pairs` reads one source row by row (streaming for JSONL and Parquet), detects the row
format from the first row (or takes it from `fmt`), validates every row and returns two Arrow
tables: the usable pairs and the rejected rows. Nothing is silently dropped:
``len(pairs) + len(rejects)`` is the number of rows read (blank JSONL lines are not rows).
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignheads.config import RunConfig, SourceConfig
from alignheads.tasks.formats import (
    FORMATS,
    DataError,
    FormatDetectionError,
    RowProblem,
    detect_format,
    parse_row,
)

__all__ = [
    "PAIRS_SCHEMA",
    "REJECTS_SCHEMA",
    "BadRowError",
    "DataError",
    "EmptyDatasetError",
    "FormatDetectionError",
    "check_sources",
    "detect_format",
    "load_pairs",
]

PAIRS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("field", pa.string()),  # null when the whole row is unreadable (bad JSON, bad bytes)
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)
RAW_MAX_CHARS = 2000
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
LOCAL_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
ON_BAD_ROWS = ("error", "skip")


class BadRowError(DataError):
    """One bad row: `file`, `row` (0-based), `line` (1-based, JSONL only), `field` (None = whole row), `reason`."""

    def __init__(self, file: str, row: int, field: str | None, reason: str, line: int | None = None):
        self.file, self.row, self.field, self.reason, self.line = file, row, field, reason, line
        super().__init__(format_location(file, row, line, field) + f": {reason}")

    def __reduce__(self):  # picklable with its attributes (e.g. across process pools)
        return (type(self), (self.file, self.row, self.field, self.reason, self.line))


class EmptyDatasetError(DataError):
    """A source with no rows, or no valid rows."""


def format_location(file: str, row: int, line: int | None, field: str | None) -> str:
    """`data/train.jsonl: row 17 (line 18), field 'chosen'` (line and field only when known)."""
    where = f"{file}: row {row}"
    if line is not None:
        where += f" (line {line})"
    if field is not None:
        where += f", field '{field}'"
    return where


@dataclass
class _RawRow:
    row: int  # 0-based index among the source's rows
    line: int | None  # 1-based line (JSONL only)
    data: Any = None  # the parsed row (a dict when readable)
    problem: RowProblem | None = None  # set when the row could not be read at all
    text: str | None = None  # the row's raw text when the source is text

    def raw(self) -> str:
        if self.text is not None:
            text = self.text
        else:
            try:
                text = json.dumps(self.data, ensure_ascii=False, default=str)
            except (TypeError, ValueError):
                text = repr(self.data)
        return text[:RAW_MAX_CHARS]


# ----------------------------------------------------------------------------------------- readers


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _read_jsonl(path: Path) -> Iterator[_RawRow]:
    """One row per non-blank line; undecodable bytes or bad JSON become row problems, not exceptions."""
    index = 0
    with _open_binary(path) as fh:
        for lineno, blob in enumerate(fh, start=1):
            if lineno == 1 and blob.startswith(b"\xef\xbb\xbf"):
                blob = blob[3:]  # UTF-8 byte-order mark
            if not blob.strip():
                continue
            item = _RawRow(row=index, line=lineno)
            index += 1
            try:
                item.text = blob.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                item.text = blob.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
                item.problem = RowProblem(None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                yield item
                continue
            try:
                item.data = json.loads(item.text)
            except json.JSONDecodeError as exc:
                item.problem = RowProblem(None, f"malformed JSON: {exc.msg} (column {exc.colno})")
            else:
                if not isinstance(item.data, dict):
                    item.problem = RowProblem(None, f"expected a JSON object, got {_json_type(item.data)}")
            yield item


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _read_json(path: Path, shown: str) -> Iterator[_RawRow]:
    """A JSON list of rows, or an object holding one under 'data' or 'rows'; JSON Lines also accepted."""
    with _open_binary(path) as fh:
        blob = fh.read()
    try:
        doc = json.loads(blob.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{shown}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: a JSON Lines file named .json
            yield from _read_jsonl(path)
            return
        raise DataError(
            f"{shown}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    del blob
    if isinstance(doc, dict):
        key = next((k for k in ("data", "rows") if isinstance(doc.get(k), list)), None)
        if key is None:
            keys = ", ".join(repr(k) for k in doc) or "none"
            raise DataError(
                f"{shown}: expected a JSON list of rows or an object with a 'data' or 'rows' list, "
                f"got an object with keys {keys}"
            )
        doc = doc[key]
    if not isinstance(doc, list):
        raise DataError(f"{shown}: expected a JSON list of rows, got {_json_type(doc)}")
    for index, data in enumerate(doc):
        item = _RawRow(row=index, line=None, data=data)
        if not isinstance(data, dict):
            item.problem = RowProblem(None, f"expected a JSON object, got {_json_type(data)}")
        yield item


def _read_parquet(path: Path, shown: str, batch_size: int = 1024) -> Iterator[_RawRow]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{shown}: not a readable Parquet file: {exc}") from exc
    index = 0
    with reader:
        for batch in reader.iter_batches(batch_size=batch_size):
            for data in batch.to_pylist():
                yield _RawRow(row=index, line=None, data=data)
                index += 1


def _load_hub(source: SourceConfig, split: str):
    """`datasets.load_dataset(path, name=subset, split=..., revision=...)`.

    `subset` is tried as a dataset config name first; when the dataset has no such config it is
    used as `data_dir` (Anthropic/hh-rlhf's 'harmless-base' is a folder, not a config).
    """
    import datasets

    hub_split = source.split or split
    try:
        try:
            return datasets.load_dataset(
                source.path, name=source.subset, split=hub_split, revision=source.revision
            )
        except ValueError as exc:
            if source.subset is None or "BuilderConfig" not in str(exc):
                raise
            return datasets.load_dataset(
                source.path, data_dir=source.subset, split=hub_split, revision=source.revision
            )
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{source.path}: not a local file, and no Hugging Face dataset of that name was found ({exc})"
        ) from exc
    except (ValueError, ConnectionError) as exc:
        subset = f", subset {source.subset!r}" if source.subset else ""
        raise DataError(
            f"{source.path}: cannot load Hugging Face dataset (split {hub_split!r}{subset}): {exc}"
        ) from exc


def _read_hub(source: SourceConfig, split: str) -> Iterator[_RawRow]:
    dataset = _load_hub(source, split)
    for index, data in enumerate(dataset):
        yield _RawRow(row=index, line=None, data=data)


def _looks_local(path: str) -> bool:
    return path.lower().endswith(LOCAL_SUFFIXES) or path.startswith(("/", "./", "../", "~", ".\\"))


def source_rows(source: SourceConfig, split: str) -> Iterator[_RawRow]:
    """Raw rows of a local JSONL/JSON/Parquet file, a local dataset directory or a Hub dataset."""
    shown = source.path
    path = Path(source.path).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith(JSONL_SUFFIXES):
            return _read_jsonl(path)
        if name.endswith(JSON_SUFFIXES):
            return _read_json(path, shown)
        if name.endswith(PARQUET_SUFFIXES):
            return _read_parquet(path, shown)
        raise DataError(
            f"{shown}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)}, "
            "or a Hugging Face dataset id or directory)"
        )
    if not path.exists() and _looks_local(source.path):
        raise FileNotFoundError(f"{shown}: preference data file not found")
    return _read_hub(source, split)  # a Hub id, or a local dataset directory


def check_sources(cfg: RunConfig) -> None:
    """Check, before any stage runs, every local file the run will read: the preference data
    sources (`data.train`, `data.test`) and the sweep's `prompts_file`. Raises FileNotFoundError
    naming each missing one with its setting (a source that does not look like a local path is a
    Hugging Face dataset id, found or not when the data stage loads it), and DataError for a file
    of a type no reader takes. Relative paths are read from the working directory, as the stages
    read them."""
    missing: list[tuple[str, str]] = []  # (what, path as configured)
    for split in ("train", "test"):
        source = getattr(cfg.data, split)
        if source is None:
            continue  # the tiny world's pairs
        path = Path(source.path).expanduser()
        if path.is_file() and not path.name.lower().endswith(LOCAL_SUFFIXES):
            raise DataError(
                f"data.{split}: {source.path}: unsupported file type (expected "
                f"{', '.join(LOCAL_SUFFIXES)}, or a Hugging Face dataset id or directory)"
            )
        if not path.exists() and _looks_local(source.path):
            missing.append((f"data.{split}: preference data file", source.path))
    prompts_file = cfg.sweep.prompts_file
    if prompts_file and not Path(prompts_file).expanduser().is_file():
        missing.append(("sweep.prompts_file: prompts file", prompts_file))
    if missing:
        text = "; ".join(f"{what} {path} not found" for what, path in missing)
        if any(not Path(path).expanduser().is_absolute() for _, path in missing):
            text += f" (relative paths are read from {Path.cwd()})"
        raise FileNotFoundError(text)


# ------------------------------------------------------------------------------------------ ingest


def _row_id(data: dict[str, Any], split: str, row: int) -> str:
    own = data.get("id")
    if isinstance(own, int) and not isinstance(own, bool):
        return str(own)
    if isinstance(own, str) and own.strip():
        return own
    return f"{split}-{row:06d}"


def load_pairs(
    source: SourceConfig,
    split: str,
    fmt: str = "auto",
    on_bad_rows: str = "error",
    tokenizer: Any = None,
) -> tuple[pa.Table, pa.Table]:
    """Read one preference-data source into (pairs, rejects) Arrow tables.

    `source.path` is a local .jsonl/.json/.parquet file (optionally .gz for JSON) or else a
    Hugging Face dataset id or local dataset directory, loaded with `datasets.load_dataset`
    (split = `source.split` or `split`). `split` names the rows ('train', 'test') in the output
    and in fallback ids (`f"{split}-{row:06d}"`). `fmt` is 'auto' (detected from the first
    readable row), 'trl', 'hh' or 'conversational'. `tokenizer` renders conversational rows with
    its chat template, if it has one. With `on_bad_rows='error'` the first bad row raises
    BadRowError; with 'skip' it becomes a row of `rejects`. A source with no (valid) rows raises
    EmptyDatasetError; an undetectable format raises FormatDetectionError (both DataErrors).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected 'auto' or one of {', '.join(FORMATS)}")
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    shown = source.path
    resolved = None if fmt == "auto" else fmt
    pairs: dict[str, list[Any]] = {name: [] for name in PAIRS_SCHEMA.names}
    rejects: dict[str, list[Any]] = {name: [] for name in REJECTS_SCHEMA.names}
    seen_ids: dict[str, int] = {}
    first_reject: str | None = None
    n_read = 0

    with contextlib.closing(source_rows(source, split)) as rows:  # a limit may stop reading early
        for item in itertools.islice(rows, source.limit):  # limit None reads everything
            n_read += 1
            try:
                if item.problem is not None:
                    raise item.problem
                if resolved is None:
                    try:
                        resolved = detect_format(item.data)
                    except FormatDetectionError as exc:
                        raise FormatDetectionError(
                            f"{format_location(shown, item.row, item.line, None)}: {exc} "
                            "(or set the format explicitly: trl, hh or conversational)"
                        ) from None
                prompt, chosen, rejected = parse_row(item.data, resolved, tokenizer)
                row_id = _row_id(item.data, split, item.row)
                if row_id in seen_ids:
                    raise RowProblem("id", f"duplicate id {row_id!r} (first used by row {seen_ids[row_id]})")
            except RowProblem as problem:
                if on_bad_rows == "error":
                    raise BadRowError(shown, item.row, problem.field, problem.reason, item.line) from None
                if first_reject is None:
                    first_reject = (
                        format_location(shown, item.row, item.line, problem.field) + f": {problem.reason}"
                    )
                for name, value in zip(
                    REJECTS_SCHEMA.names,
                    (split, shown, item.row, problem.field, problem.reason, item.raw()),
                    strict=True,
                ):
                    rejects[name].append(value)
                continue
            seen_ids[row_id] = item.row
            for name, value in zip(
                PAIRS_SCHEMA.names, (row_id, split, prompt, chosen, rejected, shown, item.row), strict=True
            ):
                pairs[name].append(value)

    if n_read == 0:
        raise EmptyDatasetError(f"{shown}: no rows (an empty dataset cannot be used)")
    if not pairs["id"]:
        raise EmptyDatasetError(
            f"{shown}: no valid rows: all {n_read} rows read were rejected (first: {first_reject})"
        )
    return (
        pa.Table.from_pydict(pairs, schema=PAIRS_SCHEMA),
        pa.Table.from_pydict(rejects, schema=REJECTS_SCHEMA),
    )
