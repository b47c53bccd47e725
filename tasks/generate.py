"""Generate stage: the α sweep. One artifact per (trained method, α) holding the `generations` table.

Every method decodes through its registry entry (alignheads.models.methods): a head installed as
the LM's output layer, or base and fine-tuned LM side by side; both go through the one
common-random-numbers sampling loop, `tasks.sampling.sample_batches`.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from alignheads.config import SweepConfig
from alignheads.models.methods import METHODS
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key, fingerprint
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import is_complete
from alignheads.tasks.loaded_method import LoadedMethod, Sampler
from alignheads.tasks.prompts import prompt_set_identity, read_prompt_set

log = logging.getLogger(__name__)

STAGE = "generate"
# 2: one train stage for heads and baselines (inputs name a `train` artifact for every method)
# 3: one seed per row (models.row_sampling): rows no longer depend on their batch
GENERATE_VERSION = 3
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
    prompts_path: str  # a `tasks.prompts.save_prompt_set` artifact
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
    prompts_path: str | Path,
    sweep: SweepConfig,
    model_source: dict[str, Any],
) -> GeneratePlan:
    """Key = hash(train artifact key, method, α, prompt-set fingerprint, decoding settings,
    model dtype, version). `prompts_path`: the prompt set (`tasks.prompts.save_prompt_set`);
    `model_source`: name_or_path, revision, trust_remote_code, dtype of the run's model (the
    train stage's `model` dict)."""
    from alignheads.tasks.train import STAGE as TRAIN_STAGE

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
        "prompts": prompt_set_identity(prompts_path),
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
        prompts_path=str(prompts_path),
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


@contextmanager
def method_sampler(
    head: str,
    train_path: str | Path,
    model_source: dict[str, Any],
    sweep: SweepConfig,
    *,
    device: str = "auto",
    progress: bool = True,
) -> Iterator[Sampler]:
    """The trained method at `train_path` loaded once (base model, tokenizer and the method's
    trained part) for any number of sampling calls: yields ``sample(prompts, alphas, desc) ->
    rows`` (`tasks.sampling.sample_batches` rows: every (α, prompt, sample), all α batched
    together with one α per row). The model is put on `device` ('auto': CUDA when visible)."""
    with LoadedMethod(head, train_path, model_source, device) as loaded, loaded.sampler(sweep, progress) as sample:
        yield sample


def run_generate(
    store: Path,
    plans: Sequence[GeneratePlan],
    *,
    device: str = "auto",
    progress: bool = True,
    method: LoadedMethod | None = None,
) -> list[ArtifactResult]:
    """The (method, α) artifacts of `plans` (one method, one prompt set, one sweep), building
    those not yet complete in one sampling pass over the model loaded once (batches of one α
    each: an α's rows do not depend on which others are missing). `method`: the method already
    loaded by the caller (`tasks.method_sweep` shares one load between stages); by default it is
    loaded here, only if an artifact is missing. Returns one result per plan, in order."""
    if not plans:
        return []
    first = plans[0]
    for plan in plans[1:]:
        same = (plan.head, plan.train_path, plan.prompts_path, plan.sweep, plan.model)
        if same != (first.head, first.train_path, first.prompts_path, first.sweep, first.model):
            raise ValueError("run_generate builds one method's sweep at a time (one prompt set and sweep)")
    entry = METHODS[first.head]

    def sample_pass(alphas: list[float]) -> SweepPass:
        loaded = method or LoadedMethod(first.head, first.train_path, first.model, device)
        with loaded.sampler(first.sweep_config, progress) as sample:
            desc = f"generate {first.head} α={', '.join(f'{a:g}' for a in alphas)}"
            return SweepPass.timed(lambda: sample(read_prompt_set(first.prompts_path), alphas, desc))

    def content(plan: GeneratePlan, done: SweepPass, staging: Path) -> ArtifactContent:
        rows = done.rows[plan.alpha]
        table = generations_table(rows, plan.head, plan.head_key, plan.alpha)
        info = {"head": plan.head, "alpha": plan.alpha, "prompts": plan.config["prompts"]["n"], **_summary(table)}
        # decoding cost, for the comparison of methods
        info |= {"lm_forwards_per_token": entry.lm_forwards_per_token, **done.cost(rows)}
        return ArtifactContent(tables={TABLE: write_table(table, staging, TABLE)}, info=info)

    return build_per_point(
        store, STAGE, GENERATE_VERSION, plans, lambda p: p.alpha, sample_pass, content,
        name=lambda p: f"generate {p.head} α={p.alpha:g}",
    )  # fmt: skip


@dataclass(frozen=True)
class SweepPass:
    """The rows of one sampling pass by sweep point (their `alpha`: a float, or a dial vector's
    tuple), the pass's wall time, and torch's intra-op thread count during it."""

    rows: dict[Any, list[dict[str, Any]]]
    seconds: float
    torch_threads: int = 0

    @classmethod
    def timed(cls, sample: Callable[[], list[dict[str, Any]]]) -> SweepPass:
        import torch

        started = time.perf_counter()
        rows: dict[Any, list[dict[str, Any]]] = {}
        for row in sample():
            rows.setdefault(row["alpha"], []).append(row)
        return cls(rows, time.perf_counter() - started, torch.get_num_threads())

    def cost(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """`decode_seconds` (the pass's time shared out by generated tokens), `generated_tokens` of
        one point's rows, and `torch_threads`: on a CPU the thread count changes how matrix
        products are summed, so the last bits of the logits, so now and then a sampled token (the
        embedded default's results differ between 1 and 2 threads; README, Results). It is not
        part of the key, as the device is not: it is recorded so that a difference can be traced."""
        tokens = sum(r["n_tokens"] for r in rows)
        every = sum(r["n_tokens"] for point in self.rows.values() for r in point) or 1
        return {
            "decode_seconds": self.seconds * tokens / every,
            "generated_tokens": tokens,
            "torch_threads": self.torch_threads,
        }


def build_per_point(
    store: Path,
    stage: str,
    version: int,
    plans: Sequence[Any],
    point: Callable[[Any], Any],
    sample_pass: Callable[[list[Any]], SweepPass],
    content: Callable[[Any, SweepPass, Path], ArtifactContent],
    name: Callable[[Any], str],
) -> list[ArtifactResult]:
    """One artifact per plan (a sweep point each, `point(plan)`), the missing ones built from one
    sampling pass over their points (`sample_pass(points)`, sorted) and `content(plan, pass,
    staging)`; results in the order of `plans`."""
    missing = [p for p in plans if not is_complete(store, stage, p.key)]
    done = sample_pass(sorted({point(p) for p in missing})) if missing else SweepPass({}, 0.0)
    results = []
    for plan in plans:
        if point(plan) not in done.rows and not is_complete(store, stage, plan.key):
            raise RuntimeError(f"{name(plan)}: its artifact went missing while building")
        build = partial(content, plan, done)
        results.append(ensure_artifact(store, stage, plan.key, version, plan.config, plan.inputs, build))
    return results


def sweep_key(plans: Sequence[Any]) -> str:
    """The cache key of one task that builds several sweep points (a method's α, a dial family's
    α vectors): the hash of their artifact keys."""
    return fingerprint(sorted(p.key for p in plans))[:32]
