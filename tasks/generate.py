"""Generate stage: the α sweep. One artifact per (trained method, α) holding the `generations` table.

Every method decodes through its registry entry (alignheads.models.methods): a head installed as
the LM's output layer, or base and fine-tuned LM side by side; both go through the one
common-random-numbers sampling loop below (`sample_batches`).

Key = hash(train artifact key, method, α, prompt-set fingerprint, decoding settings, model
dtype, format version): adding one α to the sweep builds only that α's artifact, and another
prompt set or decoding setting builds new ones. The train key already covers the model, the
tokenizer and the data the method was trained on.

Common random numbers. Every (prompt, sample) gets the same random draws at every α and for
every head, so that differences between α come from α, not from sampling noise. Hugging Face
`generate` has no per-row seeds, so the batches are made identical instead: prompts in a fixed
order, fixed batch boundaries (`batch_size`), the same left padding, and
`torch.manual_seed(batch_seed(seed, sample_index, batch_index))` right before each batch's
`generate` call. Sampling draws the same number of random numbers per step whatever the
probabilities are, so with a head whose Δ is zero every α (and the plain base model) produces
identical text. The seed used is recorded per row.

Decoding is fully determined by the sweep settings: the model's own `generation_config.json`
defaults (top-k, repetition penalty, ...) are set aside during generation, and top-k is off.
Generation stops at EOS: the tokenizer's EOS plus any EOS ids of the model's generation config
(chat models end turns with their own token).

Per row: `n_tokens` counts the generated tokens including a final EOS (at most
`max_new_tokens`); `finish_reason` is `eos` when the last of them is an EOS, else `length`
(then `n_tokens == max_new_tokens`). `response` is the decoded text of those tokens without
special tokens. `kl_mean`/`kl_sum` are over the same tokens: per token the exact
KL(π_α ‖ π_base) of the next-token distributions before any sampling processors (temperature,
top-p), from the aligned model's recording. CALM strength statistics and IAV alignment norms
cover the same tokens (null for the other head).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from alignheads.config import SweepConfig
from alignheads.models.methods import METHODS
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key, fingerprint
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import StageResult, task_options
from alignheads.tasks.prompts import Prompt, prompt_fingerprint

log = logging.getLogger(__name__)

STAGE = "generate"
# 2: one train stage for heads and baselines (inputs name a `train` artifact for every method)
GENERATE_VERSION = 2
TABLE = "generations"

GENERATIONS_SCHEMA = pa.schema(
    [
        ("head", pa.string()),
        ("head_key", pa.string()),
        ("alpha", pa.float64()),
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("n_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("kl_mean", pa.float64()),
        ("kl_sum", pa.float64()),
        ("strength_mean", pa.float64()),
        ("strength_max", pa.float64()),
        ("utilisation", pa.float64()),
        ("align_norm_mean", pa.float64()),
    ]
)


# Sampling draws from torch's global RNG (transformers' generate takes no generator). Generation
# tasks running in threads of one process (the threads runner, an in-process Dask cluster) would
# interleave their draws and break common random numbers, so seeding and decoding a batch hold
# this lock; separate processes (Dask workers on a cluster) still decode in parallel.
SAMPLING_LOCK = threading.Lock()


def batch_seed(seed: int, sample_index: int, batch_index: int) -> int:
    """The seed of one generate() call: depends only on these three numbers (< 2**60)."""
    return int(fingerprint({"seed": seed, "sample": sample_index, "batch": batch_index})[:15], 16)


# --- plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratePlan:
    """One (method, α) generation job, resolved, with its artifact key (JSON-able: `GeneratePlan(**d)`
    rebuilds it from its `__dict__`)."""

    key: str
    head: str  # the method's name (the generations table's `head` column)
    head_key: str  # its train artifact's key
    train_path: str
    alpha: float
    prompts: list[list[str]]
    sweep: dict
    model: dict
    config: dict
    inputs: dict[str, str]

    @property
    def sweep_config(self) -> SweepConfig:
        return SweepConfig.model_validate(self.sweep)


def plan_generate(
    train_path: str | Path,
    alpha: float,
    prompts: Sequence[Prompt],
    sweep: SweepConfig,
    model_source: dict[str, Any],
) -> GeneratePlan:
    """Key = hash(train artifact key, method, α, prompt-set fingerprint, decoding settings,
    model dtype, version). `model_source`: name_or_path, revision, trust_remote_code, dtype of
    the run's model (the train stage's `model` dict)."""
    from alignheads.tasks.train import STAGE as TRAIN_STAGE

    if not prompts:
        raise ValueError("the prompt set is empty")
    manifest = read_manifest(Path(train_path), TRAIN_STAGE)
    kind = manifest.info.get("kind")
    if kind not in METHODS:
        raise ValueError(
            f"{train_path}: train manifest info 'kind' is {kind!r}, expected one of {', '.join(METHODS)}"
        )
    alpha = float(alpha) + 0.0
    config = {
        "head": kind,
        "alpha": alpha,
        "prompts": {"sha256": prompt_fingerprint(prompts), "n": len(prompts)},
        "decoding": sweep.decoding(),
        "dtype": model_source.get("dtype", "float32"),
    }
    inputs = {TRAIN_STAGE: manifest.key}
    return GeneratePlan(
        key=artifact_key(STAGE, config, inputs, GENERATE_VERSION),
        head=kind,
        head_key=manifest.key,
        train_path=str(train_path),
        alpha=alpha,
        prompts=[[pid, text] for pid, text in prompts],
        sweep=sweep.model_dump(mode="json"),
        model=dict(model_source),
        config=config,
        inputs=inputs,
    )


# --- generation ---------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, texts: list[str], max_prompt_length: int | None) -> list[list[int]]:
    """Token ids as the tokenize stage makes them (BOS not doubled), optionally left-truncated."""
    from alignheads.tasks.tokenize import _encode_prompts, truncate_prompt

    ids = [list(x) for x in _encode_prompts(tokenizer, texts)]
    if max_prompt_length is not None:
        ids = [truncate_prompt(x, max_prompt_length, tokenizer.bos_token_id)[0] for x in ids]
    for text, x in zip(texts, ids, strict=True):
        if not x:
            raise ValueError(f"prompt {text!r} tokenizes to no tokens")
    return ids


def left_pad(ids: list[list[int]], pad_id: int, device: Any):
    """Token id lists → left-padded ``(input_ids (B, P), attention_mask (B, P))`` on `device`."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x) :] = 1
    return input_ids.to(device), mask.to(device)


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """Where generation stops: the tokenizer's EOS plus any EOS ids of the model's generation
    config (chat models end turns with their own token)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def until_eos(ids: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """The generated ids up to and including the first stop id, and whether one was reached."""
    end = next((i + 1 for i, t in enumerate(ids) if t in stop), None)
    return (ids[:end], True) if end is not None else (ids, False)


@contextmanager
def _plain_generation_config(model: Any) -> Iterator[None]:
    """Set the model's own generation defaults aside: decoding follows the sweep settings only."""
    from transformers import GenerationConfig

    previous = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = previous


def _row_stats(recorded: dict, row: int, n: int) -> dict[str, float | None]:
    from alignheads.models.modstats import strength_stats

    stats: dict[str, float | None] = dict.fromkeys(
        ("kl_mean", "kl_sum", "strength_mean", "strength_max", "utilisation", "align_norm_mean")
    )
    if "kl_to_base" in recorded:
        kl = recorded["kl_to_base"][row, :n].double()
        stats["kl_sum"] = kl.sum().item()
        stats["kl_mean"] = kl.mean().item()
    if "strength" in recorded:
        s = strength_stats(recorded["strength"][row, :n])
        stats |= {"strength_mean": s.mean, "strength_max": s.max, "utilisation": s.utilisation}
    if "align_norm" in recorded:
        stats["align_norm_mean"] = recorded["align_norm"][row, :n].double().mean().item()
    return stats


def sample_responses(
    lm: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sweep: SweepConfig,
    *,
    alpha: float | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[dict[str, Any]]:
    """Responses to `prompts` with common random numbers (see the module docstring).

    `lm`: an `AlignedLM` (generated at `alpha`, with per-token KL to the base and the head's
    statistics recorded) or a plain transformers causal LM (statistics null). Returns one dict
    per (prompt, sample), ordered by prompt then sample, with the generations table's
    per-row columns plus `token_ids` (the counted generated tokens).
    """
    from alignheads.models import AlignedLM

    aligned = lm if isinstance(lm, AlignedLM) else None
    model = aligned.model if aligned is not None else lm
    stops = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    settings: dict[str, Any] = {
        "max_new_tokens": sweep.max_new_tokens,
        "do_sample": sweep.do_sample,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
        "top_k": 0,
    }
    if sweep.do_sample:
        settings |= {"temperature": sweep.temperature, "top_p": sweep.top_p}

    def decode(input_ids, mask):
        if aligned is None:
            return model.generate(input_ids, attention_mask=mask, **settings), {}
        with aligned.recording() as recorder:
            out = aligned.generate(input_ids, attention_mask=mask, alpha=alpha, **settings)
        return out, recorder.stacked()

    with _plain_generation_config(model):
        return sample_batches(decode, tokenizer, prompts, sweep, stops, pad_id, model, progress, desc)


def sample_batches(
    decode: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sweep: SweepConfig,
    stops: list[int],
    pad_id: int,
    model: Any,
    progress: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """The sweep's sampling loop, whatever decodes a batch: for each sample index and batch of
    prompts (left-padded), seed torch from (seed, sample, batch) and call ``decode(input_ids
    (B, P), attention_mask (B, P)) -> (sequences (B, P + N), recorded {name: (B, N)})``; the
    rows of `sample_responses`, with the recorded per-token statistics summarised per row."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    prompts = list(prompts)
    texts = [text for _, text in prompts]
    encoded = encode_prompts(tokenizer, texts, sweep.max_prompt_length)
    bs = sweep.batch_size
    starts = list(range(0, len(prompts), bs))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=sweep.n_samples * len(starts), desc=desc, disable=not progress, leave=False)
    eos_set = set(stops)
    with torch.inference_mode():
        for sample in range(sweep.n_samples):
            for batch_index, start in enumerate(starts):
                input_ids, mask = left_pad(encoded[start : start + bs], pad_id, device)
                seed = batch_seed(sweep.seed, sample, batch_index)
                with SAMPLING_LOCK:
                    torch.manual_seed(seed)
                    out, recorded = decode(input_ids, mask)
                generated = out[:, input_ids.shape[1] :].cpu().tolist()
                if recorded and recorded["kl_to_base"].shape[1] != len(generated[0]):
                    raise RuntimeError(
                        f"recorded {recorded['kl_to_base'].shape[1]} steps for {len(generated[0])} "
                        "generated tokens: the output layer was not called once per token"
                    )
                kept = []
                for row, ids in enumerate(generated):
                    counted, ended = until_eos(ids, eos_set)
                    n = len(counted)
                    kept.append(counted)
                    rows.append(
                        {
                            "_order": (start + row, sample),
                            "prompt_id": prompts[start + row][0],
                            "sample_index": sample,
                            "seed": seed,
                            "prompt": texts[start + row],
                            "n_tokens": n,
                            "finish_reason": "eos" if ended else "length",
                            "token_ids": counted,
                            **_row_stats(recorded, row, n),
                        }
                    )
                responses = tokenizer.batch_decode(kept, skip_special_tokens=True)
                for row, text in zip(rows[-len(kept) :], responses, strict=True):
                    row["response"] = text
                bar.update(1)
    bar.close()
    rows.sort(key=lambda r: r.pop("_order"))
    return rows


def generations_table(rows: list[dict[str, Any]], head: str, head_key: str, alpha: float) -> pa.Table:
    """The `generations` table (schema GENERATIONS_SCHEMA) of `sample_responses` rows."""
    columns: dict[str, list[Any]] = {name: [] for name in GENERATIONS_SCHEMA.names}
    for r in rows:
        fixed = {"head": head, "head_key": head_key, "alpha": float(alpha)}
        for name in GENERATIONS_SCHEMA.names:
            columns[name].append(fixed[name] if name in fixed else r[name])
    return pa.Table.from_pydict(columns, schema=GENERATIONS_SCHEMA)


def resolve_device(device: str) -> str:
    """`auto`: CUDA when visible, else the CPU; any other name as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _summary(table: pa.Table) -> dict[str, Any]:
    def mean(name: str) -> float | None:
        value = pc.mean(table.column(name)).as_py()
        return float(value) if value is not None else None

    eos = pc.sum(pc.equal(table.column("finish_reason"), "eos")).as_py() or 0
    return {
        "rows": table.num_rows,
        "mean_tokens": mean("n_tokens"),
        "eos_share": eos / table.num_rows if table.num_rows else None,
        "kl_mean": mean("kl_mean"),
        "strength_mean": mean("strength_mean"),
        "align_norm_mean": mean("align_norm_mean"),
    }


def decoding_settings(sweep: SweepConfig, stops: list[int], pad_id: int) -> dict[str, Any]:
    """What every method's decoder takes: length, sampling, and where to stop and pad."""
    return {
        "max_new_tokens": sweep.max_new_tokens,
        "do_sample": sweep.do_sample,
        "temperature": sweep.temperature,
        "top_p": sweep.top_p,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
    }


def run_generate(
    store: Path,
    plan: GeneratePlan,
    *,
    model: Any = None,
    tokenizer: Any = None,
    device: str = "auto",
    progress: bool = True,
) -> ArtifactResult:
    """Generate the plan's (method, α) responses unless the artifact is already complete.

    `model`/`tokenizer`: an already loaded base model and tokenizer to reuse across α (a head is
    installed for this call and removed after; the model stays where it is); by default both
    are loaded from `plan.model` and the model is put on `device` ('auto': CUDA when visible).
    """
    from alignheads.models.methods import method
    from alignheads.tasks.train import load_run_model

    entry = method(plan.head)

    def build(staging: Path) -> ArtifactContent:
        nonlocal model, tokenizer
        if model is None or tokenizer is None:
            loaded_model, loaded_tokenizer, _ = load_run_model(plan.model)
            model = model if model is not None else loaded_model.to(resolve_device(device))
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        loaded = entry.load(Path(plan.train_path) / entry.saved_as, model, plan.model)
        stops = eos_ids(tokenizer, model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        sweep = plan.sweep_config
        decode, done = entry.decoder(loaded, plan.alpha, decoding_settings(sweep, stops, pad_id))
        started = time.perf_counter()
        try:
            rows = sample_batches(
                decode, tokenizer, [(pid, text) for pid, text in plan.prompts], sweep, stops, pad_id,
                model, progress, f"generate {plan.head} α={plan.alpha:g}",
            )  # fmt: skip
        finally:
            done()
        seconds = time.perf_counter() - started
        table = generations_table(rows, plan.head, plan.head_key, plan.alpha)
        info = {"head": plan.head, "alpha": plan.alpha, "prompts": len(plan.prompts), **_summary(table)}
        # decoding cost, for the comparison of methods at matched KL (tasks.reporting.matched_kl)
        info |= {
            "lm_forwards_per_token": entry.lm_forwards_per_token,
            "decode_seconds": seconds,
            "generated_tokens": sum(r["n_tokens"] for r in rows),
        }
        return ArtifactContent(tables={TABLE: write_table(table, staging, TABLE)}, info=info)

    return ensure_artifact(store, STAGE, plan.key, GENERATE_VERSION, plan.config, plan.inputs, build)


@task(**task_options(STAGE))
def generate_task(store: str, key: str, plan: dict[str, Any]) -> StageResult:
    """The generate stage of one (method, α) as a cached Prefect task."""
    return StageResult.of(run_generate(Path(store), GeneratePlan(**plan)))
