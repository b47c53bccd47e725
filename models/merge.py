"""Fold an IAV head into a plain Hugging Face checkpoint: ``lm_head = W_b + α W_a``.

The result loads with ``AutoModelForCausalLM.from_pretrained`` and no project code, and
decodes at exactly the base model's cost in any engine that reads HF checkpoints. Tied
input/output embeddings are untied in the export (the input embeddings keep the base's
weights). Only IAV heads merge: CALM's modulation depends on the context and position, so
it is not a fixed linear map.

Several IAV dials on one LM merge the same way (:func:`merge_iav_dials`): ``lm_head`` becomes
``W_lm + Σ_i α_i W_a_i``, the logits of `AlignedLM(model, dials)` at that α vector.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import alignheads
from alignheads.models.dials import check_iav_dial, dial_alpha, fold_weights
from alignheads.models.head_base import lm_output_layer
from alignheads.models.head_io import CONFIG_FILE, load_head, read_head_file
from alignheads.models.iav import IAVHead
from alignheads.storage.atomic import follow_umask

__all__ = ["MERGE_RECORD", "merge_iav", "merge_iav_dials", "merged_dials_head", "merged_lm_head"]

MERGE_RECORD = "alignheads_merge.json"


def merged_lm_head(head: IAVHead, alpha: float, *, dtype: torch.dtype | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``W_b + α W_a`` (and the base bias), summed in float32."""
    weight = head.base.weight.detach().float() + float(alpha) * head.align.weight.detach().float()
    return _linear(weight, head.base.bias, dtype or head.dtype)


def merged_dials_head(
    lm_head: nn.Module,
    heads: Mapping[str, IAVHead],
    alpha: Mapping[str, float],
    *,
    dtype: torch.dtype | None = None,
) -> nn.Linear:
    """A new ``nn.Linear`` holding ``W_lm + Σ_i α_i W_a_i`` (and ``lm_head``'s bias), summed in float32
    (float64 for float64 weights; `models.dials.fold_weights`).

    lm_head: the LM's own output layer ``(V, H)``; heads: the IAV dials by name, each with ``W_b`` =
    ``lm_head`` (ValueError otherwise: `models.dials.check_iav_dial`); alpha: name → α (missing names
    0, unknown names ValueError). ``dtype`` defaults to ``lm_head``'s.
    """
    for name, head in heads.items():
        if not isinstance(head, IAVHead):
            raise ValueError(
                f"dial {name!r} is a {type(head).__name__}: only IAV dials merge into lm_head "
                "(CALM's modulation depends on context and position, not a fixed lm_head)"
            )
        check_iav_dial(name, head, lm_head)
    names = list(heads)
    coefs = dial_alpha(alpha, names).tolist()
    weights = [
        lm_head.weight.detach(),
        *(heads[name].align.weight.detach().to(lm_head.weight.device) for name in names),
    ]
    weight = fold_weights(weights, [1.0, *coefs])
    return _linear(weight, getattr(lm_head, "bias", None), dtype or lm_head.weight.dtype)


def _linear(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` of ``weight (V, H)`` (float32) and ``bias (V,)`` (or none) in ``dtype``."""
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device
    )
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
    return layer


def merge_iav_dials(model: nn.Module, heads: Mapping[str, IAVHead], alpha: Mapping[str, float]) -> nn.Module:
    """The plain LM with its output layer replaced by ``W_lm + Σ_i α_i W_a_i`` (:func:`merged_dials_head`),
    in place: ``model`` itself is returned, its input embeddings kept and untied from the new
    ``lm_head`` (``tie_word_embeddings`` off, so it saves and reloads as it decodes). Its logits are
    those of ``AlignedLM(model, heads)`` at that α. ``model`` must carry no installed head."""
    layer = model.get_output_embeddings()
    if lm_output_layer(model) is not layer:
        raise ValueError("this model carries an installed head; call .remove() on its AlignedLM first")
    model.set_output_embeddings(merged_dials_head(layer, heads, alpha))
    _untie(model)
    return model


def _untie(model: nn.Module) -> None:
    configs = {id(model.config): model.config}
    if hasattr(model.config, "get_text_config"):
        text = model.config.get_text_config()
        configs[id(text)] = text
    for config in configs.values():
        config.tie_word_embeddings = False


def merge_iav(
    heads_dir: str | Path,
    alpha: float,
    out_dir: str | Path,
    base_model: str | Path | None = None,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    ignore_base_id: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a plain HF checkpoint (model + tokenizer) whose ``lm_head`` is ``W_b + α W_a``.

    heads_dir: an IAV head directory; alpha: any float; out_dir: created (must not exist
    unless ``overwrite``); base_model: hub id or local directory of the base model,
    default the id recorded in the head (then ``revision`` defaults to the recorded one);
    dtype: weights dtype of the export (default: the base checkpoint's). The base must
    match the head (id, vocabulary, hidden size; ``ignore_base_id`` skips the id).
    The directory is assembled under a temporary name and renamed into place.
    Returns ``out_dir``.
    """
    heads_dir, out = Path(heads_dir), Path(out_dir)
    record = read_head_file(heads_dir)
    if record.head_type != IAVHead.head_type:
        raise ValueError(
            f"{heads_dir / CONFIG_FILE}: head_type is {record.head_type!r}; only IAV heads merge into a "
            "checkpoint (CALM's modulation depends on context and position, not a fixed lm_head)"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; choose another --out or pass overwrite=True (--overwrite) to replace it"
        )
    source = str(base_model) if base_model is not None else record.base_model.name_or_path
    if source is None:
        raise ValueError(f"{heads_dir / CONFIG_FILE}: no base model id recorded; pass base_model")
    if revision is None and base_model is None:
        revision = record.base_model.revision

    model, tokenizer = _load_base(source, revision, dtype, trust_remote_code)
    head = load_head(heads_dir, model, ignore_base_id=ignore_base_id)
    old = model.get_output_embeddings()
    model.set_output_embeddings(merged_lm_head(head, alpha, dtype=old.weight.dtype).to(old.weight.device))
    _untie(model)
    record = {"alpha": float(alpha), "head_dir": str(heads_dir.resolve()), "head_type": record.head_type}
    return _write_checkpoint(model, tokenizer, out, record | {"base_model": source, "revision": revision})


def merge_iav_dial_set(
    head_dirs: Mapping[str, str | Path],
    alpha: Mapping[str, float],
    out_dir: str | Path,
    base_model: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    ignore_base_id: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a plain HF checkpoint whose ``lm_head`` is ``W_lm + Σ_i α_i W_a_i`` for IAV dials
    (``head_dirs``: dial → head directory; ``alpha``: dial → α, missing dials at 0), as
    :func:`merge_iav` writes one head: it decodes exactly like the dials at that α vector, at the
    base model's cost. The base defaults to the model the first head records; every head must
    fit it and keep its ``lm_head`` as ``W_b`` (:func:`merge_iav_dials`). Returns ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass overwrite=True (--overwrite) to replace it")
    dial_alpha(alpha, list(head_dirs))  # unknown dials and non-numbers refused, naming them
    records = {name: read_head_file(Path(d)) for name, d in head_dirs.items()}
    # a dial at α = 0 adds nothing, whatever its family: only the turned-on dials must be IAV
    refused = [
        f"{name} ({r.head_type})" for name, r in records.items() if r.head_type != IAVHead.head_type and alpha.get(name)
    ]
    if refused:
        raise ValueError(
            f"only IAV dials merge into a checkpoint, not {', '.join(refused)} (CALM's modulation depends "
            "on context and position, not a fixed lm_head): set it to 0 or decode the dials unmerged"
        )
    first = next(iter(records.values())).base_model
    source = str(base_model) if base_model is not None else first.name_or_path
    if source is None:
        raise ValueError("the dials' heads record no base model id; pass base_model")
    revision = first.revision if base_model is None else None
    model, tokenizer = _load_base(source, revision, dtype, trust_remote_code)
    vector = {name: float(alpha.get(name, 0.0)) for name in head_dirs}
    if not any(vector.values()):
        raise ValueError("every dial is at 0: that is the base model itself; turn one on (e.g. --dial NAME=1)")
    heads = {name: load_head(Path(head_dirs[name]), model, ignore_base_id=ignore_base_id) for name, a in vector.items() if a}
    merge_iav_dials(model, heads, {name: vector[name] for name in heads})
    record = {"alpha": vector, "head_dirs": {n: str(Path(d).resolve()) for n, d in head_dirs.items()}, "head_type": "iav-dials"}
    return _write_checkpoint(model, tokenizer, out, record | {"base_model": source, "revision": revision})


def _load_base(source: str, revision: str | None, dtype: str | torch.dtype | None, trust_remote_code: bool):
    """(model, tokenizer) of the base checkpoint, in `dtype` (default: the checkpoint's own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignheads.loading import MODEL_LOADING

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    with MODEL_LOADING:  # see alignheads.loading: from_pretrained is not thread-safe
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _write_checkpoint(model: nn.Module, tokenizer: Any, out: Path, record: dict[str, Any]) -> Path:
    """Save the merged model, its tokenizer and the merge record (`MERGE_RECORD`) into `out`:
    assembled under a temporary name, fsynced, then renamed into place (replacing `out`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        merge_record = {"alignheads_version": alignheads.__version__, **record}
        (tmp / MERGE_RECORD).write_text(json.dumps(merge_record, indent=2, sort_keys=True) + "\n")
        for path in tmp.iterdir():
            if not path.is_file():
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        follow_umask(out)  # readable by others as the umask says (mkdtemp made it 0700)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
