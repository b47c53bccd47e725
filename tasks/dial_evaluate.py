"""Dial evaluate stage: every objective scored per α vector, with intervals and paired effects.

Tables:

- `dial_scores`: one row per dial generation: `method, dial_set, alpha_vector`, the `alpha_<dial>`
  columns, `prompt_id, sample_index, seed, n_tokens, finish_reason, kl_mean`, `reward` (the run's
  reward: the world's total, or `evaluate.reward`'s model), one column per objective (its score:
  the world's objective term, `alignheads.world.reward.OBJECTIVES`, or the dial's reward model),
  and with the world's reward every reward term as `term_<name>`.
- `dial_summary`: one row per (run, method, α vector): the α columns; for each objective, the
  reward and the KL its mean over prompts with a bootstrap interval (`<objective>`,
  `<objective>_lo`, `<objective>_hi`; `models.intervals`: a prompt's samples are averaged first);
  the world terms' means; `n_prompts, n_samples, length, eos_rate`; the decoding cost
  (`lm_forwards_per_token`, `ms_per_token`: the pass's wall time per generated token).
- `dial_effects`: one row per (method, α vector other than all-zero, metric): the paired
  difference to the same method's all-zero vector (`diff, diff_lo, diff_hi, significant`) over
  the shared prompts, which common random numbers make a valid pair.

Key = hash(the dial generation keys, the reward specs of the run and of each objective, the
bootstrap settings, format version).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task

from alignheads.models.intervals import mean_interval, paired_difference, per_prompt_means
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import read_table, write_table
from alignheads.tasks.cached import StageResult, task_options
from alignheads.tasks.dial_generate import TABLE as GENERATIONS_TABLE
from alignheads.tasks.dial_set import BASE_LABEL
from alignheads.tasks.rewards import WORLD_REWARD, compute_rewards

STAGE = "dialeval"
DIALEVAL_VERSION = 1
WORLD_OBJECTIVE = "world-objective"  # an objective scored by the world's own term for it


@dataclass(frozen=True)
class DialEvaluatePlan:
    """The dial evaluation's inputs, resolved, with their key (JSON-able).

    `objectives`: ``{objective: spec}``, spec ``{"kind": "world-objective"}`` or a reward-model
    spec (`tasks.rewards.reward_spec`); `reward`: the run's reward spec; `run_id` is written into
    the summary but not keyed."""

    key: str
    generation_paths: tuple[str, ...]
    dials: dict[str, str]  # dial -> objective
    objectives: dict[str, dict]
    reward: dict
    run_id: str
    statistics: dict
    batch_size: int
    config: dict
    inputs: dict[str, str]


def plan_dial_evaluate(
    generation_paths: Sequence[str | Path],
    dials: dict[str, str],
    objectives: dict[str, dict],
    reward: dict,
    *,
    statistics: dict[str, Any],
    run_id: str = "",
    batch_size: int = 16,
) -> DialEvaluatePlan:
    """The plan scoring the dial generations at `generation_paths` (sorted by key)."""
    keys = {read_manifest(Path(p)).key: str(p) for p in generation_paths}
    if not keys:
        raise ValueError("plan_dial_evaluate needs at least one dial generation artifact")
    order = sorted(keys)
    config = {"reward": reward, "objectives": dict(sorted(objectives.items())), "statistics": statistics, "dials": dials}
    inputs = {f"dialgen[{i}]": k for i, k in enumerate(order)}
    return DialEvaluatePlan(
        key=artifact_key(STAGE, config, inputs, DIALEVAL_VERSION),
        generation_paths=tuple(keys[k] for k in order),
        dials=dict(dials),
        objectives=dict(objectives),
        reward=dict(reward),
        run_id=str(run_id or ""),
        statistics=dict(statistics),
        batch_size=int(batch_size),
        config=config,
        inputs=inputs,
    )


# --- scoring ---------------------------------------------------------------------------------------


def world_scores(prompts: list[str], responses: list[str]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(objective -> scores, term -> values) of the tiny world for each (prompt, response)."""
    from alignheads.world.reward import OBJECTIVES, TERMS, objective_sums, reward_terms

    terms: dict[str, list[float]] = {t: [] for t in TERMS}
    objectives: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    for prompt, response in zip(prompts, responses, strict=True):
        row = reward_terms(prompt, response)
        for t, v in row.items():
            terms[t].append(v)
        for name, v in objective_sums(row).items():
            objectives[name].append(v)
    return objectives, terms


def score_dial_generations(generations: pa.Table, plan: DialEvaluatePlan, device: str | None = None) -> pa.Table:
    """The `dial_scores` table of the concatenated dial generations (same row order)."""
    prompts = generations.column("prompt").to_pylist()
    responses = generations.column("response").to_pylist()
    world = plan.reward["kind"] == WORLD_REWARD or any(s["kind"] == WORLD_OBJECTIVE for s in plan.objectives.values())
    world_objectives, terms = world_scores(prompts, responses) if world else ({}, {})
    reward = (
        # the world's reward is the plain sum of its terms (`world.reward.reward`), summed alike
        [float(sum(vals)) for vals in zip(*terms.values(), strict=True)]
        if plan.reward["kind"] == WORLD_REWARD
        else compute_rewards(plan.reward, plan.batch_size, prompts, responses, device)[0]
    )
    keep = [c for c in generations.column_names if c not in ("prompt", "response", "kl_sum")]
    table = generations.select(keep).append_column("reward", pa.array(reward, pa.float64()))
    for objective, spec in sorted(plan.objectives.items()):
        if spec["kind"] == WORLD_OBJECTIVE:
            values = world_objectives[objective]
        else:
            values = compute_rewards(spec, plan.batch_size, prompts, responses, device)[0]
        table = table.append_column(objective, pa.array(values, pa.float64()))
    if plan.reward["kind"] == WORLD_REWARD:
        for term, values in terms.items():
            table = table.append_column(f"term_{term}", pa.array(values, pa.float64()))
    return table


def _arms(scores: pa.Table) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The rows of each (method, α vector), in grid order: by method, then all-zero first, each
    dial alone (in dial order, weakest first), then the combinations."""
    alphas = [c for c in scores.column_names if c.startswith("alpha_") and c != "alpha_vector"]
    arms: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in scores.to_pylist():
        arms.setdefault((row["method"], row["alpha_vector"]), []).append(row)

    def order(item: tuple[tuple[str, str], list[dict[str, Any]]]) -> tuple:
        (method, _), rows = item
        vector = [rows[0][c] for c in alphas]
        on = [i for i, a in enumerate(vector) if a]
        return (method, len(on), on, vector)

    return dict(sorted(arms.items(), key=order))


def _metrics(objectives: Sequence[str]) -> list[str]:
    return [*objectives, "reward", "kl_mean"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def dial_summary_table(
    scores: pa.Table,
    objectives: Sequence[str],
    cost: dict[tuple[str, str], dict[str, float]],
    statistics: dict[str, Any],
    run_id: str = "",
) -> pa.Table:
    """The `dial_summary` table: one row per (method, α vector) of `scores`, in their order.
    `cost`: (method, label) -> {lm_forwards_per_token, ms_per_token}."""
    alpha_columns = [c for c in scores.column_names if c.startswith("alpha_") and c != "alpha_vector"]
    term_columns = [c for c in scores.column_names if c.startswith("term_")]
    rows = []
    for (method, label), members in _arms(scores).items():
        ids = [r["prompt_id"] for r in members]
        row: dict[str, Any] = {"run_id": run_id, "method": method, "dial_set": members[0]["dial_set"], "alpha_vector": label}
        row |= {c: members[0][c] for c in alpha_columns}
        for metric in _metrics(objectives):
            name = "kl" if metric == "kl_mean" else metric
            ci = mean_interval(list(per_prompt_means(ids, [r[metric] for r in members]).values()), **statistics)
            row |= {name: max(ci.mean, 0.0) if name == "kl" else ci.mean, f"{name}_lo": _finite(ci.lo), f"{name}_hi": _finite(ci.hi)}
        row |= {c: math.fsum(r[c] for r in members) / len(members) for c in term_columns}
        row |= {
            "n_prompts": len(set(ids)),
            "n_samples": len({r["sample_index"] for r in members}),
            "n": len(members),
            "length": math.fsum(r["n_tokens"] for r in members) / len(members),
            "eos_rate": sum(r["finish_reason"] == "eos" for r in members) / len(members),
            **cost.get((method, label), {"lm_forwards_per_token": None, "ms_per_token": None}),
        }
        rows.append(row)
    return pa.Table.from_pylist(rows)


def dial_effects_table(scores: pa.Table, objectives: Sequence[str], statistics: dict[str, Any]) -> pa.Table:
    """The `dial_effects` table: each (method, α vector) against the same method's all-zero
    vector, per metric (each objective, the reward and the KL), paired over shared prompts."""
    arms = _arms(scores)
    rows = []
    for (method, label), members in arms.items():
        base = arms.get((method, BASE_LABEL))
        if label == BASE_LABEL or base is None:
            continue
        for metric in _metrics(objectives):
            a = per_prompt_means([r["prompt_id"] for r in members], [r[metric] for r in members])
            b = per_prompt_means([r["prompt_id"] for r in base], [r[metric] for r in base])
            ci = paired_difference(a, b, **statistics)
            rows.append(
                {
                    "method": method,
                    "alpha_vector": label,
                    "metric": "kl" if metric == "kl_mean" else metric,
                    "diff": ci.mean,
                    "diff_lo": _finite(ci.lo),
                    "diff_hi": _finite(ci.hi),
                    "significant": ci.excludes_zero,
                    "n_prompts": ci.n,
                }
            )
    schema = pa.schema(
        [("method", pa.string()), ("alpha_vector", pa.string()), ("metric", pa.string()), ("diff", pa.float64()),
         ("diff_lo", pa.float64()), ("diff_hi", pa.float64()), ("significant", pa.bool_()), ("n_prompts", pa.int64())]
    )  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schema)


def run_dial_evaluate(store: Path, plan: DialEvaluatePlan, device: str | None = None) -> ArtifactResult:
    """Build the dial evaluation (tables `dial_scores`, `dial_summary`, `dial_effects`)."""

    def build(staging: Path) -> ArtifactContent:
        parts, cost = [], {}
        for path in plan.generation_paths:
            manifest = read_manifest(Path(path))
            table = read_table(Path(path), GENERATIONS_TABLE)
            parts.append(table)
            info = manifest.info
            tokens = info.get("generated_tokens") or 0
            cost[(info["family"], info["alpha_vector"])] = {
                "lm_forwards_per_token": info.get("lm_forwards_per_token"),
                "ms_per_token": 1000.0 * info["decode_seconds"] / tokens if tokens else None,
            }
        generations = pa.concat_tables(parts, promote_options="default")
        scores = score_dial_generations(generations, plan, device)
        objectives = sorted(plan.objectives)
        summary = dial_summary_table(scores, objectives, cost, plan.statistics, plan.run_id)
        effects = dial_effects_table(scores, objectives, plan.statistics)
        tables = {
            "dial_scores": write_table(scores, staging, "dial_scores"),
            "dial_summary": write_table(summary, staging, "dial_summary"),
            "dial_effects": write_table(effects, staging, "dial_effects"),
        }
        info = {"summary": summary.to_pylist(), "effects": effects.to_pylist(), "objectives": objectives, "dials": plan.dials}
        return ArtifactContent(tables=tables, info=info)

    return ensure_artifact(store, STAGE, plan.key, DIALEVAL_VERSION, plan.config, plan.inputs, build)


@task(**task_options(STAGE))
def dial_evaluate_task(store: str, key: str, plan: dict[str, Any]) -> StageResult:
    """The dial evaluate stage as a cached Prefect task."""
    return StageResult.of(run_dial_evaluate(Path(store), DialEvaluatePlan(**plan)))
