"""Tokenization of preference pairs: prompt and response token ids, truncated, with flags.

Prompt and responses are tokenized separately, as TRL does:
- the prompt with the tokenizer's own special tokens, unless its text already starts with the
  BOS token text (a chat template put it there): no doubled BOS; it is cut from the LEFT, keeping
  its last tokens (and a leading BOS, which stays first);
- each response without special tokens, then EOS appended exactly once (an EOS already at its
  end, as text or id, is not doubled); it is cut from the RIGHT to `max_response_length` tokens,
  and a cut response carries no EOS (it did not end there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from alignheads.config import TokenizeConfig
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.tables import read_table, write_table
from alignheads.tasks.cached import StageResult, task_options

__all__ = [
    "TOKENIZED_SCHEMA",
    "TokenizePlan",
    "plan_tokenize",
    "run_tokenize",
    "tokenize_pairs",
    "truncate_prompt",
    "truncate_response",
]

TOKENIZED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("chosen_len", pa.int32()),
        ("rejected_len", pa.int32()),
        ("prompt_truncated", pa.bool_()),
        ("chosen_truncated", pa.bool_()),
        ("rejected_truncated", pa.bool_()),
    ]
)
INT32_MAX = 2**31 - 1
_TEXT_COLUMNS = ("prompt", "chosen", "rejected")


def truncate_prompt(ids: list[int], max_length: int, bos_id: int | None) -> tuple[list[int], bool]:
    """Keep the last `max_length` tokens; a leading BOS stays the first token. Returns (ids, truncated)."""
    if len(ids) <= max_length:
        return ids, False
    if bos_id is not None and ids and ids[0] == bos_id:
        keep = max_length - 1
        return [ids[0], *ids[len(ids) - keep :]] if keep > 0 else [ids[0]], True
    return ids[len(ids) - max_length :], True


def truncate_response(ids: list[int], max_length: int, eos_id: int) -> tuple[list[int], bool]:
    """Append EOS unless already last, then keep the first `max_length` tokens (no EOS if cut)."""
    full = ids if ids and ids[-1] == eos_id else [*ids, eos_id]
    if len(full) <= max_length:
        return full, False
    return full[:max_length], True


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(
        texts,
        add_special_tokens=add_special_tokens,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]


def _encode_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Batched: prompts already starting with the BOS text get no special tokens, the others do."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    with_bos = iter(_encode(tokenizer, [t for t, b in zip(texts, has_bos, strict=True) if b], False))
    without = iter(_encode(tokenizer, [t for t, b in zip(texts, has_bos, strict=True) if not b], True))
    return [next(with_bos) if b else next(without) for b in has_bos]


def _encode_responses(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Batched, without special tokens; an EOS text at the end (trailing whitespace aside) is kept as
    the final token so that it is not appended a second time."""
    eos = tokenizer.eos_token
    cleaned = []
    for text in texts:
        stripped = text.rstrip()
        cleaned.append(stripped if eos and stripped.endswith(eos) else text)
    return _encode(tokenizer, cleaned, False)


def _column(pairs: pa.Table, name: str, start: int, length: int) -> list[Any]:
    values = pairs.column(name).slice(start, length).to_pylist()
    if any(v is None for v in values):
        bad = values.index(None) + start
        raise ValueError(f"pairs row {bad}: column '{name}' is null")
    return values


def tokenize_pairs(
    pairs: pa.Table,
    tokenizer: Any,
    max_prompt_length: int,
    max_response_length: int,
    batch_size: int = 1024,
) -> pa.Table:
    """Token ids of every pair (schema `TOKENIZED_SCHEMA`, same row order as `pairs`).

    `pairs` needs the columns id, split, prompt, chosen, rejected (the `load_pairs` table).
    Lengths count tokens after truncation; a flag is set iff the untruncated sequence (responses:
    including their EOS) was longer than its maximum. Raises ValueError for a tokenizer without
    EOS, ids that do not fit int32, or bad arguments.
    """
    if max_prompt_length < 1 or max_response_length < 1:
        raise ValueError(
            f"max_prompt_length and max_response_length must be >= 1, got {max_prompt_length}, {max_response_length}"
        )
    missing = [c for c in ("id", "split", *_TEXT_COLUMNS) if c not in pairs.column_names]
    if missing:
        raise ValueError(f"pairs table lacks column(s) {', '.join(missing)}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(
            "the tokenizer has no EOS token (eos_token_id is None): responses cannot be terminated"
        )
    if len(tokenizer) - 1 > INT32_MAX:
        raise ValueError(f"tokenizer vocabulary of {len(tokenizer)} ids does not fit int32")
    bos_id = tokenizer.bos_token_id

    out: dict[str, list[Any]] = {name: [] for name in TOKENIZED_SCHEMA.names}
    for start in range(0, pairs.num_rows, batch_size):
        length = min(batch_size, pairs.num_rows - start)
        out["id"].extend(_column(pairs, "id", start, length))
        out["split"].extend(_column(pairs, "split", start, length))
        encoded = {
            "prompt": _encode_prompts(tokenizer, _column(pairs, "prompt", start, length)),
            "chosen": _encode_responses(tokenizer, _column(pairs, "chosen", start, length)),
            "rejected": _encode_responses(tokenizer, _column(pairs, "rejected", start, length)),
        }
        for name, batch in encoded.items():
            for ids in batch:
                if name == "prompt":
                    kept, cut = truncate_prompt(list(ids), max_prompt_length, bos_id)
                else:
                    kept, cut = truncate_response(list(ids), max_response_length, eos_id)
                out[f"{name}_ids"].append(kept)
                out[f"{name}_len"].append(len(kept))
                out[f"{name}_truncated"].append(cut)
    try:
        return pa.Table.from_pydict(out, schema=TOKENIZED_SCHEMA)
    except (pa.ArrowInvalid, OverflowError) as exc:
        raise ValueError(f"token ids do not fit int32: {exc}") from exc


# --- the tokenize stage: pairs artifact -> `tokenized` table ----------------------------------

STAGE = "tokenize"
TOKENIZE_VERSION = 1


@dataclass(frozen=True)
class TokenizePlan:
    """The tokenize stage's inputs, resolved, with the artifact key they hash to."""

    key: str
    data_path: str
    max_prompt_length: int
    max_response_length: int
    config: dict
    inputs: dict[str, str]


def plan_tokenize(
    cfg: TokenizeConfig, data_key: str, data_path: str | Path, tokenizer_fp: str
) -> TokenizePlan:
    """Key = hash(token limits, the data artifact's key, the tokenizer's fingerprint, format version)."""
    config = cfg.model_dump(mode="json")
    inputs = {"data": data_key, "tokenizer": tokenizer_fp}
    key = artifact_key(STAGE, config, inputs, TOKENIZE_VERSION)
    return TokenizePlan(key, str(data_path), cfg.max_prompt_length, cfg.max_response_length, config, inputs)


def run_tokenize(store: Path, plan: TokenizePlan, tokenizer: Any) -> ArtifactResult:
    """Tokenize the data artifact's `pairs` into the `tokenized` table unless it is already built."""

    def build(staging: Path) -> ArtifactContent:
        pairs = read_table(Path(plan.data_path), "pairs")
        table = tokenize_pairs(pairs, tokenizer, plan.max_prompt_length, plan.max_response_length)
        info = {
            "rows": table.num_rows,
            "truncated": {
                col: int(pc.sum(table.column(f"{col}_truncated")).as_py() or 0) for col in _TEXT_COLUMNS
            },
            "mean_tokens": {
                col: float(pc.mean(table.column(f"{col}_len")).as_py() or 0.0) for col in _TEXT_COLUMNS
            },
        }
        return ArtifactContent(tables={"tokenized": write_table(table, staging, "tokenized")}, info=info)

    return ensure_artifact(store, STAGE, plan.key, TOKENIZE_VERSION, plan.config, plan.inputs, build)


@task(**task_options(STAGE))
def tokenize_task(
    store: str, key: str, plan: dict[str, Any], tokenizer_source: dict[str, Any]
) -> StageResult:
    """The tokenize stage as a cached Prefect task; `tokenizer_source` names the run's tokenizer."""
    from alignheads.loading import load_tokenizer

    return StageResult.of(run_tokenize(Path(store), TokenizePlan(**plan), load_tokenizer(**tokenizer_source)))
