"""Dial report stage: the dial sweep's Pareto plots and tables, as a cached artifact.

From the dial evaluation's `dial_summary` and `dial_effects`, `<store>/dialreport/<key>/` holds
`pareto_<a>_<b>.png` for every pair of objectives (every α vector with 95 % intervals on both
axes, each method's front drawn) and `dials.md`: the summary per α vector, then the checks a dial
must pass. Its info carries the same rows.

The checks, per method: each dial alone at `together` (the α the grid uses for combinations)
against the all-zero vector: its own objective's paired difference (`own_*`, which should be
positive with an interval excluding 0) and every other objective's (`others`: `ok` when it
moved by less than `tolerance` or its interval includes 0). And for each pair of objectives, whether
the vectors turning on both dials reach a point that no single dial reaches
(`tasks.reporting.pareto.beyond_singles`).

Key = hash(the dial evaluation's key, the tolerance, format version).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.atomic import write_bytes_atomic
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.tasks.cached import StageResult, task_options
from alignheads.tasks.dial_set import vector_label

STAGE = "dialreport"
DIALREPORT_VERSION = 1
MARKDOWN = "dials.md"
SIDE_EFFECT_TOLERANCE = 0.05  # the issue's bar: another objective may move by less than this


@dataclass(frozen=True)
class DialReportPlan:
    """The dial report's inputs, resolved, with their key (JSON-able)."""

    key: str
    evaluate_path: str
    together: float
    config: dict
    inputs: dict[str, str]


def plan_dial_report(evaluate_path: str | Path, together: float) -> DialReportPlan:
    """The report of a complete dial evaluation; `together`: the α of the single-dial checks."""
    evaluate = read_manifest(Path(evaluate_path), "dialeval")
    config = {"together": float(together), "tolerance": SIDE_EFFECT_TOLERANCE}
    inputs = {"dialeval": evaluate.key}
    return DialReportPlan(artifact_key(STAGE, config, inputs, DIALREPORT_VERSION), str(evaluate_path),
                          float(together), config, inputs)  # fmt: skip


def dial_checks(
    summary: list[dict[str, Any]], effects: list[dict[str, Any]], dials: dict[str, str], together: float
) -> dict[str, Any]:
    """The report's checks (module docstring) from the dial evaluation's rows."""
    from alignheads.tasks.reporting.pareto import beyond_singles

    names = list(dials)
    objectives = sorted(set(dials.values()))
    by = {(e["method"], e["alpha_vector"], e["metric"]): e for e in effects}
    singles, pairs = [], []
    for method in sorted({r["method"] for r in summary}):
        for dial, objective in dials.items():
            label = vector_label({n: together if n == dial else 0.0 for n in names})
            own = by.get((method, label, objective))
            if own is None:
                continue
            others = {}
            for other in objectives:
                if other == objective:
                    continue
                e = by[(method, label, other)]
                inside = e["diff_lo"] is not None and e["diff_lo"] <= 0 <= e["diff_hi"]
                others[other] = {**_diff(e), "ok": abs(e["diff"]) < SIDE_EFFECT_TOLERANCE or inside}
            singles.append({"method": method, "dial": dial, "objective": objective, "alpha_vector": label,
                            **{f"own_{k}": v for k, v in _diff(own).items()}, "others": others})  # fmt: skip
        rows = [r for r in summary if r["method"] == method]
        for a, b in itertools.combinations(objectives, 2):
            for found in beyond_singles(rows, a, b, dials):
                pairs.append({"method": method, "objectives": [a, b], **found})
    return {"singles": singles, "pairs": pairs}


def _diff(e: dict[str, Any]) -> dict[str, Any]:
    return {"diff": e["diff"], "lo": e["diff_lo"], "hi": e["diff_hi"], "significant": e["significant"]}


def _ci(row: dict[str, Any], name: str) -> str:
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    interval = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"{row[name]:+.3f}{interval}"


def dials_markdown(summary: list[dict[str, Any]], checks: dict[str, Any], objectives: list[str]) -> str:
    """The summary per α vector and the checks, as markdown."""
    head = ["method", "α vector", *objectives, "reward", "KL", "ms/token"]
    lines = ["## Dial sweep (means over prompts, 95 % intervals)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for r in summary:
        ms = f"{r['ms_per_token']:.2f}" if r.get("ms_per_token") is not None else "–"
        cells = [r["method"], r["alpha_vector"], *(_ci(r, o) for o in objectives), _ci(r, "reward"),
                 f"{r['kl']:.3f}", ms]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Each dial alone against α = 0 (paired differences)", ""]
    for s in checks["singles"]:
        own = f"{s['own_diff']:+.3f} [{s['own_lo']:+.3f}, {s['own_hi']:+.3f}]"
        verdict = "raises it" if s["own_significant"] and s["own_diff"] > 0 else "NOT shown to raise it"
        side = "; ".join(
            f"{o} {v['diff']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]{'' if v['ok'] else ' (moved)'}"
            for o, v in s["others"].items()
        )
        lines.append(f"- {s['method']} {s['alpha_vector']}: {s['objective']} {own}, {verdict}; others: {side}")
    lines += ["", "## Combinations beyond any single dial (Pareto)", ""]
    for p in checks["pairs"]:
        a, b = p["objectives"]
        verdict = "beyond every single dial" if p["beyond_singles"] else f"dominated by {', '.join(p['dominated_by'])}"
        lines.append(f"- {p['method']} {p['alpha_vector']}: {a} {p[a]:+.3f}, {b} {p[b]:+.3f}: {verdict}")
    return "\n".join(lines) + "\n"


def run_dial_report(store: Path, plan: DialReportPlan) -> ArtifactResult:
    """Draw and write the dial report unless the artifact is complete."""
    from alignheads.tasks.reporting.pareto import save_pareto_plots

    def build(staging: Path) -> ArtifactContent:
        info_in = read_manifest(Path(plan.evaluate_path), "dialeval").info
        summary, effects, objectives = info_in["summary"], info_in["effects"], info_in["objectives"]
        checks = dial_checks(summary, effects, info_in["dials"], plan.together)
        plots = save_pareto_plots(summary, objectives, staging)
        write_bytes_atomic(staging / MARKDOWN, dials_markdown(summary, checks, objectives).encode("utf-8"))
        files = {name: path.name for name, path in plots.items()} | {"dials": MARKDOWN}
        return ArtifactContent(info={"summary": summary, "checks": checks, "objectives": objectives, "files": files})

    return ensure_artifact(store, STAGE, plan.key, DIALREPORT_VERSION, plan.config, plan.inputs, build)


@task(**task_options(STAGE))
def dial_report_task(store: str, key: str, plan: dict[str, Any]) -> StageResult:
    """The dial report stage as a cached Prefect task."""
    return StageResult.of(run_dial_report(Path(store), DialReportPlan(**plan)))
