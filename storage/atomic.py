"""Atomic file writes: write to a temporary name in the same directory, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the system says (Linux), else by
    setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the permissions a plain `open`/`mkdir` would have
    given (0666 / 0777 less the umask), as transformers' own files have. Some writers create
    private files whatever the umask (safetensors writes weights 0600; `tempfile.mkdtemp` makes
    0700 directories), which other users of a shared machine then cannot read. Links are left
    alone."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = dir_mode if path.is_dir() else file_mode
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` unique to this process: readers never mistake it for the real file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it onto `path`.

    On any error the temporary file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """Write `obj` as indented UTF-8 JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=default) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
