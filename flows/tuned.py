"""A search's result as an artifact of its own, and a run config that takes the search's best trials.

`<store>/search/<key>/` (stage `search`) is written at the end of the tune flow (`flows.tune`):

- table `trials`, one row per trial in the search's order (`TRIALS_SCHEMA`): `method, trial`,
  `settings` (the trial's searched values, JSON), `train_key, evaluate_key`, its validation
  scores `reward, reward_lo, reward_hi, alpha, kl, converged`, `eval_accuracy` and `best`;
- info: `target_kl`, `validation_prompts` (the prompt set's path), `methods` (those searched) and
  `best`: per method, its best trial (`trial`, `train_key`, `evaluate_key`, `reward`, `values`
  and `settings`, the trial's whole `train.<method>` section).

The key is the hash of the trials' train and evaluate keys, which cover everything a trial and
its score depend on: the same search gives the same artifact (`alignheads query` shows the table
as the view `trials`).

A trial is an ordinary train artifact, so `with_tuned` only has to put the best trial's settings
into a run config: the pipeline then plans the trial's own train key and reuses its training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from alignheads.config import ConfigError, RunConfig
from alignheads.storage.artifacts import ArtifactContent, artifact_dir, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import MANIFEST, read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import StageResult
from alignheads.tasks.export import newest_artifact

SEARCH_STAGE = "search"
SEARCH_VERSION = 1
TRIALS_TABLE = "trials"
LATEST = "latest"  # `search` naming the newest complete search artifact of the store

TRIALS_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("trial", pa.int64()),
        ("settings", pa.string()),  # the trial's searched values as JSON
        ("train_key", pa.string()),
        ("evaluate_key", pa.string()),
        ("reward", pa.float64()),
        ("reward_lo", pa.float64()),
        ("reward_hi", pa.float64()),
        ("alpha", pa.float64()),
        ("kl", pa.float64()),
        ("converged", pa.bool_()),
        ("eval_accuracy", pa.float64()),
        ("best", pa.bool_()),
    ]
)


def save_search(store: str | Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> StageResult:
    """The search artifact of `rows` (one per trial, in the search's order, with `TRIALS_SCHEMA`'s
    columns) and `info` (module docstring); status ``computed``, or ``reused`` when the same
    trials were saved before (then the artifact already there is returned as it is)."""
    config = {"trials": [[r["method"], r["trial"], r["train_key"], r["evaluate_key"]] for r in rows]}
    key = artifact_key(SEARCH_STAGE, config, {}, SEARCH_VERSION)

    def build(staging: Path) -> ArtifactContent:
        table = pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA)
        return ArtifactContent(tables={TRIALS_TABLE: write_table(table, staging, TRIALS_TABLE)}, info=info)

    result = StageResult.of(
        ensure_artifact(Path(store), SEARCH_STAGE, key, SEARCH_VERSION, config, {}, build)
    )
    return result.model_copy(update={"status": "computed" if result.computed else "reused"})


def find_search(store: str | Path, search: str = LATEST) -> Path:
    """The directory of the search artifact `search` names: its key, its directory, or "latest"
    (the store's newest complete one). FileNotFoundError, one line naming the store, when there
    is none; ArtifactError when the directory holds another stage's artifact (or another format)."""
    store = Path(store)
    if search == LATEST:
        try:
            return artifact_dir(store, SEARCH_STAGE, newest_artifact(store, SEARCH_STAGE))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no complete search in the store {store} (nothing in {store / SEARCH_STAGE}): "
                "run `alignheads tune` first"
            ) from None
    # a key first: a directory of the working directory that happens to be named like one loses
    for path in (artifact_dir(store, SEARCH_STAGE, search), Path(search)):
        if (path / MANIFEST).is_file():
            # another stage's artifact, or another format of this one: ArtifactError saying so
            read_manifest(path, SEARCH_STAGE, SEARCH_VERSION)
            return path
    raise FileNotFoundError(
        f"no complete search {search!r} in the store {store} (neither a key in {store / SEARCH_STAGE} nor "
        'an artifact directory); list them with alignheads query "SELECT DISTINCT artifact FROM trials"'
    )


def search_info(path: str | Path) -> dict[str, Any]:
    """The info of the search artifact at `path` (module docstring)."""
    return dict(read_manifest(Path(path), SEARCH_STAGE, SEARCH_VERSION).info)


def best_settings(store: str | Path, search: str = LATEST) -> dict[str, dict[str, Any]]:
    """``{method: settings}``: for each method the search tuned (and scored), its best trial's whole
    `train.<method>` section. `search`: a search artifact key, its directory, or "latest"."""
    best = search_info(find_search(store, search))["best"]
    return {method: dict(record["settings"]) for method, record in best.items()}


def with_tuned(cfg: RunConfig, search: str) -> RunConfig:
    """`cfg` with `train.<method>` replaced by the best trial's settings for every method the search
    `search` tuned (`best_settings` in `cfg.store`), each method's `enabled` kept from `cfg`.
    Other sections, and methods the search did not tune, stay as they are."""
    raw = cfg.model_dump(mode="json")
    tuned = best_settings(cfg.store, search)
    for method, settings in tuned.items():
        raw["train"][method] = settings | {"enabled": raw["train"][method]["enabled"]}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:  # a search saved before a setting was renamed or removed
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise ConfigError(
            f"search {search!r}: its best trials' settings do not validate: {where}: {error['msg']}"
        ) from None


def tuned_line(path: str | Path) -> str:
    """One line naming the search at `path` and, per method, the best trial taken (its searched
    values and validation reward); a searched method without a scored trial says so."""
    info = search_info(path)
    parts = []
    for method in info["methods"]:
        record = info["best"].get(method)
        if record is None:
            parts.append(f"{method}: no scored trial, left as configured")
            continue
        values = " ".join(f"{k}={v}" for k, v in record["values"].items()) or "the run config's settings"
        parts.append(f"{method} trial {record['trial']} ({values}; validation reward {record['reward']:.4g})")
    return f"tuned settings from search {Path(path).name}: " + ", ".join(parts)
