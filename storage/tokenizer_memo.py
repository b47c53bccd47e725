"""A store's memo of tokenizer fingerprints, keyed on the tokenizer's files.

Every run hashes its tokenizer (`storage.fingerprint.tokenizer_fingerprint`): the key of the data,
tokenize and reference-pass stages depends on it. Hashing needs the loaded tokenizer, and loading
one imports transformers and torch (2–3 s here), which a re-run whose every stage is cached would
otherwise pay for nothing. For a tokenizer in a local directory (the tiny world's model, a
checkpoint on disk) the fingerprint is therefore remembered under
``<store>/.cache/tokenizer-fingerprints/``, keyed on the SHA-256 of every file in the directory
except weights and on the transformers and tokenizers versions: any edit of a tokenizer file, or
another library version, misses the memo and loads the tokenizer again. A Hub id, or a tokenizer
that runs remote code, is always loaded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from alignheads.storage.atomic import write_json_atomic
from alignheads.storage.fingerprint import file_sha256, fingerprint

MEMO_DIR = Path(".cache") / "tokenizer-fingerprints"
MEMO_VERSION = 1
# weights do not decide token ids, and hashing a 13 GB checkpoint would cost more than loading
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
LIBRARIES = ("transformers", "tokenizers")


def _library_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def memo_key(source: dict[str, Any]) -> str | None:
    """The memo's key for a tokenizer `source` (`name_or_path`, `revision`, `trust_remote_code`):
    SHA-256 over the names and bytes of the directory's files other than weights, and the library
    versions; None where the tokenizer is not a local directory, or runs remote code."""
    path = Path(str(source["name_or_path"])).expanduser()
    if source.get("trust_remote_code") or not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))
    return fingerprint(
        {
            "files": [[p.name, file_sha256(p)] for p in files],
            "libraries": {name: _library_version(name) for name in LIBRARIES},
            "memo": MEMO_VERSION,
        }
    )


def memoized_fingerprint(store: Path, source: dict[str, Any], compute: Callable[[], str]) -> str:
    """The fingerprint of the tokenizer `source` names: from the store's memo when its files are
    unchanged since it was computed, else `compute()` (load and hash), then remembered.

    A memo that cannot be read (damaged, or written by a killed process) is computed again; one
    that cannot be written (a read-only store) is skipped: the fingerprint is still returned.
    """
    key = memo_key(source)
    if key is None:
        return compute()
    path = Path(store) / MEMO_DIR / f"{key[:32]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        found = json.loads(path.read_text())["fingerprint"]
        if isinstance(found, str) and len(found) == 64:
            return found
    value = compute()
    with contextlib.suppress(OSError):
        write_json_atomic(path, {"fingerprint": value, "name_or_path": str(source["name_or_path"])})
    return value
