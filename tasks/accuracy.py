"""Accuracy stage: a trained method's held-out preference accuracy at each α of its sweep.

The implicit reward of every method is the unscaled log-ratio ``log π_α(y) − log π_ref(y)``
(`models.methods`); its accuracy is the share of the held-out (test split) pairs whose chosen
response gets the larger reward, ties counting half. At α = 0 a method is the reference itself:
its margins are rounding noise, ties that count as half. The reference values come from the
reference cache. The evaluate stage carries these numbers in its summary's
`preference_accuracy` column.

Output artifact `<store>/accuracy/<key>/`: table `accuracy` (one row per α: the method, its
train key, α, the accuracy and the number of held-out pairs).

Key = hash(train artifact key, the α, format version): the train key covers the model, the
data and its split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.tables import read_table, write_table
from alignheads.tasks.loaded_method import LoadedMethod

__all__ = ["ACCURACY_SCHEMA", "AccuracyPlan", "plan_accuracy", "read_accuracies", "run_accuracy"]

STAGE = "accuracy"
ACCURACY_VERSION = 1
TABLE = "accuracy"

ACCURACY_SCHEMA = pa.schema(
    [
        ("head", pa.string()),
        ("head_key", pa.string()),
        ("alpha", pa.float64()),
        ("preference_accuracy", pa.float64()),  # null: no held-out pairs
        ("n_pairs", pa.int64()),
    ]
)


@dataclass(frozen=True)
class AccuracyPlan:
    """One method's held-out accuracy at `alphas`, resolved, with its artifact key (JSON-able).
    `train_plan` is the method's `tasks.train.TrainPlan` as a dict (it names the reference cache
    and the settings the batches follow)."""

    key: str
    head: str
    head_key: str
    train_path: str
    train_plan: dict
    alphas: list[float]
    config: dict
    inputs: dict[str, str]


def plan_accuracy(train_plan: dict[str, Any], train_path: str | Path, alphas: list[float]) -> AccuracyPlan:
    """The accuracy of the method `train_plan` trained (its complete artifact at `train_path`) at
    every α of `alphas` (duplicates and order do not matter)."""
    from alignheads.tasks.train import STAGE as TRAIN_STAGE

    values = sorted({float(a) + 0.0 for a in alphas})
    config = {"head": train_plan["kind"], "alphas": values}
    inputs = {TRAIN_STAGE: train_plan["key"]}
    return AccuracyPlan(
        key=artifact_key(STAGE, config, inputs, ACCURACY_VERSION),
        head=str(train_plan["kind"]),
        head_key=str(train_plan["key"]),
        train_path=str(train_path),
        train_plan=dict(train_plan),
        alphas=values,
        config=config,
        inputs=inputs,
    )


def held_out_margins(method: LoadedMethod, train_plan: dict[str, Any], alphas: list[float]) -> dict[float, Any]:
    """``{α: margins (N,)}`` over the N held-out pairs: the method's implicit-reward margin
    (chosen − rejected) at each α, micro-batched as its training batched them."""
    import torch

    from alignheads.tasks.train import TrainPlan, pair_streams
    from alignheads.tasks.training.batches import collate

    plan = TrainPlan(**train_plan)
    parts = method.parts()
    cfg = plan.settings
    needs, with_sequences = parts.entry.batches(cfg)
    _, test = pair_streams(plan)
    device = next(parts.model.parameters()).device
    margins: dict[float, list] = {float(a): [] for a in alphas}
    for _, records in test.micro_batches(cfg.batch_size, seed=None, drop_last=False):
        batch = collate(records, needs, with_sequences, parts.pad_id).to(device)
        for alpha, m in parts.entry.score(parts.loaded, batch, list(margins), cfg).items():
            margins[alpha].append(m)
    return {a: torch.cat(m) if m else None for a, m in margins.items()}


def run_accuracy(
    store: Path, plan: AccuracyPlan, device: str = "auto", method: LoadedMethod | None = None
) -> ArtifactResult:
    """Build the accuracy artifact unless a complete one exists. `method`: the method already
    loaded by the caller (`tasks.method_sweep`); by default it is loaded here, only if needed."""
    from alignheads.models.losses import preference_accuracy

    def build(staging: Path) -> ArtifactContent:
        loaded = method or LoadedMethod(plan.head, plan.train_path, plan.train_plan["model"], device)
        margins = held_out_margins(loaded, plan.train_plan, plan.alphas)
        rows = [
            {
                "head": plan.head,
                "head_key": plan.head_key,
                "alpha": alpha,
                "preference_accuracy": None if m is None else preference_accuracy(m),
                "n_pairs": 0 if m is None else int(m.shape[0]),
            }
            for alpha, m in margins.items()
        ]
        table = pa.Table.from_pylist(rows, schema=ACCURACY_SCHEMA)
        info = {"head": plan.head, "by_alpha": {repr(r["alpha"]): r["preference_accuracy"] for r in rows}}
        return ArtifactContent(tables={TABLE: write_table(table, staging, TABLE)}, info=info)

    return ensure_artifact(store, STAGE, plan.key, ACCURACY_VERSION, plan.config, plan.inputs, build)


def read_accuracies(paths: list[str] | tuple[str, ...]) -> dict[str, dict[float, float | None]]:
    """``{method: {α: accuracy}}`` from accuracy artifacts (NaN read back as None)."""
    out: dict[str, dict[float, float | None]] = {}
    for path in paths:
        for row in read_table(Path(path), TABLE).to_pylist():
            value = row["preference_accuracy"]
            clean = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
            out.setdefault(row["head"], {})[float(row["alpha"])] = clean
    return out
