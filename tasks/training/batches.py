"""Streaming preference batches from the store: `tokenized` + `refcache` shards -> PairBatch.

Memory is bounded by one refcache shard (plus the tokenized shard covering it), never the
dataset. The order is a pure function of (seed, epoch): shards in a seeded permutation, pairs
permuted within each shard, so a resumed run can skip exactly the micro-batches it already
consumed, and every process of a multi-process run sees the same stream and takes every
`world`-th micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from alignheads.models.objectives import BatchNeeds, PairBatch
from alignheads.storage.manifest import ArtifactError, ShardInfo, read_manifest, verify_shard
from alignheads.storage.refcache import token_matrix

SIDES = ("chosen", "rejected")


class TokenizedRows:
    """Random access to `tokenized` rows by index, holding one shard in memory at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.shards: list[ShardInfo] = read_manifest(directory).tables["tokenized"]
        self.starts = np.concatenate([[0], np.cumsum([s.rows for s in self.shards])])
        self._loaded: tuple[int, pa.Table] | None = None

    def _shard(self, i: int) -> pa.Table:
        if self._loaded is None or self._loaded[0] != i:
            verify_shard(self.directory, self.shards[i])
            table = pq.read_table(self.directory / self.shards[i].path)
            self._loaded = (i, table)
        return self._loaded[1]

    def rows(self, start: int, stop: int) -> pa.Table:
        """Rows ``[start, stop)`` of the table."""
        parts = []
        while start < stop:
            i = int(np.searchsorted(self.starts, start, side="right") - 1)
            end = min(stop, int(self.starts[i + 1]))
            parts.append(self._shard(i).slice(start - int(self.starts[i]), end - start))
            start = end
        return pa.concat_tables(parts)


@dataclass
class PairRecord:
    """One pair's data, ready to collate: for each side, response targets and the cache's values."""

    prompt: list[int]
    responses: tuple[list[int], list[int]]
    ref_logps: tuple[float, float]
    topk_ids: tuple[np.ndarray, np.ndarray] | None
    topk_logprobs: tuple[np.ndarray, np.ndarray] | None
    hidden: tuple[np.ndarray, np.ndarray] | None
    prefix: tuple[np.ndarray, np.ndarray] | None
    tail_ids: tuple[np.ndarray, np.ndarray] | None = None
    tail_logprobs: tuple[np.ndarray, np.ndarray] | None = None


def _cache_columns(needs: BatchNeeds, schema: pa.Schema) -> list[str]:
    cols = ["pair_index", "id", "split", "side", "prompt_len", "seq_logprob", "token_logprobs"]
    if needs.topk:
        cols += ["topk_ids", "topk_logprobs"]
    if (needs.hidden or needs.reference_hidden) and "hidden" not in schema.names:
        reader = "features: cached" if needs.hidden else "kl: exact against another reference model"
        raise ArtifactError(
            f"{reader} needs hidden states, but this reference cache has none "
            "(rebuild it with refpass.store_hidden: true)"
        )
    if needs.hidden:
        cols += ["hidden"] + (["prefix_hidden_sum"] if "prefix_hidden_sum" in schema.names else [])
    elif needs.reference_hidden:
        cols += ["hidden"]
    if needs.tail:
        if "tail_ids" not in schema.names:
            raise ArtifactError(
                "kl: sampled needs the reference's tail draws, but this reference cache has none "
                "(rebuild it with refpass.tail_draws > 0)"
            )
        cols += ["tail_ids", "tail_logprobs"]
    return cols


def _fixed_rows(column: pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list<float>[W]`` column as a float32 ``(rows, W)`` array."""
    arr = column.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, arr.type.list_size)


def _split_rows(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(counts)[:-1]) if len(counts) else []


def _shard_records(
    cache_dir: Path, shard: ShardInfo, tokenized: TokenizedRows, split: str, needs: BatchNeeds
) -> list[PairRecord]:
    """Every pair of one refcache shard that belongs to `split`, in cache order."""
    verify_shard(cache_dir, shard)
    file = pq.ParquetFile(cache_dir / shard.path)
    table = file.read(columns=_cache_columns(needs, file.schema_arrow))
    if table.num_rows == 0:
        return []
    index = table.column("pair_index").to_numpy()
    # one conversion per shard, not per pair
    toks = tokenized.rows(int(index[0]), int(index[-1]) + 1)
    toks = toks.select(["id", "prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()
    counts = pc.list_value_length(table.column("token_logprobs")).to_numpy(zero_copy_only=False)
    topk_ids = _split_rows(token_matrix(table.column("topk_ids")), counts) if needs.topk else None
    topk_lp = _split_rows(token_matrix(table.column("topk_logprobs")), counts) if needs.topk else None
    with_hidden = needs.hidden or needs.reference_hidden
    hidden = _split_rows(token_matrix(table.column("hidden")), counts) if with_hidden else None
    prefix = (
        _fixed_rows(table.column("prefix_hidden_sum"))
        if needs.hidden and "prefix_hidden_sum" in table.column_names
        else None
    )
    tail_ids = _split_rows(token_matrix(table.column("tail_ids")), counts) if needs.tail else None
    tail_lp = _split_rows(token_matrix(table.column("tail_logprobs")), counts) if needs.tail else None
    splits = table.column("split").to_pylist()
    sides = table.column("side").to_pylist()
    seq = table.column("seq_logprob").to_numpy()
    ids = table.column("id").to_pylist()
    records = []
    for row in range(0, table.num_rows, 2):
        if sides[row] != "chosen" or sides[row + 1] != "rejected" or index[row] != index[row + 1]:
            raise ArtifactError(
                f"{cache_dir / shard.path}: rows {row}, {row + 1} are not one pair's chosen/rejected"
            )
        if splits[row] != split:
            continue
        t = toks[int(index[row] - index[0])]
        if t["id"] != ids[row]:
            raise ArtifactError(
                f"{cache_dir / shard.path}: row {row} is pair {ids[row]!r}, tokenized has {t['id']!r}"
            )
        pair = (row, row + 1)
        records.append(
            PairRecord(
                prompt=t["prompt_ids"],
                responses=(t["chosen_ids"], t["rejected_ids"]),
                ref_logps=(float(seq[row]), float(seq[row + 1])),
                topk_ids=tuple(topk_ids[r] for r in pair) if topk_ids is not None else None,
                topk_logprobs=tuple(topk_lp[r] for r in pair) if topk_lp is not None else None,
                hidden=tuple(hidden[r] for r in pair) if hidden is not None else None,
                prefix=tuple(prefix[r] for r in pair) if prefix is not None else None,
                tail_ids=tuple(tail_ids[r] for r in pair) if tail_ids is not None else None,
                tail_logprobs=tuple(tail_lp[r] for r in pair) if tail_lp is not None else None,
            )
        )
    return records


def _scored(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    """(targets, predicting positions): a response token at position 0 has no predictor."""
    p = len(prompt)
    if p == 0:
        return response[1:], list(range(0, len(response) - 1))
    return response, list(range(p - 1, p - 1 + len(response)))


def collate(records: list[PairRecord], needs: BatchNeeds, with_sequences: bool, pad_id: int) -> PairBatch:
    """B pair records → a compact PairBatch of 2B rows (all chosen first, then all rejected)."""
    rows = [(r, side) for side in (0, 1) for r in records]
    scored = [_scored(r.prompt, r.responses[side]) for r, side in rows]
    n = len(rows)
    width = max(1, max(len(t) for t, _ in scored))
    targets = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    gather = torch.zeros(n, width, dtype=torch.long)
    for i, (t, pos) in enumerate(scored):
        targets[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = True
        gather[i, : len(pos)] = torch.tensor(pos, dtype=torch.long)
    batch = PairBatch(
        targets=targets,
        mask=mask,
        ref_logps=torch.tensor([r.ref_logps[side] for r, side in rows], dtype=torch.float32),
    )
    if needs.topk:
        batch.ref_topk_ids = _token_grid(rows, scored, width, "topk_ids", torch.long)
        batch.ref_topk_logprobs = _token_grid(rows, scored, width, "topk_logprobs", torch.float32)
    if with_sequences:
        seqs = [r.prompt + r.responses[side] for r, side in rows]
        length = max(len(s) for s in seqs)
        batch.input_ids = torch.full((n, length), pad_id, dtype=torch.long)
        batch.attention_mask = torch.zeros(n, length, dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: real tokens keep positions 0..len-1
            batch.input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            batch.attention_mask[i, : len(s)] = 1
        batch.gather_index = gather
    if needs.tail:
        batch.ref_tail_ids = _token_grid(rows, scored, width, "tail_ids", torch.long)
        batch.ref_tail_logprobs = _token_grid(rows, scored, width, "tail_logprobs", torch.float32)
    if needs.reference_hidden:  # another reference model's states, for the exact KL to it
        batch.ref_hidden = _token_grid(rows, scored, width, "hidden")
    if needs.hidden:
        batch.hidden = _token_grid(rows, scored, width, "hidden")
        batch.positions = gather.clone()
        if records[0].prefix is not None:  # caches that carry CALM's context prefix
            batch.prefix_sum = torch.stack([torch.from_numpy(r.prefix[side]) for r, side in rows])
            # the hidden states before the first predicting position: positions 0 .. p-2
            batch.prefix_count = torch.tensor([float(pos[0]) if pos else 0.0 for _, pos in scored])
    return batch


def _token_grid(
    rows: list[tuple[PairRecord, int]], scored: list, width: int, field: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A per-token field of the records (``field``: one row of W values per scored token, e.g. the
    top-k ids or the hidden states) for each (record, side) in ``rows``, on the compact grid
    ``(2B, R, W)``, zeros at padding, in ``dtype``. None keeps the cache's own dtype: hidden states
    (float32, or float16 from a `hidden_dtype: float16` cache) are then never rounded here."""
    first = torch.from_numpy(getattr(rows[0][0], field)[0])
    grid = torch.zeros(len(rows), width, first.shape[1], dtype=dtype or first.dtype)
    for i, (r, side) in enumerate(rows):
        grid[i, : len(scored[i][0])] = torch.from_numpy(getattr(r, field)[side])
    return grid


def release_arrow_memory() -> None:
    """Give Arrow's memory pool's free pages back to the system. The records of a shard are
    copies (numpy arrays, Python lists); the Parquet table they were read from is gone, but Arrow's
    allocator (mimalloc or jemalloc) keeps the freed pages for reuse: 76 of 143 MiB resident after
    reading a 48-sequence shard with hidden states of width 4,096, held through training."""
    pa.default_memory_pool().release_unused()


class PairStream:
    """The training (or evaluation) pairs of one reference cache, as a seeded stream of micro-batches."""

    def __init__(self, cache_dir: Path, tokenized_dir: Path, split: str, needs: BatchNeeds):
        self.cache_dir = Path(cache_dir)
        self.tokenized = TokenizedRows(Path(tokenized_dir))
        self.split = split
        self.needs = needs
        self.shards = read_manifest(self.cache_dir).tables["refcache"]

    def count_pairs(self) -> int:
        """Pairs of this split in the cache (reads only the `split` column)."""
        total = 0
        for shard in self.shards:
            col = pq.read_table(self.cache_dir / shard.path, columns=["split"]).column("split")
            total += sum(1 for s in col.to_pylist() if s == self.split) // 2
        return total

    def records(self, seed: int | None, epoch: int = 0) -> Iterator[PairRecord]:
        """Pair records in a seeded order (seed None: cache order)."""
        rng = np.random.default_rng([seed, epoch]) if seed is not None else None
        order = rng.permutation(len(self.shards)) if rng is not None else range(len(self.shards))
        for i in order:
            recs = _shard_records(self.cache_dir, self.shards[int(i)], self.tokenized, self.split, self.needs)
            release_arrow_memory()
            if rng is not None:
                recs = [recs[j] for j in rng.permutation(len(recs))]
            yield from recs

    def micro_batches(
        self,
        micro: int,
        seed: int | None,
        epoch: int = 0,
        *,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
    ) -> Iterator[tuple[int, list[PairRecord]]]:
        """(global micro-batch index, records) for this process: indices ≡ rank (mod world), ≥ start."""
        buffer: list[PairRecord] = []
        index = 0
        for rec in self.records(seed, epoch):
            buffer.append(rec)
            if len(buffer) == micro:
                if index >= start and index % world == rank:
                    yield index, buffer
                buffer, index = [], index + 1
        if buffer and not drop_last and index >= start and index % world == rank:
            yield index, buffer
