"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory `step-000123/` holds the head's parameters, AdamW's state, the
scheduler's state, the RNG states and the data position. It is written under a temporary
name and renamed, so `latest_checkpoint` only ever sees complete ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alignheads.storage.atomic import follow_umask, fsync_dir

TENSORS = "state.safetensors"
META = "state.json"


@dataclass(frozen=True)
class DataPosition:
    """Where training is in the data: epoch and micro-batches already consumed in it."""

    epoch: int
    micro_batch: int


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    step: int,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: DataPosition,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `directory/step-{step:06d}/` atomically; returns its path."""
    final = directory / f"step-{step:06d}"
    tmp = directory / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"head.{k}": v.detach().contiguous() for k, v in _unique_state(head).items()}
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / TENSORS))
    meta = {
        "step": step,
        "position": asdict(position),
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "rng_python": _python_rng_to_json(random.getstate()),
        "extra": extra or {},
    }
    (tmp / META).write_text(json.dumps(meta, indent=1, default=float))
    follow_umask(tmp)  # safetensors writes 0600
    for path in tmp.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(directory)
    return final


def _unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with tied tensors (an LM's input embedding and output layer) kept
    once, under their first name: safetensors refuses two names for one storage."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, value in module.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident not in seen:
            seen.add(ident)
            out[name] = value
    return out


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    if not directory.is_dir():
        return None
    done = sorted(p for p in directory.glob("step-*") if (p / META).is_file() and (p / TENSORS).is_file())
    return done[-1] if done else None


def prune_checkpoints(directory: Path, keep: int = 2) -> None:
    """Keep only the `keep` newest complete checkpoints."""
    done = sorted(p for p in directory.glob("step-*") if (p / META).is_file())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path, head: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, DataPosition, dict[str, Any]]:
    """Restore head, optimizer, scheduler and RNG states in place; returns (step, position, extra)."""
    tensors = load_file(str(path / TENSORS))
    meta = json.loads((path / META).read_text())
    state = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
    missing, unexpected = head.load_state_dict(state, strict=False)
    aliases = set(head.state_dict()) - set(_unique_state(head))
    if unexpected or set(missing) - aliases:
        raise ValueError(
            f"{path}: checkpoint does not fit the model (missing {missing}, unexpected {unexpected})"
        )
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_python_rng_from_json(meta["rng_python"]))
    return meta["step"], DataPosition(**meta["position"]), meta["extra"]


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
