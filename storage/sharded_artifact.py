"""Artifacts built shard by shard: each shard written and recorded on its own, so a killed run
resumes by computing only the shards that are missing or fail their checksum.

`ensure_artifact` builds a whole artifact in one call; a stage whose shards are independent
pieces of work (mapped over a task runner, each minutes long) uses `ShardedArtifact` instead.

While it is being built (hidden names: readers and DuckDB views never look there)::

    <store>/<stage>/.<key>.work/<table>/part-00003.parquet   shard 3's file of each table
    <store>/<stage>/.<key>.shards/plan.json                  what is being built
    <store>/<stage>/.<key>.shards/00003.json                 shard 3's done-record

Shard files are written atomically (temp name, fsync, rename); the done-record (rows and
SHA-256 of each of the shard's files, plus the shard's own summary) is written atomically
*after* them, so it vouches for complete files. A shard counts as done only if its record
exists and every file it lists still has the recorded checksum and row count; otherwise it is
computed again. When all shards are done, `finalize` writes the manifest (last) into the work
directory, renames it to `<store>/<stage>/<key>/` (the same complete-artifact contract as
`ensure_artifact`) and drops the records.

A complete artifact whose shard later fails its checksum is reopened rather than rebuilt: the
shards that still verify get done-records again (from its manifest), the bad files are moved
aside, and only those shards are recomputed.

Concurrency: shard writers hold the artifact's lock shared plus their shard's lock exclusive,
so different shards are written in parallel (threads or processes), one shard is never
computed twice at once, and `finalize`/`prepare` (exclusive) never see a shard half-written.

Why about 500 lines: one class owns the whole life of a sharded artifact (plan, records, locks,
reopen, finalize); split apart, each half would have to know the other's files and locks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alignheads.storage.artifacts import (
    ArtifactResult,
    artifact_dir,
    artifact_lock,
    pid_alive,
    quarantine,
)
from alignheads.storage.atomic import fsync_dir, write_json_atomic
from alignheads.storage.fingerprint import canonical_json
from alignheads.storage.manifest import (
    MANIFEST,
    ArtifactError,
    Manifest,
    ShardInfo,
    read_manifest,
    verify_artifact,
    verify_shard,
    write_manifest,
)
from alignheads.storage.store_errors import writing
from alignheads.storage.tables import write_shard

__all__ = [
    "SHARD_INFO_KEY",
    "ShardData",
    "ShardOutcome",
    "ShardRecord",
    "ShardedArtifact",
    "ShardedBuild",
    "build_sharded",
    "shard_path",
]

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
SHARD_INFO_KEY = "shard_info"  # manifest info: every shard's own summary, in index order


def _footer_rows(path: Path) -> int | None:
    """Row count from a Parquet file's footer (None if missing or damaged), no checksum."""
    try:
        with pq.ParquetFile(path) as pf:
            return pf.metadata.num_rows
    except Exception:  # pyarrow raises several types for missing or damaged files
        return None


def shard_path(table: str, index: int) -> str:
    """Path of shard `index` of `table`, relative to the artifact directory."""
    return f"{table}/part-{index:05d}.parquet"


def _writes(method):
    """Run a method that writes into the store; a read-only or full store becomes one clear error."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with writing(self.final_dir, self.store):
            return method(self, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class ShardData:
    """What computing one shard produces: one Arrow table per table name, and a JSON summary."""

    tables: dict[str, pa.Table]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardRecord:
    """A done shard: its files (path, rows, SHA-256) by table name, and its summary."""

    index: int
    tables: dict[str, ShardInfo]
    info: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tables": {n: asdict(s) for n, s in self.tables.items()},
            "info": self.info,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ShardRecord:
        return cls(
            index=int(raw["index"]),
            tables={n: ShardInfo(**s) for n, s in raw["tables"].items()},
            info=dict(raw.get("info", {})),
        )


@dataclass(frozen=True)
class ShardOutcome:
    """The record of one shard and whether this call computed it (False: found done)."""

    record: ShardRecord
    computed: bool


@dataclass(frozen=True)
class ShardedBuild:
    """A finished sharded build: the complete artifact and the shard indices computed by this call."""

    result: ArtifactResult
    computed_shards: list[int]


class ShardedArtifact:
    """One content-addressed artifact built from `n_shards` independent shards.

    `tables` names the tables every shard writes (each shard writes one file per table).
    `config` and `inputs` go to the manifest exactly as with `ensure_artifact`; the key must
    hash them (a work directory built under another plan is refused, never mixed in).
    """

    def __init__(
        self,
        store: Path,
        stage: str,
        key: str,
        stage_version: int,
        config: Any,
        inputs: dict[str, str],
        n_shards: int,
        tables: Iterable[str],
    ) -> None:
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        self.store = Path(store)
        self.stage = stage
        self.key = key
        self.stage_version = stage_version
        self.config = config
        self.inputs = dict(inputs)
        self.n_shards = n_shards
        self.tables = tuple(tables)
        if not self.tables:
            raise ValueError("a sharded artifact needs at least one table")
        self.final_dir = artifact_dir(self.store, stage, key)
        self.work_dir = self.final_dir.with_name(f".{key}.work")
        self.records_dir = self.final_dir.with_name(f".{key}.shards")

    # ------------------------------------------------------------------ what is being built
    def _plan(self) -> dict[str, Any]:
        # canonical JSON round trip: the comparison ignores key order and tuple/list spelling
        return json.loads(
            canonical_json(
                {
                    "stage": self.stage,
                    "key": self.key,
                    "stage_version": self.stage_version,
                    "config": self.config,
                    "inputs": self.inputs,
                    "n_shards": self.n_shards,
                    "tables": list(self.tables),
                }
            )
        )

    def _check_plan(self) -> None:
        """Write plan.json on first use (call under the exclusive lock); afterwards refuse a work
        directory built under another plan."""
        path = self.records_dir / PLAN_FILE
        if not path.is_file():
            self.records_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, self._plan())
            return
        self._compare_plan()

    def _compare_plan(self) -> None:
        path = self.records_dir / PLAN_FILE
        want = self._plan()
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: unreadable plan of a partial build ({exc})") from exc
        if found != want:
            diff = sorted(k for k in want if found.get(k) != want[k])
            raise ArtifactError(
                f"{path}: a partial build of {self.stage}/{self.key} was made under other settings "
                f"(differs in: {', '.join(diff)}); it is not reused. Remove {self.work_dir} and "
                f"{self.records_dir} to start over."
            )

    def _check_manifest(self, manifest: Manifest) -> None:
        """A complete artifact at this key must have been built from this plan."""
        want = self._plan()
        found = json.loads(canonical_json({"config": manifest.config, "inputs": manifest.inputs}))
        if found != {"config": want["config"], "inputs": want["inputs"]}:
            raise ArtifactError(
                f"{self.final_dir / MANIFEST}: built under other settings than {self.stage}/{self.key} "
                "asks for (config or inputs differ); refusing to reuse it"
            )
        shards = {name: len(manifest.tables.get(name, [])) for name in self.tables}
        if any(n != self.n_shards for n in shards.values()):
            raise ArtifactError(
                f"{self.final_dir / MANIFEST}: {shards} shards per table, expected {self.n_shards} each"
            )

    # ------------------------------------------------------------------ records
    def _record_path(self, index: int) -> Path:
        return self.records_dir / f"{index:05d}.json"

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.n_shards:
            raise IndexError(f"shard {index} out of range (0..{self.n_shards - 1})")

    def done_record(self, index: int) -> ShardRecord | None:
        """Shard `index`'s record if it exists and its files verify; a failing record is removed."""
        self._check_index(index)
        path = self._record_path(index)
        try:
            record = ShardRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("%s: unreadable shard record (%s); recomputing the shard", path, exc)
            path.unlink(missing_ok=True)
            return None
        try:
            if record.index != index or set(record.tables) != set(self.tables):
                raise ArtifactError(f"{path}: record does not describe shard {index} of {self.tables}")
            for info in record.tables.values():
                verify_shard(self.work_dir, info)
        except ArtifactError as exc:
            log.warning(
                "shard %d of %s/%s fails verification (%s); recomputing it", index, self.stage, self.key, exc
            )
            path.unlink(missing_ok=True)
            return None
        return record

    def looks_done(self, index: int) -> bool:
        """Cheap check (no checksums) that shard `index` has a record and its files are there with
        the recorded row counts; `done_record` verifies fully."""
        self._check_index(index)
        try:
            raw = json.loads(self._record_path(index).read_text(encoding="utf-8"))
            record = ShardRecord.from_json(raw)
            return set(record.tables) == set(self.tables) and all(
                _footer_rows(self.work_dir / s.path) == s.rows for s in record.tables.values()
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return False

    def missing(self) -> list[int]:
        """Indices of the shards still to compute (no record, or files failing their checksum)."""
        if self.complete() is not None:
            return []
        return [i for i in range(self.n_shards) if self.done_record(i) is None]

    # ------------------------------------------------------------------ the complete artifact
    def complete(self) -> Manifest | None:
        """The manifest of the complete artifact (read, not verified), or None if there is none."""
        if not (self.final_dir / MANIFEST).is_file():
            return None
        manifest = read_manifest(self.final_dir, self.stage, self.stage_version)
        self._check_manifest(manifest)
        return manifest

    def looks_complete(self) -> bool:
        """Cheap check (no checksums): a manifest, and every shard present with its row count in
        the Parquet footer. Catches missing and truncated shards; `prepare` verifies fully."""
        try:
            manifest = self.complete()
        except ArtifactError:
            return False
        if manifest is None:
            return False
        return all(
            _footer_rows(self.final_dir / shard.path) == shard.rows
            for shards in manifest.tables.values()
            for shard in shards
        )

    @_writes
    def prepare(self) -> bool:
        """Verify a complete artifact fully (True if it is sound); reopen one with bad shards so
        that only those are recomputed; otherwise start (or check) the partial build."""
        with artifact_lock(self.store, self.stage, self.key):
            if self.final_dir.exists():
                try:
                    manifest = verify_artifact(self.final_dir, self.stage, self.stage_version)
                    self._check_manifest(manifest)
                    return True
                except ArtifactError as exc:
                    self._reopen(exc)
            self._check_plan()
            return False

    def _reopen(self, reason: ArtifactError) -> None:
        """Turn a complete artifact that failed verification back into a partial build."""
        try:
            manifest = read_manifest(self.final_dir, self.stage, self.stage_version)
            self._check_manifest(manifest)
            for name in self.tables:
                paths = [s.path for s in manifest.tables[name]]
                if paths != [shard_path(name, i) for i in range(self.n_shards)]:
                    raise ArtifactError(f"{self.final_dir}: table {name!r} is not laid out shard by shard")
        except ArtifactError:
            quarantine(self.final_dir, reason)  # not salvageable: another plan, or no manifest
            return
        if self.work_dir.exists():
            quarantine(self.final_dir, reason)  # a partial build is already under way: keep it
            return
        log.warning("%s: %s; recomputing only the shards that fail", self.final_dir, reason)
        # Records first, rename last: a crash in between leaves the (still failing) complete
        # artifact in place, and records without a work directory are discarded next time.
        shutil.rmtree(self.records_dir, ignore_errors=True)
        self._check_plan()
        infos = manifest.info.get(SHARD_INFO_KEY) or [{} for _ in range(self.n_shards)]
        stamp = int(time.time())
        for index in range(self.n_shards):
            files = {name: manifest.tables[name][index] for name in self.tables}
            bad = []
            for info in files.values():
                try:
                    verify_shard(self.final_dir, info)
                except ArtifactError:
                    bad.append(info)
            if not bad:
                record = ShardRecord(index, files, dict(infos[index]) if index < len(infos) else {})
                write_json_atomic(self._record_path(index), record.to_json())
                continue
            for info in bad:  # move aside (never delete what a user may want to inspect)
                path = self.final_dir / info.path
                if path.exists():
                    aside = self.final_dir.with_name(
                        f".corrupt-{self.key}-{info.path.replace('/', '-')}-{stamp}"
                    )
                    os.replace(path, aside)
        os.replace(self.final_dir, self.work_dir)
        (self.work_dir / MANIFEST).unlink(missing_ok=True)
        fsync_dir(self.work_dir.parent)

    # ------------------------------------------------------------------ building
    def ensure_shard(self, index: int, compute: Callable[[], ShardData]) -> ShardOutcome:
        """Return shard `index`'s record, computing and writing it with `compute()` unless done.

        Safe to call from several threads or processes at once: each shard is computed by one.
        """
        self._check_index(index)
        for _ in range(3):
            with artifact_lock(self.store, self.stage, self.key, shared=True):
                if self.final_dir.exists():
                    record = self._record_from_final(index)
                    if record is not None:
                        return ShardOutcome(record, computed=False)
                    # else: the complete artifact has a bad shard; prepare() reopens it
                elif (self.records_dir / PLAN_FILE).is_file():
                    self._compare_plan()
                    with artifact_lock(self.store, self.stage, f"{self.key}.shard-{index:05d}"):
                        record = self.done_record(index)
                        if record is not None:
                            return ShardOutcome(record, computed=False)
                        return ShardOutcome(self._write(index, compute()), computed=True)
            self.prepare()  # exclusive: start the partial build, or reopen a damaged artifact
        raise ArtifactError(f"{self.final_dir}: shard {index} could not be verified or rebuilt")

    def _record_from_final(self, index: int) -> ShardRecord | None:
        """Shard `index` of the complete artifact, if its files verify (call under a lock)."""
        try:
            manifest = self.complete()
            if manifest is None:
                return None
            files = {name: manifest.tables[name][index] for name in self.tables}
            for info in files.values():
                verify_shard(self.final_dir, info)
        except (ArtifactError, KeyError, IndexError):
            return None
        infos = manifest.info.get(SHARD_INFO_KEY) or []
        return ShardRecord(index, files, dict(infos[index]) if index < len(infos) else {})

    @_writes
    def _write(self, index: int, data: ShardData) -> ShardRecord:
        if set(data.tables) != set(self.tables):
            raise ValueError(
                f"shard {index}: produced tables {sorted(data.tables)}, expected {sorted(self.tables)}"
            )
        files = {
            name: write_shard(data.tables[name], self.work_dir, shard_path(name, index))
            for name in self.tables
        }
        record = ShardRecord(index, files, json.loads(canonical_json(data.info)))
        write_json_atomic(self._record_path(index), record.to_json())  # last: vouches for the files
        return record

    @_writes
    def finalize(
        self, summarize: Callable[[list[ShardRecord]], dict[str, Any]] | None = None
    ) -> ArtifactResult:
        """Write the manifest and make the artifact visible, once every shard is done.

        Returns the complete artifact (computed=False if it was already complete and sound).
        Raises ArtifactError naming the shards still missing otherwise.
        `summarize(records)` gives the manifest's info (each shard's own info is kept under
        `SHARD_INFO_KEY`).
        """
        if self.prepare():
            return ArtifactResult(self.stage, self.key, self.final_dir, False, self.complete())
        with artifact_lock(self.store, self.stage, self.key):
            if self.final_dir.exists():  # finalized by another process since prepare()
                manifest = verify_artifact(self.final_dir, self.stage, self.stage_version)
                self._check_manifest(manifest)
                return ArtifactResult(self.stage, self.key, self.final_dir, False, manifest)
            records = [self.done_record(i) for i in range(self.n_shards)]
            missing = [i for i, r in enumerate(records) if r is None]
            if missing:
                shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
                raise ArtifactError(
                    f"{self.stage}/{self.key}: {len(missing)} of {self.n_shards} shards not done ({shown})"
                )
            done: list[ShardRecord] = [r for r in records if r is not None]
            self._drop_strays(done)
            info = dict(summarize(done) if summarize else {})
            info[SHARD_INFO_KEY] = [r.info for r in done]
            manifest = write_manifest(
                self.work_dir,
                stage=self.stage,
                key=self.key,
                stage_version=self.stage_version,
                config=self.config,
                inputs=self.inputs,
                tables={name: [r.tables[name] for r in done] for name in self.tables},
                files=[],
                info=info,
            )
            fsync_dir(self.work_dir)
            os.rename(self.work_dir, self.final_dir)
            fsync_dir(self.final_dir.parent)
            shutil.rmtree(self.records_dir, ignore_errors=True)
        return ArtifactResult(self.stage, self.key, self.final_dir, True, manifest)

    def _drop_strays(self, records: list[ShardRecord]) -> None:
        """Remove files no record lists (temp files of killed writers) before the rename.

        Holding the exclusive lock, no writer of this artifact is running, so every file not
        listed is a leftover; a live process's temp file is left alone all the same.
        """
        listed = {info.path for r in records for info in r.tables.values()}
        for path in sorted(p for p in self.work_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.work_dir).as_posix()
            if rel in listed:
                continue
            pid = path.name.rsplit("tmp-", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def build_sharded(
    artifact: ShardedArtifact,
    compute: Callable[[int], ShardData],
    summarize: Callable[[list[ShardRecord]], dict[str, Any]] | None = None,
    indices: Iterable[int] | None = None,
) -> ShardedBuild:
    """Compute every shard not yet done (in this thread, in index order), then finalize.

    `indices` limits which shards this call may compute (the rest must already be done or
    finalize raises); a sound complete artifact is returned at once.
    """
    if artifact.prepare():
        return ShardedBuild(artifact.finalize(summarize), [])
    computed = []
    for index in range(artifact.n_shards) if indices is None else indices:
        if artifact.ensure_shard(index, lambda i=index: compute(i)).computed:
            computed.append(index)
    return ShardedBuild(artifact.finalize(summarize), computed)
