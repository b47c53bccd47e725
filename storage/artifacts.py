"""Content-addressed artifact directories: `<store>/<stage>/<key>/`, built in a temp dir and renamed.

A stage's artifact exists at its final path only once it is complete (manifest written last,
then the whole directory renamed into place), so a killed run never leaves a half-built
artifact where readers look. Two processes building the same key take turns on a file lock;
the second finds the first one's artifact and reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignheads.storage.atomic import follow_umask, fsync_dir
from alignheads.storage.manifest import (
    MANIFEST,
    ArtifactError,
    FileInfo,
    Manifest,
    ShardInfo,
    describe_files,
    verify_artifact,
    write_manifest,
)
from alignheads.storage.store_errors import writing

log = logging.getLogger(__name__)


@dataclass
class ArtifactContent:
    """What a stage's build function reports: its tables' shards and a summary for the manifest."""

    tables: dict[str, list[ShardInfo]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactResult:
    """Where a stage's artifact is, and whether this call computed it or found it complete."""

    stage: str
    key: str
    path: Path
    computed: bool
    manifest: Manifest


def artifact_dir(store: Path, stage: str, key: str) -> Path:
    return Path(store) / stage / key


@contextlib.contextmanager
def artifact_lock(store: Path, stage: str, key: str, shared: bool = False) -> Iterator[None]:
    """Lock for building one artifact; waits (and says so) while another process holds it.

    Exclusive by default. `shared=True` takes a shared lock: several holders at once (e.g. the
    writers of different shards), all excluded while someone holds it exclusively. flock locks
    belong to the open file, so threads of one process exclude each other too.
    """
    lock_dir = Path(store) / stage / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with open(lock_dir / f"{key}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            # waits for shared locks are routine (shard writers queue behind a finalize)
            level = logging.DEBUG if shared else logging.WARNING
            log.log(level, "%s/%s is being built by another process; waiting for it", stage, key)
            fcntl.flock(fh, mode)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(parent: Path, key: str) -> None:
    """Delete staging dirs of `key` left by killed processes (their pid is gone)."""
    for tmp in parent.glob(f".{key}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def quarantine(path: Path, reason: Exception) -> None:
    """Move a corrupt artifact aside (never delete what a user may want to inspect)."""
    target = path.with_name(f".corrupt-{path.name}-{int(time.time())}")
    log.warning("%s is corrupt (%s); moved to %s and rebuilding", path, reason, target.name)
    os.replace(path, target)


def complete_artifact(store: Path, stage: str, key: str, stage_version: int) -> Manifest | None:
    """The verified manifest of an existing complete artifact, or None if there is none."""
    path = artifact_dir(store, stage, key)
    if not (path / MANIFEST).is_file():
        return None
    return verify_artifact(path, stage, stage_version)


def ensure_artifact(
    store: Path,
    stage: str,
    key: str,
    stage_version: int,
    config: Any,
    inputs: dict[str, str],
    build: Callable[[Path], ArtifactContent],
) -> ArtifactResult:
    """Return the complete artifact for `key`, building it with `build(staging_dir)` if needed.

    `build` writes its tables (via `ShardWriter`/`write_table`) and any other files into the
    staging directory and returns their shard lists; the manifest (listing every shard and
    file with checksums) is written here, last, and the directory is renamed into place.
    """
    final = artifact_dir(store, stage, key)
    with writing(final, Path(store)):
        return _ensure_artifact(store, stage, key, stage_version, config, inputs, build)


def _ensure_artifact(
    store: Path,
    stage: str,
    key: str,
    stage_version: int,
    config: Any,
    inputs: dict[str, str],
    build: Callable[[Path], ArtifactContent],
) -> ArtifactResult:
    final = artifact_dir(store, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with artifact_lock(store, stage, key):
        if final.exists():
            try:
                manifest = complete_artifact(store, stage, key, stage_version)
            except ArtifactError as exc:
                quarantine(final, exc)
            else:
                if manifest is not None:
                    return ArtifactResult(stage, key, final, False, manifest)
                quarantine(final, ArtifactError("no manifest"))
        _remove_stale_staging(final.parent, key)
        staging = final.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            content = build(staging)
            follow_umask(staging)  # weights are written 0600 by safetensors: readable like the rest
            shard_paths = {s.path for shards in content.tables.values() for s in shards}
            files: list[FileInfo] = describe_files(staging, exclude=(MANIFEST, *shard_paths))
            manifest = write_manifest(
                staging,
                stage=stage,
                key=key,
                stage_version=stage_version,
                config=config,
                inputs=inputs,
                tables=content.tables,
                files=files,
                info=content.info,
            )
            fsync_dir(staging)
            os.rename(staging, final)
            fsync_dir(final.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ArtifactResult(stage, key, final, True, manifest)


def list_artifacts(store: Path, stage: str) -> list[Path]:
    """Complete-looking artifact dirs of a stage (those with a manifest), sorted by name."""
    root = Path(store) / stage
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())
