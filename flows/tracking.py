"""Everything a flow run logs to MLflow and to Prefect's artifacts, in one place.

A flow run is an MLflow parent run (experiment = the config's name; params = the flattened
config); each trained method is a child run (its settings, its metrics step by step, its trained
files), each (method, α) of the sweep a child run with the summary's numbers; the report's
plots and tables and the evaluate artifact are the parent run's artifacts, and the summary is
also a Prefect table and markdown artifact. With tracking off, every call here does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect.runtime import flow_run

from alignheads.config import RunConfig
from alignheads.storage.tables import read_table
from alignheads.storage.tracking import Tracker, open_tracker
from alignheads.tasks.cached import RunOutcome, StageResult
from alignheads.tasks.report import report_files
from alignheads.tasks.reporting.printing import summary_markdown
from alignheads.tasks.train import TrainPlan


@dataclass
class ChildRun:
    """A training child run: its id, and what the train task needs to log into it (None: off)."""

    run_id: str | None
    tracking: dict[str, str] | None


@dataclass
class RunTracking:
    """The MLflow parent run of one flow run, or nothing (`tracker` None: tracking off)."""

    tracker: Tracker | None
    run_id: str | None

    @contextlib.contextmanager
    def child_training(self, plan: TrainPlan) -> Iterator[ChildRun]:
        """A child run for training `plan`, ended FAILED if the body raises; close it with
        `trained` when training is done."""
        if self.tracker is None:
            yield ChildRun(None, None)
            return
        from alignheads.storage.tracking import flatten

        params = flatten(plan.train) | {"head": plan.kind, "artifact": plan.key}
        child = self.tracker.start_run(
            f"train-{plan.kind}", params, parent=self.run_id, tags={"head": plan.kind}
        )
        tracking = {"uri": self.tracker.uri, "experiment_id": self.tracker.experiment_id, "run_id": child}
        try:
            yield ChildRun(child, tracking)
        except BaseException:
            self.tracker.end_run(child, "FAILED")
            raise

    def trained(self, child: ChildRun, plan: TrainPlan, result: StageResult) -> None:
        """Close the training child run: metrics (when another run trained it), trained files."""
        if self.tracker is None:
            return
        info = result.info
        if result.status != "computed":  # the metrics were logged by the run that trained it
            self.tracker.log_metrics(
                child.run_id, info.get("final", {}) | info.get("eval", {}), info.get("steps", 0)
            )
        if plan.method.saved_as == "head":  # a whole LM copy is not duplicated into MLflow
            self.tracker.log_artifacts(child.run_id, [plan.saved_in(result.path)], "head")
        self.tracker.end_run(child.run_id)

    def pairs_dataset(self, cfg: RunConfig, data: StageResult) -> None:
        """The validated preference pairs as the parent run's input dataset (digest = data key)."""
        if self.tracker is None:
            return
        pairs = read_table(data.directory, "pairs")
        source = cfg.data.train.path if cfg.data.train is not None else None
        self.tracker.log_dataset(
            self.run_id,
            name=f"{cfg.name}-pairs",
            digest=data.key,
            source=str(source or data.path),
            schema={"columns": [{"name": f.name, "type": str(f.type)} for f in pairs.schema]},
            profile={"num_rows": pairs.num_rows, "splits": data.info.get("pairs", {})},
        )

    def report(self, cfg: RunConfig, outcome: RunOutcome) -> None:
        """The summary as Prefect table + markdown artifacts; in MLflow the plots, tables and
        evaluate artifact on the parent run and one child run per (method, α)."""
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        summary = outcome.report.info["summary"]
        slug = "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
        rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in summary]
        create_table_artifact(key=f"{slug}-summary", table=rows, description="alignheads α-sweep summary")
        create_markdown_artifact(
            key=f"{slug}-report", markdown=summary_markdown(summary), description="α-sweep report"
        )
        if self.tracker is None:
            return
        files = report_files(outcome.report)
        self.tracker.log_artifacts(self.run_id, [p for n, p in files.items() if p.suffix == ".png"], "plots")
        for row in summary:
            name = f"eval-{row['head']}-alpha-{row['alpha']:g}"
            child = self.tracker.start_run(
                name, {"head": row["head"], "alpha": str(row["alpha"])}, parent=self.run_id
            )
            numbers = {
                k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            self.tracker.log_metrics(child, {k: v for k, v in numbers.items() if k != "alpha" and v == v}, 0)
            self.tracker.end_run(child)
        # the scores and summary tables (Parquet, with their manifest), the matched-KL table
        self.tracker.log_artifacts(self.run_id, [outcome.evaluate.directory], "evaluate")
        tables = [p for name, p in files.items() if name.startswith("matched_kl")]
        self.tracker.log_artifacts(self.run_id, tables, "tables")

    def headline(self, outcome: RunOutcome) -> None:
        """The parent run's headline numbers: each method's held-out preference accuracy at α = 1."""
        if self.tracker is None:
            return
        metrics = {
            f"{name}/eval_accuracy": result.info["eval"]["eval/rewards/accuracies"]
            for name, result in outcome.train.items()
            if "eval/rewards/accuracies" in result.info.get("eval", {})
        }
        self.tracker.log_metrics(self.run_id, metrics, 0)


@contextlib.contextmanager
def tracked(cfg: RunConfig, params: dict[str, str], default_name: str) -> Iterator[RunTracking]:
    """This flow run as an MLflow parent run, ended FAILED if the body raises; a RunTracking
    that logs nothing when `cfg.tracking.enabled` is false."""
    if not cfg.tracking.enabled:
        yield RunTracking(None, None)
        return
    tracker = open_tracker(cfg.store, cfg.name, cfg.tracking.uri)
    tags = {"prefect.flow_run_id": str(flow_run.id), "alignheads.store": str(cfg.store)}
    parent = tracker.start_run(flow_run.name or default_name, params, tags=tags)
    try:
        yield RunTracking(tracker, parent)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent)


def logged(outcome: RunOutcome, log: Callable[..., Any]) -> RunOutcome:
    """Log each stage's status and path; returns `outcome`."""
    for name, result in outcome.stages():
        log("%s: %s %s", name, result.status, result.path)
    return outcome
