"""Content-addressed artifacts: keys, build-once, reuse, corruption handling, concurrent builders."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from pathlib import Path

import pyarrow as pa
import pytest

from alignheads.storage.artifacts import ArtifactContent, ensure_artifact, list_artifacts
from alignheads.storage.fingerprint import artifact_key, canonical_json, fingerprint
from alignheads.storage.tables import read_table, write_table


def test_artifact_key_depends_on_config_inputs_and_version():
    base = artifact_key("data", {"a": 1, "b": [1, 2]}, {"world": "k1"}, 1)
    assert base == artifact_key("data", {"b": [1, 2], "a": 1}, {"world": "k1"}, 1)  # key order irrelevant
    assert len(base) == 16 and int(base, 16) >= 0
    others = {
        artifact_key("data", {"a": 2, "b": [1, 2]}, {"world": "k1"}, 1),
        artifact_key("data", {"a": 1, "b": [1, 2]}, {"world": "k2"}, 1),
        artifact_key("data", {"a": 1, "b": [1, 2]}, {"world": "k1"}, 2),
        artifact_key("tokenize", {"a": 1, "b": [1, 2]}, {"world": "k1"}, 1),
    }
    assert base not in others and len(others) == 4


def test_canonical_json_is_stable():
    assert canonical_json({"b": 1, "a": Path("x/y")}) == '{"a":"x/y","b":1}'
    assert fingerprint({"x": 1}) == hashlib.sha256(b'{"x":1}').hexdigest()
    assert fingerprint({"x": 1}) != fingerprint({"x": 1.5})


def _builder(calls: list):
    def build(staging: Path) -> ArtifactContent:
        calls.append(staging)
        (staging / "note.txt").write_text("made")
        return ArtifactContent(
            tables={"t": write_table(pa.table({"v": [1, 2, 3]}), staging, "t")}, info={"n": 3}
        )

    return build


def test_build_once_then_reuse(tmp_path):
    calls: list = []
    first = ensure_artifact(tmp_path, "stage", "abc", 1, {"c": 1}, {}, _builder(calls))
    assert first.computed and first.path == tmp_path / "stage" / "abc"
    assert [f.path for f in first.manifest.files] == ["note.txt"]
    assert read_table(first.path, "t").column("v").to_pylist() == [1, 2, 3]
    again = ensure_artifact(tmp_path, "stage", "abc", 1, {"c": 1}, {}, _builder(calls))
    assert not again.computed and len(calls) == 1
    assert again.manifest.info == {"n": 3}
    assert list_artifacts(tmp_path, "stage") == [first.path]
    # the staging directory is gone
    assert not [p for p in (tmp_path / "stage").iterdir() if p.name.startswith(".abc")]


def test_corrupt_artifact_is_moved_aside_and_rebuilt(tmp_path):
    calls: list = []
    res = ensure_artifact(tmp_path, "stage", "abc", 1, {}, {}, _builder(calls))
    (res.path / "note.txt").write_text("tampered")
    again = ensure_artifact(tmp_path, "stage", "abc", 1, {}, {}, _builder(calls))
    assert again.computed and len(calls) == 2
    assert (again.path / "note.txt").read_text() == "made"
    kept = [p for p in (tmp_path / "stage").iterdir() if p.name.startswith(".corrupt-abc-")]
    assert len(kept) == 1 and (kept[0] / "note.txt").read_text() == "tampered"


def test_failed_build_leaves_nothing_at_the_final_path(tmp_path):
    def broken(staging: Path) -> ArtifactContent:
        write_table(pa.table({"v": [1]}), staging, "t")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        ensure_artifact(tmp_path, "stage", "abc", 1, {}, {}, broken)
    assert not (tmp_path / "stage" / "abc").exists()
    assert list_artifacts(tmp_path, "stage") == []


def test_version_mismatch_rebuilds(tmp_path):
    calls: list = []
    ensure_artifact(tmp_path, "stage", "abc", 1, {}, {}, _builder(calls))
    res = ensure_artifact(tmp_path, "stage", "abc", 2, {}, {}, _builder(calls))
    assert res.computed and res.manifest.stage_version == 2 and len(calls) == 2


def _slow_build(store: str, out: str) -> None:
    def build(staging: Path) -> ArtifactContent:
        time.sleep(1.0)
        (staging / "pid.txt").write_text(str(mp.current_process().pid))
        return ArtifactContent()

    res = ensure_artifact(Path(store), "stage", "same", 1, {}, {}, build)
    Path(out).write_text("computed" if res.computed else "reused")


def test_two_processes_build_one_artifact_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_slow_build, args=(str(tmp_path), str(tmp_path / f"out{i}"))) for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = sorted((tmp_path / f"out{i}").read_text() for i in range(2))
    assert outcomes == ["computed", "reused"]
    assert list_artifacts(tmp_path, "stage") == [tmp_path / "stage" / "same"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifact_files_follow_the_umask(tmp_path, umask):
    """A writer that makes private files (safetensors writes weights 0600, `tempfile.mkdtemp`
    makes 0700 directories) does not leave them unreadable to the store's other users: an
    artifact's files and directories get what the umask gives (issue 21, item 8)."""
    import os
    import stat
    import tempfile

    def build(staging):
        fd = os.open(staging / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"x")
        os.close(fd)
        inner = Path(tempfile.mkdtemp(dir=staging))
        (inner / "a.json").write_text("{}")
        return ArtifactContent()

    previous = os.umask(umask)
    try:
        result = ensure_artifact(tmp_path, "train", "k", 1, {}, {}, build)
    finally:
        os.umask(previous)
    files, dirs = 0o666 & ~umask, 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [result.path, *result.path.rglob("*")]}
    want = {p.name: dirs if p.is_dir() else files for p in [result.path, *result.path.rglob("*")]}
    assert len(modes) == 5 and modes == want  # the artifact, 2 files, 1 directory, the manifest
