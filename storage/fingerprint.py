"""Content hashes: canonical JSON for configs, SHA-256 for files, artifact keys for stages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

KEY_LENGTH = 16  # hex digits of an artifact key: 64 bits, plenty for one store


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    raise TypeError(f"cannot fingerprint {type(obj).__name__}")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, pydantic models and paths allowed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default, ensure_ascii=False)


def fingerprint(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def artifact_key(stage: str, config: Any, inputs: dict[str, str], version: int) -> str:
    """Key of a stage's artifact: hash of its config slice, its inputs' keys and its format version."""
    payload = {"stage": stage, "config": config, "inputs": inputs, "format_version": version}
    return fingerprint(payload)[:KEY_LENGTH]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides token ids: vocabulary, merges, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        backend = getattr(tokenizer, "_tokenizer", None)
    body = backend.to_str() if backend is not None else canonical_json(tokenizer.get_vocab())
    return fingerprint(
        {
            "tokenizer": body,
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "chat_template": getattr(tokenizer, "chat_template", None),
            "class": type(tokenizer).__name__,
        }
    )
