"""Helpers the benchmark scripts share: building the tiny world's inputs, random Llama models of a
given shape, interleaved timing, and printing a table.

The scripts are run as files (``python benchmarks/x.py``), so this module is imported as ``common``.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 32000}
MIB = 2**20
# (split, prompt ids, chosen ids, rejected ids) of one synthetic preference pair
SyntheticPair = tuple[str, list[int], list[int], list[int]]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class TinyWorld:
    """The tiny world's stages up to `tokenize`, built (or reused) in a store."""

    model_dir: str
    tokenizer: Any
    fingerprint: str
    data: Any  # ArtifactResult of the data stage
    tokenized: Any  # ArtifactResult of the tokenize stage

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id


def write_tokenized(
    store: Path, config: dict[str, Any], inputs: dict[str, str], pairs: Callable[[], Iterable[SyntheticPair]]
) -> Any:
    """A `tokenize` artifact of synthetic pairs, written with the storage layer like the real
    stage's and keyed by ``config`` and ``inputs`` (reused when complete). ``pairs`` is called only
    when the artifact is built, and yields ``(split, prompt, chosen, rejected)`` token-id lists."""
    import pyarrow as pa

    from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
    from alignheads.storage.fingerprint import artifact_key
    from alignheads.storage.tables import write_table
    from alignheads.tasks.tokenize import STAGE, TOKENIZE_VERSION, TOKENIZED_SCHEMA

    def build(staging: Path) -> ArtifactContent:
        cols: dict[str, list] = {name: [] for name in TOKENIZED_SCHEMA.names}
        for i, (split, *seqs) in enumerate(pairs()):
            cols["id"].append(f"synthetic-{i}")
            cols["split"].append(split)
            for name, seq in zip(("prompt", "chosen", "rejected"), seqs, strict=True):
                cols[f"{name}_ids"].append(seq)
                cols[f"{name}_len"].append(len(seq))
                cols[f"{name}_truncated"].append(False)
        table = pa.Table.from_pydict(cols, schema=TOKENIZED_SCHEMA)
        return ArtifactContent(
            tables={"tokenized": write_table(table, staging, "tokenized")}, info={"rows": len(cols["id"])}
        )

    key = artifact_key(STAGE, config, inputs, TOKENIZE_VERSION)
    return ensure_artifact(store, STAGE, key, TOKENIZE_VERSION, config, inputs, build)


def prepare_tiny_world(store: Path, world_config: Any = None) -> TinyWorld:
    """World -> data -> tokenize in `store` (each reused when already there); default: the test-size world."""
    from alignheads.config import DataConfig, TokenizeConfig
    from alignheads.loading import load_tokenizer
    from alignheads.storage.fingerprint import tokenizer_fingerprint
    from alignheads.tasks.data import plan_data, run_data
    from alignheads.tasks.tokenize import plan_tokenize, run_tokenize
    from alignheads.tasks.world import run_world
    from alignheads.world.build import tiny_test_config

    world = run_world(store, world_config or tiny_test_config(), progress=False)
    model_dir = str(world.path / "model")
    tokenizer = load_tokenizer(model_dir)
    fp = tokenizer_fingerprint(tokenizer)
    data = run_data(store, plan_data(DataConfig(), world.path, world.key, fp), tokenizer)
    tok = run_tokenize(store, plan_tokenize(TokenizeConfig(), data.key, data.path, fp), tokenizer)
    return TinyWorld(model_dir, tokenizer, fp, data, tok)


def tiny_world_shape() -> tuple[dict[str, int], int]:
    """The embedded default world's model shape (configs/tiny.yaml: `WorldConfig()` defaults) as
    (LlamaConfig sizes, layers); the vocabulary is the BPE vocabulary size asked for."""
    from alignheads.config import WorldConfig

    w = WorldConfig()
    shape = {
        "hidden_size": w.hidden_size,
        "intermediate_size": w.intermediate_size,
        "num_attention_heads": w.num_heads,
        "vocab_size": w.vocab_size,
    }
    return shape, w.num_layers


def random_llama(
    shape: dict[str, int], layers: int, device: torch.device, dtype: torch.dtype, seed: int
) -> nn.Module:
    """A randomly initialised, frozen Llama of `shape` (see LLAMA_7B) and depth `layers` on `device`.

    Speed does not depend on the weights, so benchmarks need no trained model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        num_hidden_layers=layers,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device | None = None
) -> dict[str, list[float]]:
    """Seconds of each callable over `repeats` rounds, the callables run one after the other in
    every round, so a slow spell of a shared machine hits all of them alike."""
    device = device or torch.device("cpu")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t)
    return times


def best_and_median(seconds: Sequence[float]) -> tuple[float, float]:
    return min(seconds), statistics.median(seconds)


# --------------------------------------------------------------------------- reporting


def machine_line(title: str, device: torch.device | None = None) -> str:
    """`title  date  machine, torch, threads, device, load average` (the load of the shared machine
    at the time of printing)."""
    device = device or torch.device("cpu")
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{title}  {dt.date.today()}  {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), device {device}{gpu}; load average {load}"
    )


def print_table(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[str]]) -> None:
    """Rows of already formatted cells under `columns` ((name, width) each): the first column
    left-aligned, the others right-aligned."""

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (cell, (name, width)) in enumerate(zip(cells, columns, strict=True)):
            width = max(width, len(name))
            out.append(f"{cell:<{width}}" if i == 0 else f"{cell:>{width}}")
        return " | ".join(out)

    header = line([name for name, _ in columns])
    print(header)
    print("-" * len(header))
    for row in rows:
        print(line(row))
