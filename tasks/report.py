"""Report stage: what people look at after an α sweep, as a cached artifact.

From the evaluate artifact's `summary`, `calibrated` and `comparisons` tables and the generation
artifacts' decoding costs, the artifact `<store>/report/<key>/` holds the plots (reward vs α,
the reward–KL frontier with the calibrated points marked, win rate vs α, and the paired
difference against the strongest baseline; PNG, all with 95 % intervals), the reward-at-matched-KL
table (`matched_kl.parquet`, `matched_kl.md`), the paired comparisons (`comparisons.md`) and the
summary as markdown (`summary.md`); its manifest lists each file with its checksum, and its info
carries the summary, matched-KL and comparison rows for the console and the trackers.

Key = hash(the evaluate artifact's key, the generation artifacts' keys, format version).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.atomic import write_bytes_atomic
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import read_table
from alignheads.tasks.cached import StageResult, task_options

STAGE = "report"
REPORT_VERSION = 2  # 2: intervals, calibrated matched-KL points, paired comparisons
SUMMARY_MARKDOWN = "summary.md"


@dataclass(frozen=True)
class ReportPlan:
    """The report's inputs, resolved, with the artifact key they hash to (JSON-able)."""

    key: str
    evaluate_path: str
    generation_paths: list[str]
    config: dict
    inputs: dict[str, str]


def plan_report(evaluate_path: str | Path, generation_paths: list[str] | list[Path]) -> ReportPlan:
    """The report of a complete evaluate artifact and the generation artifacts it scored."""
    evaluate = read_manifest(Path(evaluate_path), "evaluate")
    keys = {read_manifest(Path(p), "generate").key: str(p) for p in generation_paths}
    inputs = {"evaluate": evaluate.key} | {f"generations[{i}]": k for i, k in enumerate(sorted(keys))}
    config: dict[str, Any] = {}
    return ReportPlan(
        key=artifact_key(STAGE, config, inputs, REPORT_VERSION),
        evaluate_path=str(evaluate_path),
        generation_paths=[keys[k] for k in sorted(keys)],
        config=config,
        inputs=inputs,
    )


def decoding_costs(generation_infos: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per method: LM forwards per generated token, and the measured ms per generated token of its
    fastest generation artifact (the one least slowed by other load on the machine; None where
    an artifact predates these records)."""
    rates: dict[str, list[float | None]] = {}
    forwards: dict[str, int | None] = {}
    for info in generation_infos:
        seconds, tokens = info.get("decode_seconds"), info.get("generated_tokens")
        rates.setdefault(info["head"], []).append(1000 * seconds / tokens if seconds and tokens else None)
        forwards[info["head"]] = info.get("lm_forwards_per_token")
    return {
        head: {
            "lm_forwards_per_token": forwards[head],
            "ms_per_token": None if None in per_token else min(per_token),
        }
        for head, per_token in rates.items()
    }


def run_report(store: Path, plan: ReportPlan) -> ArtifactResult:
    """Draw and write the report unless the artifact is complete."""
    from alignheads.tasks.reporting.matched_kl import matched_kl_rows, save_matched_kl
    from alignheads.tasks.reporting.plots import save_summary_plots
    from alignheads.tasks.reporting.printing import summary_markdown

    def build(staging: Path) -> ArtifactContent:
        evaluate = Path(plan.evaluate_path)
        summary = read_table(evaluate, "summary").to_pylist()
        tables_in = read_manifest(evaluate, "evaluate").tables
        calibrated = read_table(evaluate, "calibrated").to_pylist() if "calibrated" in tables_in else []
        comparisons = read_table(evaluate, "comparisons").to_pylist() if "comparisons" in tables_in else []
        infos = [read_manifest(Path(p), "generate").info for p in plan.generation_paths]
        plots = save_summary_plots(summary, staging, calibrated, comparisons)
        matched = matched_kl_rows(calibrated, decoding_costs(infos))
        tables = save_matched_kl(matched, comparisons, staging)
        write_bytes_atomic(staging / SUMMARY_MARKDOWN, summary_markdown(summary).encode("utf-8"))
        files = {name: path.name for name, path in (plots | tables).items()}
        info = {"summary": summary, "matched_kl": matched, "comparisons": comparisons, "files": files}
        return ArtifactContent(info=info)

    return ensure_artifact(store, STAGE, plan.key, REPORT_VERSION, plan.config, plan.inputs, build)


def report_files(result: StageResult) -> dict[str, Path]:
    """The report artifact's files by name (plots, matched-KL table and markdown), as paths."""
    return {name: result.directory / file for name, file in result.info.get("files", {}).items()}


@task(**task_options(STAGE))
def report_task(store: str, key: str, plan: dict[str, Any]) -> StageResult:
    """The report stage as a cached Prefect task."""
    return StageResult.of(run_report(Path(store), ReportPlan(**plan)))
