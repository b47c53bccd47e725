"""Fold an IAV head into a plain Hugging Face checkpoint: ``lm_head = W_b + α W_a``.

The result loads with ``AutoModelForCausalLM.from_pretrained`` and no project code, and
decodes at exactly the base model's cost in any engine that reads HF checkpoints. Tied
input/output embeddings are untied in the export (the input embeddings keep the base's
weights). Only IAV heads merge: CALM's modulation depends on the context and position, so
it is not a fixed linear map.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

import alignheads
from alignheads.models.head_io import CONFIG_FILE, load_head, read_head_file
from alignheads.models.iav import IAVHead
from alignheads.storage.atomic import follow_umask

__all__ = ["MERGE_RECORD", "merge_iav", "merged_lm_head"]

MERGE_RECORD = "alignheads_merge.json"


def merged_lm_head(head: IAVHead, alpha: float, *, dtype: torch.dtype | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``W_b + α W_a`` (and the base bias), summed in float32."""
    weight = head.base.weight.detach().float() + float(alpha) * head.align.weight.detach().float()
    dtype = dtype or head.dtype
    layer = nn.Linear(
        head.config.hidden_size,
        head.config.vocab_size,
        bias=head.base.bias is not None,
        dtype=dtype,
        device=weight.device,
    )
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if head.base.bias is not None:
            layer.bias.copy_(head.base.bias.detach().to(dtype))
    return layer


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    heads_dir, out = Path(heads_dir), Path(out_dir)
    record = read_head_file(heads_dir)
    if record.head_type != IAVHead.head_type:
        raise ValueError(
            f"{heads_dir / CONFIG_FILE}: head_type is {record.head_type!r}; only IAV heads merge into a "
            "checkpoint (CALM's modulation depends on context and position, not a fixed lm_head)"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass overwrite=True (--overwrite) to replace it")
    source = str(base_model) if base_model is not None else record.base_model.name_or_path
    if source is None:
        raise ValueError(f"{heads_dir / CONFIG_FILE}: no base model id recorded; pass base_model")
    if revision is None and base_model is None:
        revision = record.base_model.revision
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)

    from alignheads.loading import MODEL_LOADING

    with MODEL_LOADING:  # see alignheads.loading: from_pretrained is not thread-safe
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    head = load_head(heads_dir, model, ignore_base_id=ignore_base_id)
    old = model.get_output_embeddings()
    model.set_output_embeddings(merged_lm_head(head, alpha, dtype=old.weight.dtype).to(old.weight.device))
    _untie(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        merge_record = {
            "alignheads_version": alignheads.__version__,
            "alpha": float(alpha),
            "head_dir": str(heads_dir.resolve()),
            "head_type": record.head_type,
            "base_model": source,
            "revision": revision,
        }
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
