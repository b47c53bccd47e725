"""Reference-pass stage: the `refcache` table, built shard by shard and resumable.

For every response token of every chosen and rejected response, the frozen reference model's
log-prob of the actual token and its top-k distribution (ids int32, log-probs float16 by
default), per sequence the summed log-prob, and optionally (`store_hidden`) the hidden state
that predicts each token (in `hidden_dtype`, float32 by default) together with, per sequence,
the float32 sum of the hidden states before its first predicting position (so CALM's causal
context can be rebuilt from the cache without the backbone). Every reference value comes from
the model's own full-precision states; float32 hidden states are exactly those states, so a
head trained from the cache (`features: cached`) sees what the backbone gives it
(`features: backbone`); float16 ones are those states rounded. With `tail_draws` M > 0, also M
ids per token drawn from the reference's distribution outside its top k, with their log-probs
(what IAV's `kl: sampled` reads): each token's draws come from a hash of its place in the data
(its sequence's row in `tokenized` order and its rank there), so they do not depend on the
batches or shards it is scored in. Row layout: see
:mod:`alignheads.storage.refcache` (one row per (pair, side), chosen then rejected, pairs in
`tokenized` order).

The reference is, by default, the run's own model with its own `lm_head`; another model can be
configured (`refpass.reference_model`) only if its tokenizer is identical to the run's (the
token ids in `tokenized` must mean the same tokens to it). The manifest's config says which,
next to the reference's identity (`config.model`): `own` (whether the reference is the run's own
model, by weight identity: IAV then keeps its base head the model's `lm_head`) and, for another
reference, the run model's identity (`run_model`): training over the cache depends on the run's
model too, and the train key covers it through this key.

Shard `i` covers `tokenized` rows `[i · pairs_per_shard, (i + 1) · pairs_per_shard)` and is an
independent piece of work (a Prefect task in the flow); :mod:`alignheads.storage.sharded_artifact`
records each finished shard, so a killed run recomputes only the shards that are missing or
fail their checksum. The key hashes everything the numbers depend on: the model (Hub id +
revision, or a hash of a local directory's weights and config), its dtype, the tokenizer,
the tokenized data (and through it the data and the token limits), k, the storage dtype,
`store_hidden` (and with it `hidden_dtype`), `tail_draws` (when not 0: caches without draws keep
their keys), the shard size and the format version. Batch size,
device and task runner are not in the key: they change nothing but floating-point rounding and
speed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from prefect import task

from alignheads.config import ConfigError, ModelConfig, RefPassConfig
from alignheads.storage.artifacts import ArtifactResult
from alignheads.storage.fingerprint import artifact_key, file_sha256, fingerprint
from alignheads.storage.manifest import ArtifactError, Manifest, read_manifest, verify_artifact
from alignheads.storage.refcache import TABLE
from alignheads.storage.sharded_artifact import (
    ShardData,
    ShardedArtifact,
    ShardOutcome,
    ShardRecord,
    build_sharded,
)
from alignheads.storage.tables import read_table_rows
from alignheads.tasks.cached import StageResult, task_options

if TYPE_CHECKING:  # the reference model and its scoring need torch: imported where a shard is scored
    from alignheads.models.reference import ReferenceModel

__all__ = [
    "REFPASS_VERSION",
    "STAGE",
    "RefPassPlan",
    "check_refcache",
    "compute_refpass_shard",
    "finalize_refpass",
    "model_identity",
    "plan_refpass",
    "refpass_artifact",
    "run_refpass",
    "run_refpass_shard",
]

log = logging.getLogger(__name__)

STAGE = "refpass"
# 2: `prefix_hidden_sum` column with `store_hidden` (caches of version 1 lack it)
# 3: `hidden` in `hidden_dtype` (float32 by default; version 2 stored float16 states while its
#    reference values came from the float32 ones); `own` / `run_model` in `config.model`
REFPASS_VERSION = 3
# Files that decide a local model's logits: weights and architecture (not generation settings).
_MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")


@dataclass(frozen=True)
class RefPassPlan:
    """The reference pass's inputs, resolved, with the artifact key they hash to (JSON-able)."""

    key: str
    tokenize_path: str
    model_path: str
    model_revision: str | None
    model_dtype: str
    trust_remote_code: bool
    device: str
    k: int
    dtype: str
    store_hidden: bool
    hidden_dtype: str
    batch_size: int
    pairs_per_shard: int
    n_pairs: int
    n_shards: int
    vocab_size: int
    hidden_size: int
    config: dict
    inputs: dict[str, str]
    tail_draws: int = 0  # ids drawn per token from the reference outside its top k

    def shard_rows(self, index: int) -> tuple[int, int]:
        """`tokenized` rows [start, stop) of shard `index`."""
        start = index * self.pairs_per_shard
        return start, min(self.n_pairs, start + self.pairs_per_shard)


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _weights_sha256(path: Path) -> str:
    """file_sha256, remembered per (path, size, mtime) for this process: a flow plans the stage
    once per run, but tests and notebooks plan it many times over multi-GB weights."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        _SHA_MEMO[memo_key] = file_sha256(path)
    return _SHA_MEMO[memo_key]


def model_identity(name_or_path: str, revision: str | None) -> dict[str, Any]:
    """What identifies a model's weights: a hash of a local directory's weight and config files,
    or the Hub id and revision (unpinned revisions cannot be told apart: pin one)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = sorted({p for pattern in _MODEL_FILES for p in path.glob(pattern) if p.is_file()})
        if not any(p.suffix == ".safetensors" for p in files):
            raise ValueError(f"{path}: no *.safetensors weights (only safetensors models are loaded)")
        return {"kind": "dir", "files": {p.name: _weights_sha256(p) for p in files}}
    if revision is None:
        log.warning(
            "model %s has no pinned revision: a new upload would not change the refcache key", name_or_path
        )
    return {"kind": "hub", "id": name_or_path, "revision": revision}


def plan_refpass(
    cfg: RefPassConfig,
    model: ModelConfig,
    model_path: str,
    tokenize_path: str | Path,
    tokenizer_fp: str,
) -> RefPassPlan:
    """Resolve the reference model and the data, check them, and compute the stage's key.

    model / model_path: the run's model section and where its model is (the world's model
    directory for the embedded default); tokenize_path: the complete `tokenize` artifact;
    tokenizer_fp: the run tokenizer's fingerprint. Raises ConfigError if a configured reference
    model's tokenizer differs from the run's, or if k exceeds the vocabulary.
    """
    from alignheads.loading import load_tokenizer, model_shape
    from alignheads.storage.fingerprint import tokenizer_fingerprint

    tokenize = read_manifest(Path(tokenize_path), "tokenize")
    if cfg.reference_model is not None:
        ref_path, ref_revision = cfg.reference_model, cfg.reference_revision
        ref_fp = tokenizer_fingerprint(load_tokenizer(ref_path, ref_revision, model.trust_remote_code))
        if ref_fp != tokenizer_fp:
            raise ConfigError(
                f"refpass.reference_model {ref_path}: its tokenizer differs from the run's "
                f"(fingerprint {ref_fp[:12]}… vs {tokenizer_fp[:12]}…), so the cached token ids would "
                "not mean the same tokens to it; use a reference model with the same tokenizer"
            )
        run_identity = model_identity(model_path, model.revision)
        own_model = model_identity(ref_path, ref_revision) == run_identity
    else:
        ref_path, ref_revision = model_path, model.revision
        own_model, run_identity = True, None
    vocab_size, hidden_size = model_shape(ref_path, ref_revision, model.trust_remote_code)
    if cfg.k > vocab_size:
        raise ConfigError(
            f"refpass.k = {cfg.k} exceeds the vocabulary of the reference model {ref_path} "
            f"({vocab_size} tokens); choose k <= {vocab_size}"
        )
    n_pairs = sum(s.rows for s in tokenize.tables["tokenized"])
    config = {
        # the reference's identity; whether it is the run's own model (IAV then keeps its base head
        # the lm_head); for another reference, the run model's identity: the cache serves only this
        # run model's training, and the train key covers it through this key
        "model": model_identity(ref_path, ref_revision)
        | {"own": own_model, "run_model": None if own_model else run_identity},
        "model_dtype": model.dtype,
        "k": cfg.k,
        "dtype": cfg.dtype,
        "store_hidden": cfg.store_hidden,
        "hidden_dtype": cfg.hidden_dtype if cfg.store_hidden else None,
        "pairs_per_shard": cfg.pairs_per_shard,
        "max_prompt_length": tokenize.config["max_prompt_length"],
        "max_response_length": tokenize.config["max_response_length"],
    }
    if cfg.tail_draws:  # only then: a cache without draws keeps the key it always had
        config["tail_draws"] = cfg.tail_draws
    inputs = {"tokenize": tokenize.key, "data": tokenize.inputs["data"], "tokenizer": tokenizer_fp}
    return RefPassPlan(
        key=artifact_key(STAGE, config, inputs, REFPASS_VERSION),
        tokenize_path=str(tokenize_path),
        model_path=ref_path,
        model_revision=ref_revision,
        model_dtype=model.dtype,
        trust_remote_code=model.trust_remote_code,
        device=cfg.device,
        k=cfg.k,
        dtype=cfg.dtype,
        store_hidden=cfg.store_hidden,
        hidden_dtype=cfg.hidden_dtype,
        batch_size=cfg.batch_size,
        pairs_per_shard=cfg.pairs_per_shard,
        tail_draws=cfg.tail_draws,
        n_pairs=n_pairs,
        n_shards=max(1, math.ceil(n_pairs / cfg.pairs_per_shard)),
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        config=config,
        inputs=inputs,
    )


def refpass_artifact(store: Path, plan: RefPassPlan) -> ShardedArtifact:
    """The sharded artifact this plan builds (nothing is read or written yet)."""
    return ShardedArtifact(
        Path(store), STAGE, plan.key, REFPASS_VERSION, plan.config, plan.inputs, plan.n_shards, (TABLE,)
    )


def _reference(plan: RefPassPlan, reference: ReferenceModel | None) -> ReferenceModel:
    from alignheads.models.reference import load_reference

    if reference is None:
        reference = load_reference(
            plan.model_path, plan.model_revision, plan.model_dtype, plan.trust_remote_code, plan.device
        )
    if reference.vocab_size != plan.vocab_size:
        raise ValueError(
            f"reference model {plan.model_path}: output layer has {reference.vocab_size} rows, "
            f"its config says {plan.vocab_size}"
        )
    return reference


class _Ticking:
    """A ReferenceModel whose `score_batch` advances a progress bar by the batch's sequences
    (everything else is the model's own)."""

    def __init__(self, reference: ReferenceModel, bar: Any) -> None:
        self._reference, self._bar = reference, bar

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reference, name)

    def score_batch(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        scores = self._reference.score_batch(batch, *args, **kwargs)
        self._bar.update(len(scores.seq_logprobs))
        return scores


def _token_lists(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A ``list<int>`` column as (values ``(M,)``, offsets ``(R + 1,)`` from 0): row ``r``'s
    tokens are ``values[offsets[r]:offsets[r + 1]]`` (views of the column's buffers)."""
    arr = column.combine_chunks()
    # a sliced list array keeps its parent's values: its offsets index into them
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy()[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


def _first_row_outside(values: np.ndarray, offsets: np.ndarray, vocab_size: int) -> int | None:
    """The first row (of ``offsets``, see :func:`_token_lists`) holding a token id outside
    ``0 .. vocab_size − 1``, or None."""
    outside = np.flatnonzero((values < 0) | (values >= vocab_size))
    if not outside.size:
        return None
    return int(np.searchsorted(offsets, outside[0], side="right")) - 1


def compute_refpass_shard(
    plan: RefPassPlan, index: int, reference: ReferenceModel | None = None, progress: bool = True
) -> ShardData:
    """Score shard `index`'s pairs (chosen and rejected) and build its refcache rows, with a
    progress bar over the shard's sequences (`progress`)."""
    from tqdm.auto import tqdm

    from alignheads.models.reference import score_sequences
    from alignheads.storage.refcache import build_rows

    reference = _reference(plan, reference)
    start, stop = plan.shard_rows(index)
    pairs = read_table_rows(Path(plan.tokenize_path), "tokenized", start, stop)
    fields = {}
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        values, offsets = _token_lists(pairs.column(name))
        row = _first_row_outside(values, offsets, plan.vocab_size)
        if row is not None:
            raise ValueError(
                f"{plan.tokenize_path}: tokenized row {start + row}, field '{name}': token id "
                f"outside the reference model's vocabulary (0..{plan.vocab_size - 1})"
            )
        # numpy views, one per row: pack_batch copies them without a Python int per token
        bounds = offsets.tolist()
        fields[name] = [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    prompts, chosen, rejected = fields["prompt_ids"], fields["chosen_ids"], fields["rejected_ids"]
    # sequences interleaved chosen/rejected per pair: the row order of the refcache table
    seq_prompts = [p for p in prompts for _ in range(2)]
    seq_responses = [r for pair in zip(chosen, rejected, strict=True) for r in pair]
    desc = f"reference pass, shard {index + 1}/{plan.n_shards}"
    with tqdm(total=len(seq_responses), desc=desc, unit="seq", disable=not progress, leave=False) as bar:
        # padding id 0: right padding is never attended to by a causal model, any valid id will do
        # a sequence's key is its row in the tokenized table's chosen/rejected order: a token's tail
        # draws depend on which token it is, not on the shard or the batch it is scored in
        keys = range(2 * start, 2 * start + len(seq_responses))
        scores = score_sequences(
            _Ticking(reference, bar), seq_prompts, seq_responses, plan.k, plan.batch_size, 0,
            plan.store_hidden, plan.hidden_dtype, plan.tail_draws, keys,
        )  # fmt: skip
    table = build_rows(pairs, start, scores, plan.k, plan.dtype)
    info = {
        "index": index,
        "pairs": pairs.num_rows,
        "response_tokens": int(sum(len(r) for r in seq_responses)),
        "scored_tokens": int(scores.counts.sum()),
    }
    return ShardData(tables={TABLE: table}, info=info)


def _summarize(plan: RefPassPlan):
    def summarize(records: list[ShardRecord]) -> dict[str, Any]:
        return {
            "pairs": sum(r.info["pairs"] for r in records),
            "scored_tokens": sum(r.info["scored_tokens"] for r in records),
            "shards": len(records),
            "model": plan.model_path,
            "revision": plan.model_revision,
            "vocab_size": plan.vocab_size,
            "hidden_size": plan.hidden_size,
            "k": plan.k,
            "dtype": plan.dtype,
            "store_hidden": plan.store_hidden,
            "hidden_dtype": plan.hidden_dtype if plan.store_hidden else None,
            "tail_draws": plan.tail_draws,
            "batch_size": plan.batch_size,
        }

    return summarize


def run_refpass_shard(
    store: Path, plan: RefPassPlan, index: int, reference: ReferenceModel | None = None
) -> ShardOutcome:
    """Make sure shard `index` is done (computing it unless a verified one is on disk)."""
    artifact = refpass_artifact(store, plan)
    return artifact.ensure_shard(index, lambda: compute_refpass_shard(plan, index, reference))


def run_refpass(store: Path, plan: RefPassPlan, reference: ReferenceModel | None = None) -> ArtifactResult:
    """Build the refcache artifact: compute the shards not yet done, then finalize (write the
    manifest, make it visible). A sound complete artifact is returned without any work."""
    artifact = refpass_artifact(store, plan)
    build = build_sharded(
        artifact, lambda index: compute_refpass_shard(plan, index, reference), _summarize(plan)
    )
    if build.computed_shards:
        log.info("refpass %s: computed shards %s", plan.key, build.computed_shards)
    return build.result


def finalize_refpass(store: Path, plan: RefPassPlan) -> ArtifactResult:
    """Finalize after every shard is done (raises ArtifactError naming the missing shards)."""
    return refpass_artifact(store, plan).finalize(_summarize(plan))


def check_refcache(path: str | Path, plan: RefPassPlan | None = None, verify: bool = True) -> Manifest:
    """Open a refcache artifact for reading; with `plan`, refuse one built under other settings
    (another model, tokenizer, data, k, dtype, ...) instead of using it silently."""
    path = Path(path)
    manifest = (
        verify_artifact(path, STAGE, REFPASS_VERSION)
        if verify
        else read_manifest(path, STAGE, REFPASS_VERSION)
    )
    if plan is not None:
        want, found = (
            {"config": plan.config, "inputs": plan.inputs},
            {"config": manifest.config, "inputs": manifest.inputs},
        )
        if fingerprint(want) != fingerprint(found):
            diff = [
                f"{section}.{k}"
                for section in ("config", "inputs")
                for k in sorted(set(want[section]) | set(found[section]))
                if fingerprint(want[section].get(k)) != fingerprint(found[section].get(k))
            ]
            raise ArtifactError(
                f"{path}: refcache built under other settings (differs in {', '.join(diff)}); "
                "it cannot serve this run"
            )
    return manifest


def shard_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a refpass shard task: the artifact key and the shard index."""
    return f"refpass-{parameters['key']}-shard-{parameters['index']:05d}"


@task(
    name="refpass-shard",
    task_run_name="refpass-shard-{index}",
    cache_key_fn=shard_cache_key,
    persist_result=True,
    result_serializer="json",
)
def refpass_shard_task(store: str, key: str, plan: dict[str, Any], index: int) -> dict[str, Any]:
    """One shard of the reference pass as a cached Prefect task (mapped over the task runner)."""
    outcome = run_refpass_shard(Path(store), RefPassPlan(**plan), index)
    return {"index": index, "computed": outcome.computed, "info": outcome.record.info}


@task(**task_options(STAGE))
def refpass_task(store: str, key: str, plan: dict[str, Any]) -> StageResult:
    """The reference pass's finalisation as a cached Prefect task: every shard is normally done
    by now; any that is not (or fails its checksum) is computed here."""
    return StageResult.of(run_refpass(Path(store), RefPassPlan(**plan)))
