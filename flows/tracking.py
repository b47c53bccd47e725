"""Everything a flow run logs to MLflow and to Prefect's artifacts, in one place.

A flow run is an MLflow parent run (experiment = the config's name; params = the flattened
config); each trained method is a child run (its settings, its metrics step by step, its trained
files), each (method, α) of the sweep a child run with the summary's numbers; the report's
plots and tables and the evaluate artifact are the parent run's artifacts, and the summary is
also a Prefect table and markdown artifact. With tracking off, every call here does nothing.

Results are logged once, by the flow run that computed them. A stage answered from the store
or from Prefect's cache (status ``cached`` or ``reused``) adds nothing to MLflow:

- a `train-<method>` child run only when this flow run trained that method (it is created
  before training, so the metrics arrive live; if another process finished the same artifact
  meanwhile, the empty child run is deleted); a trained head is also that run's MLflow model,
  registered as `<name>-<method>` (aliases `newest`, `best`: `RunTracking.register_head`);
- `eval-<head>-alpha-<α>` child runs and the `evaluate/` artifacts only when the evaluation
  was computed now; `plots/` and `tables/` only when the report was;
- the headline metrics `<method>/eval_accuracy` only when the flow run computed something.

Every flow run still gets its parent run (its params and the pairs it ran on, as its input
dataset), tagged at the end with `alignheads.cached`: ``true`` when it computed nothing. Each
result it reused is named by a tag `alignheads.reused.<result>` (``train-<method>``: the child
run holding that training; ``evaluate``: the parent run that computed the evaluation), and a
cached run's `alignheads.results_run` is the parent run that computed its final result (the
evaluation, or for a train-only flow the last method's training). A re-run that recomputes
nothing thus adds one parent run and no copies. Before a flow run starts its parent run, the
runs of killed processes still marked RUNNING are ended as KILLED (`end_dead_runs`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from alignheads.config import RunConfig, SweepConfig
from alignheads.storage.tables import read_table
from alignheads.storage.tracking import Tracker, end_dead_runs, open_tracker
from alignheads.tasks.cached import RunOutcome, StageResult, is_complete
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
    store: Path | None = None
    # result name (train-<method>, evaluate) -> the MLflow run that logged it, when reused
    reused: dict[str, str] = field(default_factory=dict)
    # the parent runs that computed reused results, in the order the flow used them
    reused_from: list[str] = field(default_factory=list)
    # the config's name (registered models are `<name>-<method>`) and the served models' defaults
    name: str | None = None
    decoding: dict[str, Any] = field(default_factory=dict)

    def _start_training(self, plan: TrainPlan) -> str:
        from alignheads.storage.tracking import flatten

        params = flatten(plan.train) | {"head": plan.kind, "artifact": plan.key}
        return self.tracker.start_run(
            f"train-{plan.run_label}", params, parent=self.run_id, tags={"head": plan.run_label}
        )

    @contextlib.contextmanager
    def child_training(self, plan: TrainPlan) -> Iterator[ChildRun]:
        """A child run for training `plan` when it is to be trained now (no complete artifact in
        the store), ended FAILED if the body raises; close it with `trained` either way."""
        if self.tracker is None or (self.store is not None and is_complete(self.store, "train", plan.key)):
            yield ChildRun(None, None)
            return
        child = self._start_training(plan)
        tracking = {"uri": self.tracker.uri, "experiment_id": self.tracker.experiment_id, "run_id": child}
        try:
            yield ChildRun(child, tracking)
        except BaseException:
            self.tracker.end_run(child, "FAILED")
            raise

    def trained(self, child: ChildRun, plan: TrainPlan, result: StageResult) -> None:
        """Close the training child run (trained files), or, for a method trained earlier, name
        the run that holds its training."""
        if self.tracker is None:
            return
        if result.status != "computed":
            if child.run_id is not None:  # another process finished the same artifact meanwhile
                self.tracker.delete_run(child.run_id)
            self._note_reused_training(plan)
            return
        run_id = child.run_id
        if run_id is None:  # rebuilt although it looked complete (a corrupt artifact, set aside)
            run_id = self._start_training(plan)
            self.tracker.log_history(run_id, read_table(result.directory, "train_metrics").to_pylist())
        if plan.method.saved_as == "head":  # a whole LM copy is not duplicated into MLflow
            self.tracker.log_artifacts(run_id, [plan.saved_in(result.path)], "head")
            try:
                self.register_head(run_id, plan, result)
            except Exception as exc:  # noqa: BLE001 (the trained head is in the store; say so, go on)
                _logger().warning("MLflow: the %s head was not logged as a model: %s", plan.kind, exc)
                self.tracker.set_tags(run_id, {"alignheads.model_error": str(exc)[:5000]})
        self.tracker.end_run(run_id)

    def register_head(self, run_id: str, plan: TrainPlan, result: StageResult) -> None:
        """The trained head as an MLflow pyfunc model (the run's `model/`), registered as
        `<name>-<method>` with aliases `newest` and, for the best held-out accuracy, `best`
        (`storage.model_registry`). The tiny world's base model travels inside the model; any
        other base is recorded (id and revision) and loaded when the model is."""
        import importlib.util
        import tempfile

        from alignheads.models.head_io import read_head_file
        from alignheads.storage import model_registry

        head_dir = plan.saved_in(result.path)
        recorded = read_head_file(head_dir).base_model
        source = Path(plan.model["name_or_path"]).expanduser()
        world = (Path(self.store) / "world").resolve() if self.store is not None else None
        bundled = source.resolve() if world is not None and source.resolve().is_relative_to(world) else None
        base = {
            "name_or_path": recorded.name_or_path,
            "revision": recorded.revision,
            "dtype": plan.model.get("dtype", "float32"),
            "trust_remote_code": bool(plan.model.get("trust_remote_code", False)),
        }
        accuracy = result.info.get("eval", {}).get("eval/rewards/accuracies")
        run_name = self.name or self.tracker.client.get_experiment(self.tracker.experiment_id).name
        name = f"{run_name}-{plan.run_label}"
        info = {"train_key": plan.key, "method": plan.kind, "eval_accuracy": accuracy, "registered_as": name}
        code = Path(importlib.util.find_spec("alignheads.serving").origin)  # MLflow runs it; not imported
        defaults = self.decoding or served_defaults(SweepConfig())
        with tempfile.TemporaryDirectory() as tmp:
            saved = model_registry.save_head_model(
                Path(tmp) / model_registry.MODEL_PATH, code=code, head_dir=head_dir, base=base,
                defaults=defaults, bundled_base=bundled, info=info,
            )  # fmt: skip
            self.tracker.log_artifacts(run_id, [saved], model_registry.MODEL_PATH)
        done = model_registry.register(
            self.tracker, run_id, name, accuracy=accuracy,
            tags={"alignheads.train_key": plan.key, "alignheads.head": plan.kind},
            description=f"alignheads {plan.kind} head: prompts in, responses out; params alpha, "
            "max_new_tokens, temperature, top_p, seed",
        )  # fmt: skip
        aliases = ", ".join(done.aliases)
        _logger().info("MLflow: registered %s version %s (%s)", done.name, done.version, aliases)

    def _note_reused_training(self, plan: TrainPlan) -> None:
        found = self.tracker.first_run(
            f"params.artifact = '{plan.key}' AND attributes.run_name = 'train-{plan.run_label}' "
            "AND attributes.status = 'FINISHED'"
        )
        if found is None:  # trained with tracking off
            return
        self.reused[f"train-{plan.run_label}"] = found.info.run_id
        parent = found.data.tags.get("mlflow.parentRunId")
        if parent:
            self.reused_from.append(parent)

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
        create_table_artifact(
            key=f"{slug}-summary", table=summary_artifact_rows(summary), description="alignheads α-sweep summary"
        )
        create_markdown_artifact(
            key=f"{slug}-report", markdown=summary_markdown(summary), description="α-sweep report"
        )
        if self.tracker is None:
            return
        files = report_files(outcome.report)
        if outcome.report.status == "computed":
            self.tracker.log_artifacts(
                self.run_id, [p for p in files.values() if p.suffix == ".png"], "plots"
            )
            tables = [p for name, p in files.items() if name.startswith(("matched_kl", "comparisons"))]
            self.tracker.log_artifacts(self.run_id, tables, "tables")
        if outcome.evaluate.status != "computed":  # its child runs and files were logged by then
            computed_by = next((str(r["run_id"]) for r in summary if r.get("run_id")), None)
            if computed_by:
                self.reused["evaluate"] = computed_by
                self.reused_from.append(computed_by)
            return
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
        # the scores and summary tables (Parquet, with their manifest)
        self.tracker.log_artifacts(self.run_id, [outcome.evaluate.directory], "evaluate")

    def dial_report(self, cfg: RunConfig, outcome: RunOutcome) -> None:
        """The dial sweep in MLflow: the Pareto plots and dials.md on the parent run (`dials/`),
        the dial evaluation's tables (`dial_evaluate/`) and one child run per (method, α vector),
        `dial-<method>-<α vector>`, with each dial's α as params and the summary's numbers as
        metrics; logged by the run that computed them only."""
        if self.tracker is None:
            return
        if outcome.dial_report.status == "computed":
            self.tracker.log_artifacts(self.run_id, list(report_files(outcome.dial_report).values()), "dials")
        if outcome.dial_evaluate.status != "computed":
            return
        for row in outcome.dial_evaluate.info["summary"]:
            alphas = {k: str(v) for k, v in row.items() if k.startswith("alpha_") and k != "alpha_vector"}
            params = {"method": row["method"], "alpha_vector": row["alpha_vector"], **alphas}
            child = self.tracker.start_run(f"dial-{row['method']}-{row['alpha_vector']}", params, parent=self.run_id)
            numbers = {
                k: float(v) for k, v in row.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and not k.startswith("alpha_")
            }  # fmt: skip
            self.tracker.log_metrics(child, {k: v for k, v in numbers.items() if v == v}, 0)
            self.tracker.end_run(child)
        self.tracker.log_artifacts(self.run_id, [outcome.dial_evaluate.directory], "dial_evaluate")

    def headline(self, outcome: RunOutcome) -> None:
        """The parent run's headline numbers: the model loads of the methods' sweeps (`model_loads`
        and `<method>/model_loads`), and each method's held-out preference accuracy at α = 1 (not
        for a run that computed nothing: they are the results run's)."""
        if self.tracker is None:
            return
        if outcome.model_loads:
            loads = {f"{name}/model_loads": float(n) for name, n in outcome.model_loads.items()}
            self.tracker.log_metrics(self.run_id, {"model_loads": float(sum(outcome.model_loads.values()))} | loads, 0)
        if not computed_anything(outcome):
            return
        metrics = {
            f"{name}/eval_accuracy": result.info["eval"]["eval/rewards/accuracies"]
            for name, result in outcome.train.items()
            if "eval/rewards/accuracies" in result.info.get("eval", {})
        }
        self.tracker.log_metrics(self.run_id, metrics, 0)

    def finish(self, outcome: RunOutcome) -> None:
        """Tag the parent run with what it computed: `alignheads.cached`, the reused results'
        runs and, for a run that computed nothing, `alignheads.results_run`."""
        if self.tracker is None:
            return
        cached = not computed_anything(outcome)
        tags = {"alignheads.cached": str(cached).lower()}
        tags |= {f"alignheads.reused.{name}": run_id for name, run_id in self.reused.items()}
        if cached and self.reused_from:
            tags["alignheads.results_run"] = self.reused_from[-1]
        self.tracker.set_tags(self.run_id, tags)


# the columns people look at first in the Prefect UI's table artifact, in this order
_LEADING = ("head", "alpha", "reward", "reward_lo", "reward_hi", "win_rate", "kl", "n_prompts", "n_samples")


def summary_artifact_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The summary rows for a Prefect table artifact: method, α, reward with its interval, win
    rate and KL first (the long ids last), floats rounded to 4 places."""

    def ordered(row: dict[str, Any]) -> dict[str, Any]:
        keys = [k for k in _LEADING if k in row] + [k for k in row if k not in _LEADING]
        return {("method" if k == "head" else k): (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in keys}

    return [ordered(r) for r in summary]


def served_defaults(sweep: SweepConfig) -> dict[str, Any]:
    """The registered models' parameter defaults: α 1 and the run's sweep decoding (temperature 0
    when the sweep decodes greedily)."""
    return {
        "alpha": 1.0,
        "max_new_tokens": sweep.max_new_tokens,
        "temperature": sweep.temperature if sweep.do_sample else 0.0,
        "top_p": sweep.top_p,
        "seed": sweep.seed,
    }


def computed_anything(outcome: RunOutcome) -> bool:
    """Whether any stage of the flow run was computed by it (not answered from store or cache)."""
    return any(result.status == "computed" for _, result in outcome.stages())


@contextlib.contextmanager
def tracked(cfg: RunConfig, params: dict[str, str], default_name: str) -> Iterator[RunTracking]:
    """This flow run as an MLflow parent run, ended FAILED if the body raises; a RunTracking
    that logs nothing when `cfg.tracking.enabled` is false. Runs of killed processes left
    RUNNING on the tracking store are ended (KILLED) first."""
    if not cfg.tracking.enabled:
        yield RunTracking(None, None)
        return
    tracker = open_tracker(cfg.store, cfg.name, cfg.tracking.uri)
    try:
        ended = end_dead_runs(tracker)
    except Exception as exc:  # noqa: BLE001 (tidying other runs must not stop this one)
        _logger().warning("MLflow: could not check for runs of killed processes: %s", exc)
    else:
        if ended:
            _logger().warning(
                "MLflow: %d run(s) of killed processes marked KILLED: %s", len(ended), ", ".join(ended)
            )
    tags = {"prefect.flow_run_id": str(flow_run.id), "alignheads.store": str(cfg.store)}
    parent = tracker.start_run(flow_run.name or default_name, params, tags=tags)
    try:
        yield RunTracking(tracker, parent, cfg.store, name=cfg.name, decoding=served_defaults(cfg.sweep))
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    tracker.end_run(parent)


def log_merged_checkpoint(cfg: RunConfig, checkpoint: Path, alpha: float, head_dir: Path):
    """A merged IAV checkpoint (`alignheads merge`) as the plain transformers model it is: an
    `mlflow.transformers` model in a run `merge-iav-alpha-<α>` of the config's experiment,
    registered as `<name>-iav-merged` (alias `newest`). Returns the `Registered` version."""
    import tempfile

    from alignheads.storage import model_registry

    tracker = open_tracker(cfg.store, cfg.name, cfg.tracking.uri)
    params = {"alpha": str(alpha), "head_dir": str(head_dir), "checkpoint": str(checkpoint)}
    run_id = tracker.start_run(f"merge-iav-alpha-{alpha:g}", params, tags={"head": "iav-merged"})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            saved = model_registry.save_transformers_model(Path(tmp) / model_registry.MODEL_PATH, checkpoint)
            tracker.log_artifacts(run_id, [saved], model_registry.MODEL_PATH)
        done = model_registry.register(
            tracker, run_id, f"{cfg.name}-iav-merged", aliases_best=False,
            tags={"alignheads.alpha": str(alpha), "alignheads.head": "iav-merged"},
            description="an IAV head folded into lm_head (W_b + alpha W_a): a plain transformers model",
        )  # fmt: skip
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id)
    return done


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 (outside a flow run: Prefect has no run logger)
        return logging.getLogger(__name__)


def logged(outcome: RunOutcome, log: Callable[..., Any]) -> RunOutcome:
    """Log each stage's status and where its result is (a trained method: its `head/` or
    `model/`); returns `outcome`."""
    for name, result in outcome.stages():
        log("%s: %s %s", name, result.status, result.location)
    return outcome
