"""Writing to the store fails for reasons the user must fix (a read-only directory, a full disk,
no permission): say so in one line naming the place, instead of a traceback from deep inside
pyarrow or safetensors. Any partial output has already been removed by the atomic writers."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from alignheads.storage.manifest import ArtifactError

# errno -> what the user should do about it
_REMEDIES = {
    errno.EROFS: "the store is on a read-only file system; point --set store=DIR at a writable directory",
    errno.EACCES: "no permission to write there; point --set store=DIR at a directory you can write",
    errno.EPERM: "no permission to write there; point --set store=DIR at a directory you can write",
    errno.ENOSPC: "no space left on the device; free some space or point --set store=DIR elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or point --set store=DIR elsewhere",
}
_ERRNO_IN_TEXT = re.compile(r"errno (\d+)", re.IGNORECASE)  # pyarrow: "Detail: [errno 28] ..."


class StoreWriteError(ArtifactError):
    """The store cannot be written (read-only, full, no permission); the message names the place."""


def _errno_of(exc: OSError) -> int | None:
    if exc.errno is not None:
        return exc.errno
    found = _ERRNO_IN_TEXT.search(str(exc))
    return int(found.group(1)) if found else None


def _about_the_store(exc: OSError, code: int | None, store: Path) -> bool:
    """Read-only and full file systems only fail writes; a permission error is the store's only
    when it names a path inside it, or a directory above it (creating a new store creates its
    missing parents first), not, say, an unreadable input file."""
    if code in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return True
    if code in (errno.EACCES, errno.EPERM) and exc.filename:
        named, root = Path(os.path.abspath(exc.filename)), Path(os.path.abspath(store))
        return named.is_relative_to(root) or root.is_relative_to(named)
    return False


@contextlib.contextmanager
def writing(place: Path, store: Path) -> Iterator[None]:
    """Turn the OSErrors of writing into `store` that a user must fix into a StoreWriteError
    naming `place`; any other error passes unchanged."""
    try:
        yield
    except OSError as exc:
        code = _errno_of(exc)
        if not _about_the_store(exc, code, store):
            raise
        reason = os.strerror(code).lower()
        raise StoreWriteError(f"{place}: cannot write ({reason}): {_REMEDIES[code]}") from exc
