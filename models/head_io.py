"""Head directories: ``head_config.json`` + ``head_model.safetensors``. No pickle anywhere.

``head_config.json`` records the format (name and version), the head type, the base model
(id, revision, vocabulary and hidden sizes), the head's hyperparameters, optional training
settings and the package version. ``head_model.safetensors`` holds exactly the head's
parameters under their ``named_parameters()`` names. Files are written atomically (temp
name, fsync, rename) and the JSON last, so a directory with a config is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import alignheads
from alignheads.models.aligned import AlignedLM
from alignheads.models.head_base import LogitHead, lm_output_layer
from alignheads.models.head_errors import HeadFormatError, HeadMismatchError
from alignheads.models.registry import head_class
from alignheads.storage.atomic import atomic_path, write_bytes_atomic

__all__ = [
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "BaseModelInfo",
    "HeadFile",
    "HeadFormatError",
    "HeadMismatchError",
    "check_base",
    "load_aligned",
    "load_head",
    "read_head_file",
    "save_head",
]

FORMAT_NAME = "alignheads-head"
FORMAT_VERSION = 1
CONFIG_FILE = "head_config.json"
WEIGHTS_FILE = "head_model.safetensors"


def _normalise_id(name_or_path: str | None) -> str | None:
    """Local directories become absolute paths; hub ids stay as they are; '' becomes None."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


class BaseModelInfo(BaseModel):
    """The base model a head belongs to."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str | None = Field(None, description="Hub id or absolute local path")
    revision: str | None = Field(None, description="Hub revision or commit, when known")
    vocab_size: int = Field(..., gt=0, description="Rows of the LM's output layer")
    hidden_size: int = Field(..., gt=0, description="Width of the LM's last hidden state")

    @classmethod
    def from_model(
        cls, model: nn.Module, *, name_or_path: str | None = None, revision: str | None = None
    ) -> BaseModelInfo:
        """Describe a transformers model; id and revision default to what the model knows."""
        weight = lm_output_layer(model).weight
        config = getattr(model, "config", None)
        name = name_or_path if name_or_path is not None else getattr(config, "_name_or_path", None)
        rev = revision if revision is not None else getattr(config, "_commit_hash", None)
        return cls(
            name_or_path=_normalise_id(name),
            revision=rev,
            vocab_size=weight.shape[0],
            hidden_size=weight.shape[1],
        )


class HeadFile(BaseModel):
    """The contents of ``head_config.json``."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["alignheads-head"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    head_type: str
    base_model: BaseModelInfo
    hyperparameters: dict[str, Any]
    training: dict[str, Any] = Field(default_factory=dict)
    alignheads_version: str


def save_head(
    head: LogitHead,
    out_dir: str | Path,
    *,
    base_model: nn.Module | BaseModelInfo,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``head`` to ``out_dir`` (created) and return the directory.

    base_model: the transformers model the head was trained on (id, revision and sizes are
    read from it) or an explicit :class:`BaseModelInfo`; training: JSON-able settings to
    keep with the head (loss weights, learning rate, steps, data key...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = base_model if isinstance(base_model, BaseModelInfo) else BaseModelInfo.from_model(base_model)
    if (info.vocab_size, info.hidden_size) != (head.config.vocab_size, head.config.hidden_size):
        raise HeadMismatchError(
            f"head sized vocabulary {head.config.vocab_size} x hidden {head.config.hidden_size} "
            f"does not fit base vocabulary {info.vocab_size} x hidden {info.hidden_size}"
        )
    record = HeadFile(
        head_type=head.head_type,
        base_model=info,
        hyperparameters=head.config.model_dump(mode="json"),
        training=dict(training or {}),
        alignheads_version=alignheads.__version__,
    )
    text = json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    tensors = {name: param.detach().to("cpu").contiguous() for name, param in head.named_parameters()}
    metadata = {"format": "pt", "alignheads_format": FORMAT_NAME, "head_type": head.head_type}
    (out / CONFIG_FILE).unlink(missing_ok=True)  # the config marks a complete directory: it goes last
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_header(tmp)
    write_bytes_atomic(out / CONFIG_FILE, text.encode("utf-8"))
    return out


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors header with its keys sorted, in place and at the same length.

    safetensors writes `__metadata__` in hash-map order, which changes from process to process;
    sorted, the same head gives the same bytes (and checksum) whichever process saved it.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # cannot happen: the same keys and values, reordered
            raise HeadFormatError(f"{path}: header grew from {size} to {len(text)} bytes when sorted")
        fh.seek(8)
        fh.write(text.ljust(size, b" "))


# Pickle-based weight files: loading one can run arbitrary code, so they are refused unread.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def refuse_pickles(head_dir: Path) -> None:
    """Raise HeadFormatError when `head_dir` is, or holds instead of safetensors, pickled weights."""
    if head_dir.is_file() and head_dir.suffix.lower() in PICKLE_SUFFIXES:
        found = [head_dir]
    elif head_dir.is_dir() and not (head_dir / WEIGHTS_FILE).is_file():
        found = sorted(p for p in head_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    else:
        return
    if found:
        raise HeadFormatError(
            f"{found[0]}: pickled weights are never loaded (unpickling can run arbitrary code); "
            f"a head is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
        )


def read_head_file(head_dir: str | Path) -> HeadFile:
    """Parse and validate ``head_config.json`` of ``head_dir``."""
    refuse_pickles(Path(head_dir))
    path = Path(head_dir) / CONFIG_FILE
    if not path.is_file():
        raise HeadFormatError(f"{path}: not found (is {head_dir} a head directory?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HeadFormatError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(raw, dict):
        if raw.get("format") != FORMAT_NAME:
            raise HeadFormatError(
                f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        if raw.get("format_version") != FORMAT_VERSION:
            raise HeadFormatError(
                f"{path}: field 'format_version' is {raw.get('format_version')!r}; "
                f"this alignheads reads version {FORMAT_VERSION}"
            )
    try:
        return HeadFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"field '{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
        raise HeadFormatError(f"{path}: {problems}") from None


def check_base(
    record: HeadFile, base: nn.Module | BaseModelInfo, *, ignore_base_id: bool = False, where: str = ""
) -> None:
    """Raise :class:`HeadMismatchError` naming every property of ``base`` that differs.

    Compared: the model id (when both are known, unless ``ignore_base_id``), the
    vocabulary size and the hidden size. Revisions are recorded, not compared.
    """
    info = base if isinstance(base, BaseModelInfo) else BaseModelInfo.from_model(base)
    saved = record.base_model
    problems = []
    if (
        not ignore_base_id
        and saved.name_or_path is not None
        and info.name_or_path is not None
        and saved.name_or_path != _normalise_id(info.name_or_path)
    ):
        problems.append(
            f"model id: head trained on {saved.name_or_path!r}, given {info.name_or_path!r} "
            "(pass ignore_base_id=True if it is the same model in another place)"
        )
    if saved.vocab_size != info.vocab_size:
        problems.append(f"vocabulary size: head {saved.vocab_size}, base {info.vocab_size}")
    if saved.hidden_size != info.hidden_size:
        problems.append(f"hidden size: head {saved.hidden_size}, base {info.hidden_size}")
    if problems:
        prefix = f"{where}: " if where else ""
        raise HeadMismatchError(f"{prefix}the head does not match this base model: " + "; ".join(problems))


def load_head(
    head_dir: str | Path,
    base_model: nn.Module | BaseModelInfo | None = None,
    *,
    ignore_base_id: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LogitHead:
    """Read the head in ``head_dir``; with ``base_model``, first check that it fits it.

    ``dtype`` defaults to the stored one; ``device`` to the base model's (else CPU).
    """
    head_dir = Path(head_dir)
    record = read_head_file(head_dir)
    if base_model is not None:
        check_base(record, base_model, ignore_base_id=ignore_base_id, where=str(head_dir))
    if device is None and isinstance(base_model, nn.Module):
        device = lm_output_layer(base_model).weight.device
    try:
        cls = head_class(record.head_type)
    except ValueError as exc:
        raise HeadFormatError(f"{head_dir / CONFIG_FILE}: field 'head_type': {exc}") from None
    try:
        config = cls.config_class().model_validate(record.hyperparameters)
    except ValidationError as exc:
        problems = "; ".join(f"'{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
        raise HeadFormatError(f"{head_dir / CONFIG_FILE}: field 'hyperparameters' {problems}") from None

    weights_path = head_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise HeadFormatError(f"{weights_path}: not found")
    tensors = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = handle.get_tensor(key)
    except SafetensorError as exc:  # a truncated file, or another format under this name
        raise HeadFormatError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    with torch.device("meta"):
        head = cls(config)
    expected = {name for name, _ in head.named_parameters()}
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        raise HeadFormatError(
            f"{weights_path}: tensor names do not match a {record.head_type} head: "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for name, param in head.named_parameters():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise HeadFormatError(
                f"{weights_path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                f"the config implies {tuple(param.shape)}"
            )
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    head.load_state_dict(tensors, strict=True, assign=True)
    return head.to(device or "cpu")


def load_aligned(
    head_dir: str | Path,
    model: nn.Module,
    *,
    alpha: float = 1.0,
    ignore_base_id: bool = False,
    dtype: torch.dtype | None = None,
) -> AlignedLM:
    """Load the head in ``head_dir`` onto ``model`` and return the :class:`AlignedLM`."""
    head = load_head(head_dir, model, ignore_base_id=ignore_base_id, dtype=dtype)
    return AlignedLM(model, head, alpha=alpha)
