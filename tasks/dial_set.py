"""Dials: the grid of α vectors a dial sweep decodes, their labels, and the dial-set artifact.

A dial set is the trained dials of one run, by name: `<store>/dials/<key>/` holds the table
`dials` (`name, method, objective, train_key, train_path, reward_lm_key, reward_lm_path`; the
paths relative to the store, the reward LM that of multi-objective GenARM when it was trained).
`alignheads generate --dial` and `inference.load_dials` read it; its key is the hash of
those rows, so the same dials always give the same set.

An α vector is a mapping ``{dial: α}`` over every dial of the set, in the set's order; a dial
missing from a user's vector is at 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import read_table, write_table

STAGE = "dials"
DIALS_VERSION = 1
TABLE = "dials"
BASE_LABEL = "base"  # the label of the all-zero α vector: the base model itself

DIALS_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("method", pa.string()),
        ("objective", pa.string()),
        ("train_key", pa.string()),
        ("train_path", pa.string()),
        ("reward_lm_key", pa.string()),
        ("reward_lm_path", pa.string()),
    ]
)


# --- α vectors ------------------------------------------------------------------------------------


def full_vector(names: Sequence[str], alpha: Mapping[str, float]) -> dict[str, float]:
    """``alpha`` over every dial of `names`, in that order (missing dials at 0). Raises
    ValueError naming any dial `names` does not hold, or a non-finite α."""
    unknown = sorted(set(alpha) - set(names))
    if unknown:
        raise ValueError(f"no dial named {', '.join(map(repr, unknown))}: the dials are {', '.join(names)}")
    out = {name: float(alpha.get(name, 0.0)) + 0.0 for name in names}  # + 0.0: -0.0 is 0.0
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"every dial's α must be a finite number, got {bad}")
    return out


def vector_label(alpha: Mapping[str, float]) -> str:
    """A short stable name of an α vector: its non-zero dials as ``name=α`` joined by commas, in
    the vector's order (``"helpful=1,concise=0.5"``); the all-zero vector is ``"base"``."""
    parts = [f"{name}={value:g}" for name, value in alpha.items() if value != 0]
    return ",".join(parts) or BASE_LABEL


def dial_grid(
    names: Sequence[str],
    strengths: Iterable[float],
    together: float,
    grid: Iterable[Mapping[str, float]] | None = None,
) -> list[dict[str, float]]:
    """The α vectors of a dial sweep, each over every dial of `names`: the all-zero vector first,
    then either the explicit `grid`, or the default grid (each dial alone at each of
    `strengths`, every pair of dials at `together` each, and all dials at `together`).
    Duplicates are dropped, keeping the first."""
    vectors = [dict.fromkeys(names, 0.0)]
    if grid is not None:
        vectors += [full_vector(names, v) for v in grid]
    else:
        vectors += [full_vector(names, {n: s}) for n in names for s in strengths]
        vectors += [full_vector(names, dict.fromkeys(pair, together)) for pair in itertools.combinations(names, 2)]
        if len(names) > 2:
            vectors.append(full_vector(names, dict.fromkeys(names, together)))
    unique: dict[tuple[float, ...], dict[str, float]] = {}
    for v in vectors:
        unique.setdefault(tuple(v.values()), v)
    return list(unique.values())


def parse_dial_items(items: Sequence[str]) -> dict[str, float]:
    """``["helpful=1", "concise=0.5"]`` (the CLI's repeated ``--dial``, the chat loop's ``:alpha``)
    → ``{"helpful": 1.0, "concise": 0.5}``; raises ValueError naming a malformed item."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or not math.isfinite(number):
            raise ValueError(f"{item!r}: give a dial as name=α, e.g. helpful=1.0")
        if name in out:
            raise ValueError(f"dial {name!r} given twice")
        out[name] = number
    return out


# --- the dial-set artifact ------------------------------------------------------------------------


def save_dial_set(store: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """The dial set `rows` (DIALS_SCHEMA's columns; paths absolute or relative to the store) as
    an artifact, `<store>/dials/<key>/`; returns its path."""
    store = Path(store)

    def relative(path: str | None) -> str | None:
        if path is None:
            return None
        p = Path(path)
        return p.resolve().relative_to(store.resolve()).as_posix() if p.is_absolute() else p.as_posix()

    clean = [{**r, "train_path": relative(r["train_path"]), "reward_lm_path": relative(r.get("reward_lm_path"))} for r in rows]
    clean = [{name: r.get(name) for name in DIALS_SCHEMA.names} for r in clean]
    key = artifact_key(STAGE, {"dials": clean}, {}, DIALS_VERSION)

    def build(staging: Path) -> ArtifactContent:
        table = pa.Table.from_pylist(clean, schema=DIALS_SCHEMA)
        return ArtifactContent(tables={TABLE: write_table(table, staging, TABLE)}, info={"dials": [r["name"] for r in clean]})

    return Path(ensure_artifact(store, STAGE, key, DIALS_VERSION, {"dials": clean}, {}, build).path)


def find_dial_set(path: str | Path) -> Path:
    """A dial-set artifact given as itself (`<store>/dials/<key>`) or as a store (its newest)."""
    from alignheads.tasks.export import newest_artifact

    path = Path(path)
    if (path / STAGE).is_dir() and not (path / "manifest.json").is_file():
        return path / STAGE / newest_artifact(path, STAGE)
    return path


def read_dial_set(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a dial-set artifact, in dial order, with `train_path` and `reward_lm_path`
    made absolute (the store is the artifact's grandparent)."""
    path = Path(path)
    read_manifest(path, STAGE)  # a clear error when this is not a complete dial set
    store = path.parent.parent
    rows = read_table(path, TABLE).to_pylist()
    for r in rows:
        r["train_path"] = str(store / r["train_path"])
        if r["reward_lm_path"] is not None:
            r["reward_lm_path"] = str(store / r["reward_lm_path"])
    return rows
