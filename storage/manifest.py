"""Artifact manifests: written last, list every shard and file with its size and checksum.

An artifact directory is complete exactly when its `manifest.json` exists and verifies;
readers go through `verify_artifact` / `read_table`, never around them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alignheads import __version__
from alignheads.storage.atomic import write_json_atomic
from alignheads.storage.fingerprint import file_sha256

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or corrupt; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet shard of a table: path relative to the artifact dir, row count, SHA-256."""

    path: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class FileInfo:
    """One non-table file of an artifact (weights, tokenizer, JSONL)."""

    path: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    stage: str
    key: str
    stage_version: int
    config: Any
    inputs: dict[str, str]
    tables: dict[str, list[ShardInfo]]
    files: list[FileInfo]
    info: dict[str, Any]
    created_at: float
    package_version: str
    format: int = MANIFEST_FORMAT


def describe_files(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> list[FileInfo]:
    """FileInfo for every regular file under `root` (sorted), except the excluded names."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        out.append(FileInfo(rel, path.stat().st_size, file_sha256(path)))
    return out


def write_manifest(
    directory: Path,
    *,
    stage: str,
    key: str,
    stage_version: int,
    config: Any,
    inputs: dict[str, str],
    tables: dict[str, list[ShardInfo]] | None = None,
    files: list[FileInfo] | None = None,
    info: dict[str, Any] | None = None,
) -> Manifest:
    """Write `manifest.json` atomically; call it after every shard and file is on disk."""
    manifest = Manifest(
        stage=stage,
        key=key,
        stage_version=stage_version,
        config=config,
        inputs=dict(inputs),
        tables={name: list(shards) for name, shards in (tables or {}).items()},
        files=list(files or []),
        info=dict(info or {}),
        created_at=time.time(),
        package_version=__version__,
    )
    write_json_atomic(directory / MANIFEST, asdict(manifest), default=str)
    return manifest


def read_manifest(directory: Path, stage: str | None = None, stage_version: int | None = None) -> Manifest:
    """Parse `manifest.json`, checking its format and (when given) the stage and its version."""
    path = directory / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: no manifest (the artifact is incomplete)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ArtifactError(f"{path}: manifest format {found!r}, this version reads {MANIFEST_FORMAT}")
    try:
        manifest = Manifest(
            **{
                **raw,
                "tables": {n: [ShardInfo(**s) for s in shards] for n, shards in raw["tables"].items()},
                "files": [FileInfo(**f) for f in raw["files"]],
            }
        )
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: malformed manifest ({exc})") from exc
    if stage is not None and manifest.stage != stage:
        raise ArtifactError(f"{path}: manifest is for stage {manifest.stage!r}, expected {stage!r}")
    if stage_version is not None and manifest.stage_version != stage_version:
        raise ArtifactError(
            f"{path}: {manifest.stage} artifact format version {manifest.stage_version}, "
            f"this version of alignheads reads {stage_version}"
        )
    return manifest


def verify_shard(directory: Path, shard: ShardInfo) -> None:
    """Check a shard exists, has the recorded row count and checksum."""
    import pyarrow.parquet as pq

    path = directory / shard.path
    if not path.is_file():
        raise ArtifactError(f"{path}: shard listed in the manifest is missing")
    digest = file_sha256(path)
    if digest != shard.sha256:
        raise ArtifactError(f"{path}: checksum mismatch (manifest {shard.sha256[:12]}…, file {digest[:12]}…)")
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise ArtifactError(f"{path}: not a readable Parquet file ({exc})") from exc
    if rows != shard.rows:
        raise ArtifactError(f"{path}: {rows} rows, manifest says {shard.rows}")


def verify_file(directory: Path, info: FileInfo) -> None:
    path = directory / info.path
    if not path.is_file():
        raise ArtifactError(f"{path}: file listed in the manifest is missing")
    if path.stat().st_size != info.bytes or file_sha256(path) != info.sha256:
        raise ArtifactError(f"{path}: checksum mismatch with the manifest")


def verify_artifact(directory: Path, stage: str | None = None, stage_version: int | None = None) -> Manifest:
    """Read the manifest and verify every shard and file it lists; raises ArtifactError naming the file."""
    manifest = read_manifest(directory, stage, stage_version)
    for shards in manifest.tables.values():
        for shard in shards:
            verify_shard(directory, shard)
    for info in manifest.files:
        verify_file(directory, info)
    return manifest
