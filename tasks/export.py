"""Exports in the formats other tools read: an IAV head as a PEFT LoRA adapter, the reference
cache as a TRL preference dataset (`alignheads export --format peft|trl`).

**PEFT** (:func:`export_peft`). ``<out>/adapter_config.json`` + ``adapter_model.safetensors``: a
LoRA adapter on the base model's output layer whose ``B A`` is the truncated SVD of IAV's ``W_a``
(:mod:`alignheads.models.lora_export`) and whose scale ``lora_alpha / r`` is α, so
``PeftModel.from_pretrained(base, out)`` gives the head's logits ``W_b h + α W_a h`` (exactly at
full rank; the model's own final-logit cap applies to the sum as it does to the head's). Only
the adapter's two matrices are written (`save_embedding_layers=False` in PEFT's terms). With
embeddings tied to ``lm_head`` the adapter still adds to the output layer only: use it unmerged
(merging it would write ``B A`` into the shared matrix, i.e. into the input embeddings too).
``alignheads_export.json`` records the head, the base, α, the rank and the relative error.

**TRL** (:func:`export_trl`). ``<out>/<split>.parquet`` for each split of a reference cache, one row
per pair in the cache's order: ``prompt, chosen, rejected`` (the pairs' texts, as the data stage
stored them: chat templates already rendered) and ``ref_chosen_logps, ref_rejected_logps`` (the
refcache's ``seq_logprob``: the reference's summed log-prob of each response, EOS included, over
the tokens alignheads scored). ``datasets.load_dataset("parquet", data_files=...)`` reads them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import alignheads
from alignheads.storage.atomic import atomic_path, fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "EXPORT_RECORD",
    "TRL_COLUMNS",
    "PeftExport",
    "TrlExport",
    "export_peft",
    "export_trl",
    "output_layer_name",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_RECORD = "alignheads_export.json"
TRL_COLUMNS = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")


@dataclass(frozen=True)
class PeftExport:
    out: Path
    rank: int
    full_rank: int
    alpha: float
    lora_alpha: float
    relative_error: float
    tied_embeddings: bool
    target_module: str


@dataclass(frozen=True)
class TrlExport:
    out: Path
    refpass_key: str
    files: dict[str, Path]  # split -> parquet file
    rows: dict[str, int]
    skipped_truncated: dict[str, int]


def output_layer_name(model: Any) -> str:
    """The dotted module name of the model's output layer (``lm_head`` for Llama)."""
    layer = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise ValueError(f"{type(model).__name__}: its output layer is not one of its modules")


def _tied(model: Any) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _publish(out: Path, overwrite: bool, fill) -> None:
    """Build the directory `out` under a temporary sibling name with `fill(tmp)`, fsync its files,
    then rename it into place (replacing an existing `out` only with `overwrite`)."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        for path in tmp.iterdir():
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- PEFT ------------------------------------------------------------------------------------------


def export_peft(
    heads_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    alpha: float = 1.0,
    base_model: str | None = None,
    revision: str | None = None,
    ignore_base_id: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> PeftExport:
    """Write IAV head `heads_dir` as a PEFT LoRA adapter on its base model's output layer.

    rank: the adapter's r (None: full rank, min(V, H), exact); alpha: the α the adapter applies
    (its `lora_alpha` is α·r, so its scale `lora_alpha / r` is α); base_model: Hub id or directory
    of the base (default: the one the head records, at its recorded revision). Raises
    `NotALoraError` for a CALM head (before loading anything) or an IAV head whose base head
    was trained, `HeadMismatchError` for a base that does not fit the head.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from alignheads.loading import load_causal_lm
    from alignheads.models.head_io import load_head, read_head_file
    from alignheads.models.lora_export import alignment_weight, lora_alpha_for, lora_factors, require_iav

    heads_dir, out = Path(heads_dir), Path(out_dir)
    record = read_head_file(heads_dir)
    require_iav(record.head_type)
    source = base_model if base_model is not None else record.base_model.name_or_path
    if not source:
        raise ValueError(f"{heads_dir}: the head records no base model; pass --base")
    if revision is None and base_model is None:
        revision = record.base_model.revision
    # the base in the dtype the head was trained in (its W_b is a copy of lm_head in that dtype)
    dtype = str(load_head(heads_dir).base.weight.dtype).removeprefix("torch.")
    model = load_causal_lm(source, revision, dtype, trust_remote_code)
    head = load_head(heads_dir, model, ignore_base_id=ignore_base_id)
    name = output_layer_name(model)
    factors = lora_factors(alignment_weight(head, model.get_output_embeddings()), rank)
    lora_alpha = lora_alpha_for(alpha, factors.rank)
    tied = _tied(model)
    config = LoraConfig(
        r=factors.rank,
        lora_alpha=lora_alpha,
        target_modules=[name],
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(source),
        revision=revision,
        inference_mode=True,
    )
    result = PeftExport(
        out=out,
        rank=factors.rank,
        full_rank=factors.full_rank,
        alpha=float(alpha),
        lora_alpha=lora_alpha,
        relative_error=factors.relative_error,
        tied_embeddings=tied,
        target_module=name,
    )
    # PEFT's own names for a LoRA's weights in a saved adapter (the adapter name is left out)
    tensors = {
        f"base_model.model.{name}.lora_A.weight": factors.A,
        f"base_model.model.{name}.lora_B.weight": factors.B,
    }

    def fill(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json_atomic(
            tmp / EXPORT_RECORD,
            {
                "format": "peft-lora",
                "alignheads_version": alignheads.__version__,
                "head_dir": str(heads_dir.resolve()),
                "head_type": record.head_type,
                "base_model": str(source),
                "revision": revision,
                "scaling": "lora_alpha / r = alpha",
                **{k: v for k, v in asdict(result).items() if k != "out"},
            },
        )

    _publish(out, overwrite, fill)
    return result


# --- TRL -------------------------------------------------------------------------------------------

_KEY = re.compile(r"^[0-9a-f]{8,64}$")


def newest_artifact(store: Path, stage: str) -> str:
    """The key of the most recently completed `stage` artifact in the store."""
    from alignheads.storage.artifacts import list_artifacts
    from alignheads.storage.manifest import read_manifest

    found = [(read_manifest(d).created_at, d.name) for d in list_artifacts(store, stage)]
    if not found:
        raise FileNotFoundError(
            f"no complete {stage} artifact in {Path(store) / stage}; run the pipeline first"
        )
    return max(found)[1]


def export_trl(
    store: str | Path,
    out_dir: str | Path,
    *,
    refpass_key: str | None = None,
    skip_truncated: bool = False,
    overwrite: bool = False,
) -> TrlExport:
    """Write the pairs of a reference cache with TRL's column names, one Parquet file per split.

    refpass_key: the reference pass to export (default: the newest complete one in the store);
    skip_truncated: leave out pairs whose prompt or responses the tokenize stage cut (their
    reference log-probs cover the cut sequences, which TRL would not reproduce unless it cuts
    them the same way).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from alignheads.storage.artifacts import artifact_dir
    from alignheads.storage.manifest import read_manifest
    from alignheads.storage.query import run_query

    store, out = Path(store).resolve(), Path(out_dir)
    key = refpass_key or newest_artifact(store, "refpass")
    if not _KEY.match(key):
        raise ValueError(f"refpass key {key!r} is not an artifact key (hex digits)")
    refpass = read_manifest(artifact_dir(store, "refpass", key), "refpass")
    tokenize_key = refpass.inputs["tokenize"]
    data_key = read_manifest(artifact_dir(store, "tokenize", tokenize_key), "tokenize").inputs["data"]
    sql = f"""
        SELECT c.split, p.prompt, p.chosen, p.rejected,
               c.seq_logprob AS ref_chosen_logps, r.seq_logprob AS ref_rejected_logps,
               (t.prompt_truncated OR t.chosen_truncated OR t.rejected_truncated) AS truncated
        FROM refcache c
        JOIN refcache r ON r.artifact = c.artifact AND r.pair_index = c.pair_index AND r.side = 'rejected'
        JOIN tokenized t ON t.artifact = '{tokenize_key}' AND t.id = c.id AND t.split = c.split
        JOIN pairs p ON p.artifact = '{data_key}' AND p.id = c.id AND p.split = c.split
        WHERE c.artifact = '{key}' AND c.side = 'chosen'
        ORDER BY c.pair_index
    """
    table = run_query(store, sql)
    expected = sum(s.rows for s in refpass.tables["refcache"]) // 2
    if table.num_rows != expected:
        raise ValueError(
            f"refpass {key}: {expected} pairs in the cache, {table.num_rows} matched to their texts "
            f"(tokenize {tokenize_key}, data {data_key}); is the store complete?"
        )
    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("ref_chosen_logps", pa.float64()),
            ("ref_rejected_logps", pa.float64()),
        ]
    )
    splits = sorted(set(table.column("split").to_pylist()))
    files, rows, skipped = {}, {}, {}
    parts = {}
    for split in splits:
        rows_of = table.filter(pc.equal(table.column("split"), split))
        cut = rows_of.filter(rows_of.column("truncated"))
        skipped[split] = cut.num_rows if skip_truncated else 0
        if skip_truncated:
            rows_of = rows_of.filter(pc.invert(rows_of.column("truncated")))
        elif cut.num_rows:
            log.warning(
                "%d %s pairs were cut by the tokenize stage; their ref_*_logps cover the cut sequences "
                "(--skip-truncated leaves them out)",
                cut.num_rows,
                split,
            )
        parts[split] = rows_of.select(list(TRL_COLUMNS)).cast(schema)
        rows[split] = parts[split].num_rows
        files[split] = out / f"{split}.parquet"

    def fill(tmp: Path) -> None:
        for split, part in parts.items():
            with atomic_path(tmp / f"{split}.parquet") as path:
                pq.write_table(part, path)
        write_json_atomic(
            tmp / EXPORT_RECORD,
            {
                "format": "trl-preference",
                "alignheads_version": alignheads.__version__,
                "refpass": key,
                "tokenize": tokenize_key,
                "data": data_key,
                "model": refpass.config.get("model"),
                "columns": list(TRL_COLUMNS),
                "rows": rows,
                "skipped_truncated": skipped,
            },
        )

    _publish(out, overwrite, fill)
    return TrlExport(out=out, refpass_key=key, files=files, rows=rows, skipped_truncated=skipped)
