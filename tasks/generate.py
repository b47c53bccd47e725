"""Generate stage: the α sweep. One artifact per (trained method, α) holding the `generations` table.

Every method decodes through its registry entry (alignheads.models.methods): a head installed as
the LM's output layer, or base and fine-tuned LM side by side; both go through the one
common-random-numbers sampling loop below (`sample_batches`).

Key = hash(train artifact key, method, α, prompt-set fingerprint, decoding settings, model
dtype, format version): adding one α to the sweep builds only that α's artifact, and another
prompt set or decoding setting builds new ones. The train key already covers the model, the
tokenizer and the data the method was trained on.

The sampling itself, with common random numbers across methods and α, is `tasks.sampling`.

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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from alignheads.config import SweepConfig
from alignheads.models.methods import METHODS
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import StageResult, task_options
from alignheads.tasks.prompts import Prompt, prompt_fingerprint
from alignheads.tasks.sampling import decoding_settings, eos_ids, sample_batches

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
