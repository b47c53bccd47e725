"""Dial generate stage: the dial sweep. One artifact per (dial family, α vector) holding the
`dial_generations` table.

Two families decode the same grid on the same prompts and seeds:

- ``heads``: every dial's head installed on one backbone, `z = z_base + Σ_i α_i Δ_i(h)`
  (`models.dials.dial_head_decoder`): one LM forward per token, whatever the number of dials;
- ``genarm``: multi-objective GenARM, one reward LM per dial trained on the dial's pairs, decoded
  as `log π_base + Σ_i α_i log π_r_i` (`models.dials.multi_genarm_decoder`): one forward for the
  base and one for each dial whose α is not 0 (a reward LM at α = 0 is not run), K + 1 at most.

Both go through the sweep's one common-random-numbers sampling loop (`tasks.sampling`), so every
(prompt, sample) row draws the same random numbers at every α vector and in both families, and
the all-zero vector reproduces the base model's text.

Key = hash(family, every dial's name and train key in order, the α vector, the prompt-set
fingerprint, the decoding settings, the model dtype, format version): adding a vector to the grid
builds only that vector.

`dial_generations` columns: `method` (the family), `dial_set` (the dial-set key), `alpha_vector`
(`tasks.dial_set.vector_label`), one `alpha_<dial>` column per dial, then `prompt_id,
sample_index, seed, prompt, response, n_tokens, finish_reason, kl_mean, kl_sum` as in
`generations` (KL(π_α ‖ π_base) per token, before temperature and top-p).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task

from alignheads.config import SweepConfig
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import StageResult, task_options
from alignheads.tasks.dial_set import vector_label
from alignheads.tasks.generate import SweepPass, build_per_point
from alignheads.tasks.loaded_method import resolve_device
from alignheads.tasks.prompts import prompt_set_identity, read_prompt_set
from alignheads.tasks.sampling import decoding_settings, eos_ids, sample_batches

STAGE = "dialgen"
DIALGEN_VERSION = 1
TABLE = "dial_generations"
FAMILIES = ("heads", "genarm")

_ROW_COLUMNS = [
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("seed", pa.int64()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("n_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("kl_mean", pa.float64()),
    ("kl_sum", pa.float64()),
]


def dial_generations_schema(names: Sequence[str]) -> pa.Schema:
    """The `dial_generations` schema of a dial set whose dials are `names` (one α column each)."""
    leading = [("method", pa.string()), ("dial_set", pa.string()), ("alpha_vector", pa.string())]
    return pa.schema(leading + [(f"alpha_{n}", pa.float64()) for n in names] + _ROW_COLUMNS)


@dataclass(frozen=True)
class DialGeneratePlan:
    """One (family, α vector) generation job, resolved, with its artifact key (JSON-able)."""

    key: str
    family: str  # "heads" or "genarm"
    dial_set: str  # the dial-set artifact's key
    trained: dict[str, str]  # dial -> the train artifact decoded for it (its head, or its reward LM)
    alpha: dict[str, float]  # every dial's α, in dial order
    prompts_path: str
    sweep: dict
    model: dict
    config: dict
    inputs: dict[str, str]

    @property
    def label(self) -> str:
        return vector_label(self.alpha)

    @property
    def sweep_config(self) -> SweepConfig:
        return SweepConfig.model_validate(self.sweep)


def plan_dial_generate(
    family: str,
    dial_set: str,
    trained: dict[str, tuple[str, str]],
    alpha: dict[str, float],
    prompts_path: str | Path,
    sweep: SweepConfig,
    model_source: dict[str, Any],
) -> DialGeneratePlan:
    """The plan of decoding `family` at the α vector `alpha` (every dial of `trained`, in its
    order). `trained`: dial -> (train artifact key, path) of what that family decodes for it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown dial family {family!r}: one of {', '.join(FAMILIES)}")
    if list(alpha) != list(trained):
        raise ValueError(f"the α vector's dials {list(alpha)} are not the trained dials {list(trained)}")
    config = {
        "family": family,
        "alpha": {n: float(a) + 0.0 for n, a in alpha.items()},
        "prompts": prompt_set_identity(prompts_path),
        "decoding": sweep.decoding(),
        "dtype": model_source.get("dtype", "float32"),
    }
    inputs = {f"train/{name}": key for name, (key, _) in trained.items()}
    return DialGeneratePlan(
        key=artifact_key(STAGE, config, inputs, DIALGEN_VERSION),
        family=family,
        dial_set=dial_set,
        trained={name: str(path) for name, (_, path) in trained.items()},
        alpha=config["alpha"],
        prompts_path=str(prompts_path),
        sweep=sweep.model_dump(mode="json"),
        model=dict(model_source),
        config=config,
        inputs=inputs,
    )


# --- loading a family's decoder ------------------------------------------------------------------


def _head_dials(model: Any, trained: dict[str, str], source: dict[str, Any], settings: dict[str, Any]):
    """Every dial's head on the one backbone (`models.dials.dial_head_decoder`)."""
    from alignheads.models.dials import dial_head_decoder
    from alignheads.models.head_io import load_head

    heads = {name: load_head(Path(path) / "head", model).eval() for name, path in trained.items()}
    return dial_head_decoder(model, heads, settings)


def _genarm_dials(model: Any, trained: dict[str, str], source: dict[str, Any], settings: dict[str, Any]):
    """One reward LM per dial beside the base (`models.dials.multi_genarm_decoder`)."""
    from alignheads.loading import load_causal_lm
    from alignheads.models.dials import multi_genarm_decoder

    device = next(model.parameters()).device
    trust, dtype = source.get("trust_remote_code", False), source.get("dtype", "float32")
    lms = {name: load_causal_lm(str(Path(path) / "model"), None, dtype, trust).to(device) for name, path in trained.items()}
    return multi_genarm_decoder(model, lms, settings)


# (base model, dial -> train artifact, model source, decoding settings) -> (decode, done)
DECODERS: dict[str, Callable[..., tuple[Callable[..., Any], Callable[[], None]]]] = {
    "heads": _head_dials,
    "genarm": _genarm_dials,
}
# LM forwards per generated token at an α vector: the heads share the one backbone forward; GenARM
# runs the base and the reward LM of each dial whose α is not 0 (`models.guided`)
LM_FORWARDS_PER_TOKEN = {"heads": lambda alpha: 1, "genarm": lambda alpha: 1 + sum(a != 0 for a in alpha)}


@contextmanager
def dial_sampler(
    family: str,
    trained: dict[str, str],
    model_source: dict[str, Any],
    sweep: SweepConfig,
    *,
    device: str = "auto",
    progress: bool = True,
) -> Iterator[Callable[[Sequence[Any], Sequence[Sequence[float]], str], list[dict[str, Any]]]]:
    """The family's dials loaded once for any number of sampling calls: yields ``sample(prompts,
    α vectors (each K floats in dial order), desc) -> rows`` (`tasks.sampling.sample_batches`)."""
    from alignheads.tasks.train import load_run_model

    model, tokenizer, _ = load_run_model(model_source)
    model = model.to(resolve_device(device))
    stops = eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    decode, done = DECODERS[family](model, trained, model_source, decoding_settings(sweep, stops, pad_id))

    def sample(prompts: Sequence[Any], vectors: Sequence[Sequence[float]], desc: str) -> list[dict[str, Any]]:
        return sample_batches(decode, tokenizer, prompts, vectors, sweep, stops, pad_id, model, progress, desc)

    try:
        yield sample
    finally:
        done()


def dial_generations_table(rows: list[dict[str, Any]], plan: DialGeneratePlan) -> pa.Table:
    """The `dial_generations` table of one plan's `sample_batches` rows."""
    schema = dial_generations_schema(list(plan.alpha))
    fixed = {"method": plan.family, "dial_set": plan.dial_set, "alpha_vector": plan.label}
    fixed |= {f"alpha_{n}": a for n, a in plan.alpha.items()}
    columns = {name: [fixed[name] if name in fixed else r[name] for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def run_dial_generate(
    store: Path, plans: Sequence[DialGeneratePlan], *, device: str = "auto", progress: bool = True
) -> list[ArtifactResult]:
    """The (family, α vector) artifacts of `plans` (one family, one prompt set, one sweep),
    building those not yet complete in one sampling pass over the dials loaded once (batches of
    one α vector each). Returns one result per plan, in order."""
    if not plans:
        return []
    first = plans[0]
    for plan in plans[1:]:
        same = (plan.family, plan.trained, plan.prompts_path, plan.sweep, plan.model)
        if same != (first.family, first.trained, first.prompts_path, first.sweep, first.model):
            raise ValueError("run_dial_generate builds one family's grid at a time (one prompt set and sweep)")

    def sample_pass(vectors: list[tuple[float, ...]]) -> SweepPass:
        with dial_sampler(first.family, first.trained, first.model, first.sweep_config,
                          device=device, progress=progress) as sample:  # fmt: skip
            desc = f"dial sweep {first.family}: {len(vectors)} α vectors"
            return SweepPass.timed(lambda: sample(read_prompt_set(first.prompts_path), vectors, desc))

    def content(plan: DialGeneratePlan, done: SweepPass, staging: Path) -> ArtifactContent:
        rows = done.rows[tuple(plan.alpha.values())]
        table = dial_generations_table(rows, plan)
        info = {
            "family": plan.family,
            "alpha": plan.alpha,
            "alpha_vector": plan.label,
            "rows": table.num_rows,
            "prompts": plan.config["prompts"]["n"],
            # the families' decoding cost
            "lm_forwards_per_token": LM_FORWARDS_PER_TOKEN[plan.family](plan.alpha.values()),
            **done.cost(rows),
        }
        return ArtifactContent(tables={TABLE: write_table(table, staging, TABLE)}, info=info)

    return build_per_point(
        store, STAGE, DIALGEN_VERSION, plans, lambda p: tuple(p.alpha.values()), sample_pass, content,
        name=lambda p: f"dial sweep {p.family} {p.label}",
    )  # fmt: skip


@task(**task_options(STAGE))
def dial_generate_task(store: str, key: str, plans: list[dict[str, Any]]) -> list[StageResult]:
    """The dial generate stage of one family (its whole grid) as a cached Prefect task."""
    results = run_dial_generate(Path(store), [DialGeneratePlan(**p) for p in plans])
    return [StageResult.of(r) for r in results]
