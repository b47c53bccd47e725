"""Evaluate stage: score every generation of an α sweep and summarise it per (head, α), with
confidence intervals, at the calibrated α of each target KL, and as paired comparisons.

Input: one or more generation artifacts (table `generations`, one artifact per (head, α)) and
the calibrate stage's choice of α per (method, target KL). Output artifact
`<store>/evaluate/<key>/` with four tables:

- `scores` (`SCORES_SCHEMA`, one row per generation): its reward, its outcome against α = 0
  of the same head on the same prompt, sample and seed, and its text statistics;
- `summary` (`SUMMARY_SCHEMA`, one row per (head, α)): means and rates over those rows, their
  95 % bootstrap intervals over prompts (``reward_lo/hi``, ``win_rate_lo/hi``, ``kl_lo/hi``; each
  prompt first reduced to the mean over its samples, `models.intervals`), ``n_prompts`` and
  ``n_samples``, the run id, and each trained method's held-out preference accuracy at that α
  (read from its accuracy artifact, `tasks.accuracy`). Its `kl` is the mean over
  responses of each response's mean per-token KL to the base (`metrics.KL_DEFINITION`, the
  column's description in the schema; why: `metrics.summarize_group`);
- `calibrated` (`CALIBRATED_SCHEMA`, one row per (method, target KL)): the summary row at the
  α calibrated to that KL, with the KL the calibration measured on its own prompts;
- `comparisons` (`COMPARISONS_SCHEMA`): at each target KL, the paired reward difference of
  every two methods, and of each method against α = 0, with its paired interval (the arms
  share prompts and seeds: common random numbers make the per-prompt differences a valid pair).

The metric definitions (words, distinct-n, repetition, ties) are in `alignheads.models.metrics`.
Rewards come from the tiny world's ground truth (`reward="world"`) or a Hugging Face
sequence-classification reward model (`alignheads.tasks.rewards`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from alignheads.models import metrics
from alignheads.models.intervals import mean_interval, paired_difference, per_prompt_means
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import read_table, write_table
from alignheads.tasks.accuracy import STAGE as ACCURACY_STAGE
from alignheads.tasks.accuracy import read_accuracies
from alignheads.tasks.cached import StageResult, task_options
from alignheads.tasks.generate import GENERATIONS_SCHEMA
from alignheads.tasks.generate import TABLE as GENERATIONS_TABLE
from alignheads.tasks.rewards import WORLD_REWARD, compute_rewards, reward_spec

STAGE = "evaluate"
# 2: intervals, the calibrated and comparisons tables
# 3: the held-out accuracy read from accuracy artifacts (inputs `accuracy[i]`, not `train[name]`)
EVALUATE_VERSION = 3

# columns that may be null (per-head statistics); every other column must be filled
_NULLABLE = {"kl_mean", "kl_sum", "strength_mean", "strength_max", "utilisation", "align_norm_mean"}

SCORES_SCHEMA = pa.schema(
    [
        ("head", pa.string()),
        ("head_key", pa.string()),
        ("alpha", pa.float64()),
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("reward", pa.float64()),
        ("outcome", pa.string()),
        ("reward_source", pa.string()),
        ("n_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("kl_mean", pa.float64()),
        ("distinct_1", pa.float64()),
        ("distinct_2", pa.float64()),
        ("repetition", pa.float64()),
        ("strength_mean", pa.float64()),
        ("utilisation", pa.float64()),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("head", pa.string()),
        ("head_key", pa.string()),
        ("alpha", pa.float64()),
        ("reward", pa.float64()),
        ("reward_lo", pa.float64()),
        ("reward_hi", pa.float64()),
        ("reward_std", pa.float64()),
        ("win_rate", pa.float64()),
        ("win_rate_lo", pa.float64()),
        ("win_rate_hi", pa.float64()),
        ("tie_rate", pa.float64()),
        ("lose_rate", pa.float64()),
        ("n_compared", pa.int64()),
        pa.field("kl", pa.float64(), metadata={"description": metrics.KL_DEFINITION}),
        ("kl_lo", pa.float64()),
        ("kl_hi", pa.float64()),
        ("n", pa.int64()),
        ("n_prompts", pa.int64()),
        ("n_samples", pa.int64()),
        ("length", pa.float64()),
        ("distinct_1", pa.float64()),
        ("distinct_2", pa.float64()),
        ("repetition", pa.float64()),
        ("strength_mean", pa.float64()),
        ("utilisation", pa.float64()),
        ("eos_rate", pa.float64()),
        ("preference_accuracy", pa.float64()),
        ("reward_source", pa.string()),
    ]
)


# One row per (method, target KL): the α calibrated to it, measured on the evaluation prompts:
# what the calibration chose, then the summary's columns at that α (taken from SUMMARY_SCHEMA).
CALIBRATED_FROM_SUMMARY = (
    "kl", "kl_lo", "kl_hi", "reward", "reward_lo", "reward_hi", "win_rate", "win_rate_lo", "win_rate_hi",
    "n_prompts", "n_samples",
)  # fmt: skip
CALIBRATED_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("target_kl", pa.float64()),
        ("head", pa.string()),
        ("alpha", pa.float64()),
        ("calibration_kl", pa.float64()),  # the KL the calibration measured (calibration prompts)
        ("converged", pa.bool_()),
        *(SUMMARY_SCHEMA.field(name) for name in CALIBRATED_FROM_SUMMARY),
    ]
)

# One row per (target KL, pair of arms): the paired reward difference a − b over shared prompts.
# Arm b is another method at its calibrated α, or the same method at α = 0 (`head_b` "α=0").
COMPARISONS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("target_kl", pa.float64()),
        ("head_a", pa.string()),
        ("alpha_a", pa.float64()),
        ("kl_a", pa.float64()),
        ("head_b", pa.string()),
        ("alpha_b", pa.float64()),
        ("kl_b", pa.float64()),
        ("reward_diff", pa.float64()),
        ("diff_lo", pa.float64()),
        ("diff_hi", pa.float64()),
        ("significant", pa.bool_()),  # the interval excludes 0
        ("n_prompts", pa.int64()),
    ]
)
BASE_ARM = "α=0"


def statistics_settings(evaluate: Any, seed: int) -> dict[str, Any]:
    """The bootstrap settings of `evaluate` (an EvaluateConfig), seeded from the sweep's seed."""
    return {"confidence": evaluate.confidence, "n_resamples": evaluate.bootstrap_resamples, "seed": int(seed)}


@dataclass(frozen=True)
class EvaluatePlan:
    """The evaluate stage's inputs, resolved, with the artifact key they hash to (JSON-able).

    `generation_paths` are sorted by artifact key, so the order they were given in does not
    matter. `accuracy_paths` are the accuracy artifacts (`tasks.accuracy`) of the methods whose
    held-out preference accuracy the summary carries (none: the column stays empty).
    `run_id` is written into the summary but is not part of the key (see `plan_evaluate`).
    """

    key: str
    generation_paths: tuple[str, ...]
    reward: dict
    run_id: str
    accuracy_paths: tuple[str, ...]
    calibration: dict
    statistics: dict
    batch_size: int
    config: dict
    inputs: dict[str, str]


def _alpha_key(alpha: Any) -> str:
    return repr(float(alpha))


def normalize_preference_accuracy(pref: dict | None) -> dict[str, dict[str, float]]:
    """``{head: {α: acc}}`` with α keys as ``repr(float(α))`` ("1" and 1.0 both give "1.0")."""
    out: dict[str, dict[str, float]] = {}
    for head, by_alpha in (pref or {}).items():
        if not isinstance(by_alpha, dict):
            raise ValueError(f"preference_accuracy[{head!r}] must be a dict {{alpha: accuracy}}")
        entries: dict[str, float] = {}
        for alpha, acc in by_alpha.items():
            try:
                key = _alpha_key(alpha)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"preference_accuracy[{head!r}]: alpha {alpha!r} is not a number") from exc
            entries[key] = None if acc is None else float(acc)
        out[str(head)] = dict(sorted(entries.items()))
    return dict(sorted(out.items()))


def plan_evaluate(
    generation_paths: list[str] | list[Path],
    reward: str = WORLD_REWARD,
    *,
    run_id: str = "",
    accuracy_paths: list[str] | list[Path] | None = None,
    calibration: dict[str, list[dict]] | None = None,
    statistics: dict[str, Any] | None = None,
    reward_revision: str | None = None,
    reward_dtype: str = "float32",
    reward_max_length: int = 1024,
    reward_batch_size: int = 16,
    trust_remote_code: bool = False,
) -> EvaluatePlan:
    """Key = hash(the generation artifacts' keys, the reward spec, the accuracy artifacts' keys,
    format version).

    `accuracy_paths`: complete accuracy artifacts (`tasks.accuracy`), each one method's held-out
    preference accuracy at its α. `run_id` (the
    pipeline's MLflow parent run id, or '') is not in the key: a rerun that finds the artifact
    complete reuses it, and its summary keeps the run id of the run that computed it.
    `reward_batch_size` is not (scores do not depend on it). `calibration`: ``{method: [{target,
    alpha, kl, converged, steps}]}`` from the calibrate stage (the α generated for each target
    KL); `statistics`: the bootstrap's confidence, n_resamples and seed (both in the key).
    """
    if not generation_paths:
        raise ValueError("plan_evaluate needs at least one generation artifact")
    if reward_batch_size < 1:
        raise ValueError(f"reward_batch_size must be >= 1, got {reward_batch_size}")
    by_key: dict[str, str] = {}
    for p in generation_paths:
        manifest = read_manifest(Path(p))
        if GENERATIONS_TABLE not in manifest.tables:
            raise ValueError(
                f"{p}: artifact has no table {GENERATIONS_TABLE!r} (has {sorted(manifest.tables)})"
            )
        if manifest.key in by_key and by_key[manifest.key] != str(p):
            continue  # the same artifact named twice (e.g. two stores' copies): count it once
        by_key[manifest.key] = str(p)
    keys = sorted(by_key)
    spec = reward_spec(reward, reward_revision, reward_dtype, reward_max_length, trust_remote_code)
    accuracy = {read_manifest(Path(p), ACCURACY_STAGE).key: str(p) for p in accuracy_paths or ()}
    statistics = dict(statistics or {"confidence": 0.95, "n_resamples": 2000, "seed": 0})
    calibration = {name: list(rows) for name, rows in sorted((calibration or {}).items())}
    config = {
        "reward": spec,
        "tie_tolerance": metrics.TIE_TOLERANCE,
        "statistics": statistics,
        "calibration": calibration,
    }
    inputs = {f"generations[{i}]": k for i, k in enumerate(keys)}
    inputs |= {f"accuracy[{i}]": k for i, k in enumerate(sorted(accuracy))}
    return EvaluatePlan(
        key=artifact_key(STAGE, config, inputs, EVALUATE_VERSION),
        generation_paths=tuple(by_key[k] for k in keys),
        reward={**spec, "revision": reward_revision} if spec["kind"] == "model" else spec,
        run_id=str(run_id or ""),
        accuracy_paths=tuple(accuracy[k] for k in sorted(accuracy)),
        calibration=calibration,
        statistics=statistics,
        batch_size=int(reward_batch_size),
        config=config,
        inputs=inputs,
    )


# --- reading the generations ------------------------------------------------------------------


def load_generations(paths: list[str] | tuple[str, ...]) -> pa.Table:
    """The `generations` tables of the artifacts, concatenated and cast to `GENERATIONS_SCHEMA`.

    Missing nullable statistics columns are filled with nulls; a missing required column, a
    null in a required field, or one (head, head_key, α, prompt_id, sample_index, seed) twice
    raises ValueError naming the artifact and row.
    """
    parts = []
    for p in paths:
        table = read_table(Path(p), GENERATIONS_TABLE)
        missing = [f.name for f in GENERATIONS_SCHEMA if f.name not in table.column_names]
        required_missing = [m for m in missing if m not in _NULLABLE]
        if required_missing:
            raise ValueError(f"{p}: table generations lacks column(s) {', '.join(required_missing)}")
        cols = []
        for field in GENERATIONS_SCHEMA:
            if field.name in missing:
                cols.append(pa.nulls(table.num_rows, field.type))
                continue
            try:
                cols.append(table.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"{p}: column generations.{field.name} is not {field.type}: {exc}") from exc
            if field.name not in _NULLABLE and cols[-1].null_count:
                row = pc.index(pc.is_null(cols[-1]), True).as_py()
                raise ValueError(f"{p}: generations row {row}: field '{field.name}' is null")
        parts.append(pa.Table.from_arrays(cols, schema=GENERATIONS_SCHEMA))
    table = pa.concat_tables(parts)
    ident = ("head", "head_key", "alpha", "prompt_id", "sample_index", "seed")
    seen: dict[tuple, int] = {}
    for i, row in enumerate(zip(*(table.column(c).to_pylist() for c in ident), strict=True)):
        if row in seen:
            raise ValueError(
                f"generation {dict(zip(ident, row, strict=True))} appears twice (rows {seen[row]} and {i} "
                f"of the concatenated artifacts {list(paths)})"
            )
        seen[row] = i
    heads: dict[str, set[str]] = {}
    for head, head_key in zip(
        table.column("head").to_pylist(), table.column("head_key").to_pylist(), strict=True
    ):
        heads.setdefault(head, set()).add(head_key)
    for head, hkeys in heads.items():
        if len(hkeys) > 1:
            raise ValueError(
                f"head {head!r} comes from {len(hkeys)} trained heads ({', '.join(sorted(hkeys))}); "
                "evaluate one sweep per head at a time"
            )
    return table


# --- scores and summary -----------------------------------------------------------------------


def score_table(generations: pa.Table, rewards: list[float], reward_source: str) -> pa.Table:
    """The `scores` table: one row per generation (same order), with outcome against α = 0."""
    if len(rewards) != generations.num_rows:
        raise ValueError(f"{len(rewards)} rewards for {generations.num_rows} generations")
    for i, r in enumerate(rewards):
        if r is None or not math.isfinite(r):
            raise ValueError(f"generation row {i}: reward {r!r} is not a finite number")
    cols = {name: generations.column(name).to_pylist() for name in GENERATIONS_SCHEMA.names}
    keys = list(
        zip(
            cols["head"], cols["head_key"], cols["prompt_id"], cols["sample_index"], cols["seed"], strict=True
        )
    )
    outcomes = metrics.outcomes_against_baseline(keys, cols["alpha"], rewards)
    stats = [metrics.text_stats(r) for r in cols["response"]]
    data = {
        **{c: cols[c] for c in ("head", "head_key", "alpha", "prompt_id", "sample_index", "seed")},
        "reward": [float(r) for r in rewards],
        "outcome": outcomes,
        "reward_source": [reward_source] * len(rewards),
        **{c: cols[c] for c in ("n_tokens", "finish_reason", "kl_mean")},
        **{c: [s[c] for s in stats] for c in ("distinct_1", "distinct_2", "repetition")},
        "strength_mean": cols["strength_mean"],
        "utilisation": cols["utilisation"],
    }
    return pa.Table.from_pydict(data, schema=SCORES_SCHEMA)


def _arm_means(members: list[dict]) -> dict[str, dict[str, float]]:
    """Per-prompt means of one (head, α) group's rows: ``{"reward"|"kl"|"win": {prompt_id: mean}}``
    (`win`: the share of its compared samples that won against α = 0; prompts without any
    compared sample, and responses without a KL, are left out of that metric)."""
    ids = [r["prompt_id"] for r in members]
    compared = [r for r in members if r["outcome"] is not None]
    with_kl = [r for r in members if r["kl_mean"] is not None]
    return {
        "reward": per_prompt_means(ids, [r["reward"] for r in members]),
        "kl": per_prompt_means([r["prompt_id"] for r in with_kl], [r["kl_mean"] for r in with_kl]),
        "win": per_prompt_means(
            [r["prompt_id"] for r in compared], [1.0 if r["outcome"] == "win" else 0.0 for r in compared]
        ),
    }


def _interval_columns(means: dict[str, dict[str, float]], statistics: dict[str, Any]) -> dict[str, Any]:
    """``reward_lo/hi, win_rate_lo/hi, kl_lo/hi`` of one arm: bootstrap over its prompts."""
    out: dict[str, Any] = {}
    for metric, column in (("reward", "reward"), ("win", "win_rate"), ("kl", "kl")):
        values = list(means[metric].values())
        if not values:
            out |= {f"{column}_lo": None, f"{column}_hi": None}
            continue
        ci = mean_interval(values, **statistics)
        out |= {f"{column}_lo": _finite(ci.lo), f"{column}_hi": _finite(ci.hi)}
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _groups(scores: pa.Table) -> dict[tuple[str, float], list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in scores.to_pylist():
        groups.setdefault((row["head"], row["alpha"]), []).append(row)
    return dict(sorted(groups.items()))


def summary_table(
    scores: pa.Table,
    run_id: str = "",
    preference_accuracy: dict | None = None,
    statistics: dict[str, Any] | None = None,
) -> pa.Table:
    """The `summary` table: one row per (head, α) of the scores, sorted by head then α, with
    bootstrap intervals over prompts (`models.intervals`) for reward, win rate and KL."""
    pref = normalize_preference_accuracy(preference_accuracy)
    statistics = statistics or {}
    rows = []
    for (head, alpha), members in _groups(scores).items():
        agg = metrics.summarize_group(members)
        if agg["kl"] is not None:  # KL >= 0: a negative mean is float roundoff
            agg["kl"] = max(agg["kl"], 0.0)
        means = _arm_means(members)
        rows.append(
            {
                "run_id": run_id,
                "head": head,
                "head_key": members[0]["head_key"],
                "alpha": alpha,
                **agg,
                **_interval_columns(means, statistics),
                "n_prompts": len(means["reward"]),
                "n_samples": len({r["sample_index"] for r in members}),
                "preference_accuracy": pref.get(head, {}).get(_alpha_key(alpha)),
                "reward_source": members[0]["reward_source"],
            }
        )
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def calibrated_table(
    summary: pa.Table, calibration: dict[str, list[dict]], run_id: str = ""
) -> pa.Table:
    """The `calibrated` table: for each method and target KL, its summary row at the α the
    calibration chose (measured on the evaluation prompts), sorted by target then head."""
    by_arm = {(r["head"], r["alpha"]): r for r in summary.to_pylist()}
    rows = []
    for head, found in calibration.items():
        for c in found:
            s = by_arm.get((head, float(c["alpha"])))
            if s is None:
                raise ValueError(f"no generations of {head} at its calibrated α = {c['alpha']:g}")
            rows.append(
                {
                    "run_id": run_id,
                    "target_kl": float(c["target"]),
                    "head": head,
                    "alpha": float(c["alpha"]),
                    "calibration_kl": float(c["kl"]),
                    "converged": bool(c["converged"]),
                    **{k: s[k] for k in CALIBRATED_FROM_SUMMARY},
                }
            )
    rows.sort(key=lambda r: (r["target_kl"], r["head"]))
    return pa.Table.from_pylist(rows, schema=CALIBRATED_SCHEMA)


def comparisons_table(
    scores: pa.Table,
    calibration: dict[str, list[dict]],
    run_id: str = "",
    statistics: dict[str, Any] | None = None,
) -> pa.Table:
    """The `comparisons` table: at each target KL, every pair of methods at their calibrated α
    (each unordered pair once, a before b by name), and each method against its own α = 0, with
    the reward difference a − b over their shared prompts and its paired bootstrap interval."""
    statistics = statistics or {}
    groups = _groups(scores)
    rewards: dict[tuple[str, float], dict[str, float]] = {}  # per-prompt means of the arms compared

    def reward_means(arm: tuple[str, float]) -> dict[str, float]:
        if arm not in rewards:
            rewards[arm] = _arm_means(groups[arm])["reward"]
        return rewards[arm]

    def kl(arm: tuple[str, float]) -> float | None:
        return metrics.mean(r["kl_mean"] for r in groups[arm])

    at: dict[float, dict[str, float]] = {}
    for head, found in calibration.items():
        for c in found:
            at.setdefault(float(c["target"]), {})[head] = float(c["alpha"])
    rows = []

    def add(target: float, a: tuple[str, float], b: tuple[str, float], label_b: str) -> None:
        ci = paired_difference(reward_means(a), reward_means(b), **statistics)
        rows.append(
            {
                "run_id": run_id,
                "target_kl": target,
                "head_a": a[0],
                "alpha_a": a[1],
                "kl_a": kl(a),
                "head_b": label_b,
                "alpha_b": b[1],
                "kl_b": max(kl(b) or 0.0, 0.0) if b[1] == 0 else kl(b),
                "reward_diff": ci.mean,
                "diff_lo": _finite(ci.lo),
                "diff_hi": _finite(ci.hi),
                "significant": ci.excludes_zero,
                "n_prompts": ci.n,
            }
        )

    for target, alphas in sorted(at.items()):
        heads = sorted(h for h in alphas if (h, alphas[h]) in groups)
        for i, ha in enumerate(heads):
            for hb in heads[i + 1 :]:
                add(target, (ha, alphas[ha]), (hb, alphas[hb]), hb)
        for h in heads:
            if (h, 0.0) in groups:
                add(target, (h, alphas[h]), (h, 0.0), BASE_ARM)
    return pa.Table.from_pylist(rows, schema=COMPARISONS_SCHEMA)


def run_evaluate(store: Path, plan: EvaluatePlan, device: str | None = None) -> ArtifactResult:
    """Build the evaluate artifact (tables `scores` and `summary`) unless a complete one exists.

    `device` is where a reward model runs (default: CUDA when available); unused for "world".
    The manifest's info holds the row count, the reward source and the summary rows.
    """

    def build(staging: Path) -> ArtifactContent:
        generations = load_generations(plan.generation_paths)
        rewards, reward_info = compute_rewards(
            plan.reward,
            plan.batch_size,
            generations.column("prompt").to_pylist(),
            generations.column("response").to_pylist(),
            device,
        )
        scores = score_table(generations, rewards, reward_info["source"])
        accuracy = read_accuracies(plan.accuracy_paths)
        summary = summary_table(scores, plan.run_id, accuracy, plan.statistics)
        calibrated = calibrated_table(summary, plan.calibration, plan.run_id)
        comparisons = comparisons_table(scores, plan.calibration, plan.run_id, plan.statistics)
        info = {
            "rows": scores.num_rows,
            "reward": reward_info,
            "statistics": plan.statistics,
            "summary": summary.to_pylist(),
            "calibrated": calibrated.to_pylist(),
            "comparisons": comparisons.to_pylist(),
        }
        tables = {
            "scores": write_table(scores, staging, "scores"),
            "summary": write_table(summary, staging, "summary"),
            "calibrated": write_table(calibrated, staging, "calibrated"),
            "comparisons": write_table(comparisons, staging, "comparisons"),
        }
        return ArtifactContent(tables=tables, info=info)

    return ensure_artifact(store, STAGE, plan.key, EVALUATE_VERSION, plan.config, plan.inputs, build)


@task(**task_options(STAGE))
def evaluate_task(store: str, key: str, plan: dict[str, Any]) -> StageResult:
    """The evaluate stage as a cached Prefect task."""
    plan = {**plan, "generation_paths": tuple(plan["generation_paths"])}
    return StageResult.of(run_evaluate(Path(store), EvaluatePlan(**plan)))
