"""Terminal output: the run summary (where each table is) and query results, with rich."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from alignheads.config import RunConfig
from alignheads.models.metrics import KL_DEFINITION
from alignheads.tasks.cached import RunOutcome
from alignheads.tasks.method_sweep import loads_line


def print_run_summary(cfg: RunConfig, outcome: RunOutcome, console: Console | None = None) -> None:
    """A compact row per stage (status, short artifact key, tables with row counts); then the
    trained methods, the sweep's summary with its intervals and legend, the matched-KL table,
    which paired differences are significant, the report's files, and where the MLflow runs and
    the store are."""
    from alignheads.storage.tracking import default_tracking_uri

    console = console or Console()
    table = Table(title=f"alignheads run '{cfg.name}' (artifacts: <store>/<stage>/<key>/)")
    for col in ("stage", "status", "key", "tables (rows)"):
        table.add_column(col, overflow="fold")
    stages = outcome.stages()
    for stage, result in stages:
        tables = ", ".join(f"{n} ({r})" for n, r in result.tables.items()) or "-"
        table.add_row(stage, result.status, result.key[:12], tables)
    console.print(table)
    print_head_summary(outcome, console)
    if outcome.report is not None:
        info = outcome.report.info
        print_sweep_summary(info["summary"], console)
        if info.get("matched_kl"):
            print_matched_kl(info["matched_kl"], console)
        if info.get("comparisons") is not None:
            print_significant(info["comparisons"], console)
        console.print(f"Report (plots, matched_kl.md, comparisons.md, summary.md): {outcome.report.directory}")
    if outcome.dial_report is not None:
        print_dial_summary(outcome.dial_report.info, console)
        console.print(f"Dial report (Pareto plots, dials.md): {outcome.dial_report.directory}")
    rejected = sum(outcome.data.info.get("rejects", {}).values()) if outcome.data is not None else 0
    if rejected:
        console.print(
            f'[yellow]{rejected} bad rows skipped[/] (see: alignheads query "SELECT * FROM rejects")'
        )
    if all(result.status != "computed" for _, result in stages):
        console.print("Nothing recomputed: every stage was already complete in the store.")
    else:
        done = [s for s, result in stages if result.status == "computed"]
        reused = [s for s, result in stages if result.status != "computed"]
        tail = f"; reused from the store: {', '.join(reused)}" if reused else ""
        console.print(f"Computed: {', '.join(done)}{tail}.")
    if outcome.model_loads:
        console.print(loads_line(outcome.model_loads).capitalize() + ".")
    if outcome.mlflow_run is not None:  # the run this flow run logged to (a cached run points on)
        uri = cfg.tracking.uri or default_tracking_uri(cfg.store)
        console.print(f"MLflow run id: {outcome.mlflow_run} (experiment '{cfg.name}')")
        console.print(f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    console.print(f"Store: {cfg.store}   (tables: alignheads query \"SELECT * FROM summary\")")


def print_dial_summary(info: dict[str, Any], console: Console) -> None:
    """The dial sweep: each (method, α vector) with every objective's mean and 95 % interval, the
    reward and the KL; then each dial alone against α = 0 and the combinations beyond any single
    dial (the dial report's checks)."""
    objectives = info["objectives"]
    table = Table(title="dial sweep: mean objective terms [95 % interval over prompts]")
    for col in ("method", "α vector", *objectives, "reward", "KL", "ms/tok"):
        table.add_column(col, justify="left" if col in ("method", "α vector") else "right", overflow="fold")
    for r in info["summary"]:
        ms = r.get("ms_per_token")
        table.add_row(
            r["method"], r["alpha_vector"], *(_with_interval(r, o) for o in objectives),
            _with_interval(r, "reward"), f"{r['kl']:.3f}", "-" if ms is None else f"{ms:.2f}",
        )  # fmt: skip
    console.print(table)
    for c in info["checks"]["singles"]:
        raised = c["own_significant"] and c["own_diff"] > 0
        moved = [o for o, v in c["others"].items() if not v["ok"]]
        console.print(
            f"  {c['method']} {c['alpha_vector']}: {c['objective']} {c['own_diff']:+.3f} "
            f"[{c['own_lo']:+.3f}, {c['own_hi']:+.3f}] vs α = 0 ({'raised' if raised else 'not shown'})"
            + (f"; also moved: {', '.join(moved)}" if moved else "; other objectives within 0.05 or noise")
        )
    for p in info["checks"]["pairs"]:
        if p["beyond_singles"]:
            a, b = p["objectives"]
            console.print(f"  {p['method']} {p['alpha_vector']} reaches ({a}, {b}) beyond every single dial")


def _with_interval(row: dict[str, Any], name: str) -> str:
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    return f"{row[name]:+.3f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None and hi is not None else "")


def print_head_summary(outcome: RunOutcome, console: Console) -> None:
    """Trained methods: steps, final training loss, held-out preference accuracy and margin at α = 1."""
    if not outcome.train:
        return
    table = Table(title="trained methods (held-out pairs, alpha = 1)")
    for col in ("method", "steps", "train loss", "preference accuracy", "reward margin", "saved in"):
        table.add_column(col, justify="right" if col != "saved in" else "left", overflow="fold")
    for name, result in outcome.train.items():
        info = result.info
        ev, final = info.get("eval", {}), info.get("final", {})
        table.add_row(
            name,
            str(info.get("steps", "-")),
            _fmt(final.get("loss")),
            _fmt(ev.get("eval/rewards/accuracies")),
            _fmt(ev.get("eval/rewards/margins")),
            "/".join(result.location.parts[-3:]),  # train/<key>/head (or /model)
        )
    console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_arrow_table(data: pa.Table, max_rows: int = 50, console: Console | None = None) -> None:
    """Print an Arrow table as a rich table, eliding rows past `max_rows`."""
    console = console or Console()
    table = Table(show_lines=False)
    for name in data.column_names:
        table.add_column(name, overflow="fold")
    for row in data.slice(0, max_rows).to_pylist():
        table.add_row(*(_cell(v) for v in row.values()))
    console.print(table)
    if data.num_rows > max_rows:
        console.print(
            f"... {data.num_rows - max_rows} more rows ({data.num_rows} in all; --max-rows to show more)"
        )


def _cell(value: Any, width: int = 120) -> str:
    text = "NULL" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the α sweep's evaluation summary ---------------------------------------------------------

# The legend printed under the summary table.
LEGEND = (
    "reward: mean ground-truth (or reward-model) reward, [95 % bootstrap interval over prompts]; "
    "Δ: change from α = 0; win: share of samples whose reward beats α = 0's on the same prompt "
    f"and seed; KL: {KL_DEFINITION}; len: mean generated tokens; pref: held-out preference "
    "accuracy of the method's implicit reward; n = prompts × samples per prompt."
)

_SWEEP_COLUMNS = (
    ("head", "method"),
    ("alpha", "α"),
    ("n", "n"),
    ("reward", "reward [95 %]"),
    ("reward_delta", "Δ"),
    ("win_rate", "win [95 %]"),
    ("kl", "KL [95 %]"),
    ("length", "len"),
    ("preference_accuracy", "pref"),
)


def _sweep_rows(summary_rows: Any) -> list[dict[str, Any]]:
    """Summary rows (Arrow table or dicts) sorted by run, head, α, with `reward_delta` added: the
    mean reward minus that of α = 0 of the same run and head (None without an α = 0 row)."""
    rows = summary_rows.to_pylist() if isinstance(summary_rows, pa.Table) else [dict(r) for r in summary_rows]
    rows.sort(key=lambda r: (str(r.get("run_id") or ""), str(r["head"]), float(r["alpha"])))
    base = {
        (r.get("run_id"), r["head"]): r.get("reward")
        for r in rows
        if float(r["alpha"]) == 0.0 and r.get("reward") is not None
    }
    for r in rows:
        b = base.get((r.get("run_id"), r["head"]))
        r["reward_delta"] = None if b is None or r.get("reward") is None else r["reward"] - b
    return rows


def _sweep_cell(col: str, value: Any, row: dict[str, Any] | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) < 5e-4:
        value = 0.0  # no "-0.000"
    row = row or {}
    if col == "head":
        return str(value)
    if col == "alpha":
        return f"{float(value):.3g}"
    if col == "n":
        prompts, samples = row.get("n_prompts"), row.get("n_samples")
        return f"{prompts}×{samples}" if prompts and samples else str(int(value))
    if col == "reward_delta":
        return f"{value:+.3f}"
    if col == "length":
        return f"{value:.1f}"
    interval = {"reward": "reward", "win_rate": "win_rate", "kl": "kl"}.get(col)
    lo, hi = (row.get(f"{interval}_lo"), row.get(f"{interval}_hi")) if interval else (None, None)
    if lo is not None and hi is not None:
        return f"{value:.3f} [{max(lo, 0.0) if col == 'kl' else lo:.3f}, {hi:.3f}]"
    return f"{value:.3f}"


def print_sweep_summary(summary_rows: Any, console: Console | None = None) -> None:
    """The α sweep as a table, one row per (method, α): prompts × samples, mean reward with its
    95 % interval and its change from α = 0 (Δ), win rate against α = 0, KL to the base, mean
    length (tokens), held-out preference accuracy; `LEGEND` under it. `summary_rows`: the
    `summary` table (Arrow) or its rows as dicts."""
    console = console or Console()
    rows = _sweep_rows(summary_rows)
    runs = sorted({str(r.get("run_id") or "") for r in rows})
    title = "evaluation summary (method × α)"
    if len(runs) == 1 and runs[0]:
        title += f", computed in MLflow run {runs[0]}"
    table = Table(title=title, caption=LEGEND, caption_justify="left")
    several = len(runs) > 1
    if several:
        table.add_column("run", overflow="fold")
    for col, header in _SWEEP_COLUMNS:
        table.add_column(header, justify="left" if col == "head" else "right")
    previous_head = None
    for r in rows:
        head = (r.get("run_id"), r["head"])
        if previous_head is not None and head != previous_head:
            table.add_section()
        previous_head = head
        cells = [_sweep_cell(col, r.get(col), r) for col, _ in _SWEEP_COLUMNS]
        table.add_row(*([str(r.get("run_id") or "-")] if several else []), *cells)
    console.print(table)
    if not rows:
        console.print("No evaluation rows.")


def summary_markdown(summary_rows: Any) -> str:
    """The same table as `print_sweep_summary`, in GitHub markdown (for a Prefect markdown artifact)."""
    rows = _sweep_rows(summary_rows)
    several = len({str(r.get("run_id") or "") for r in rows}) > 1
    headers = (["run"] if several else []) + [h for _, h in _SWEEP_COLUMNS]
    align = (["---"] if several else []) + [":---" if c == "head" else "---:" for c, _ in _SWEEP_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        cells = ([str(r.get("run_id") or "-")] if several else []) + [
            _sweep_cell(col, r.get(col), r).replace("|", "\\|") for col, _ in _SWEEP_COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_matched_kl(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Each method's reward at its α calibrated to each target KL (measured on the evaluation
    prompts, with 95 % intervals, the α and the KL reached) and its decoding cost (see
    `alignheads.tasks.reporting.matched_kl`)."""
    console = console or Console()
    targets = sorted({r["target_kl"] for r in rows})
    table = Table(title="reward at matched KL to the base (α calibrated to each target KL)")
    table.add_column("method")
    for t in targets:
        table.add_column(f"KL {t:g}: reward [95 %] (α; KL)", justify="right")
    table.add_column("LM fwd/tok", justify="right")
    table.add_column("ms/tok", justify="right")
    heads: dict[str, dict[float, dict[str, Any]]] = {}
    for r in rows:
        heads.setdefault(r["head"], {})[r["target_kl"]] = r
    for head, by_target in heads.items():
        cells = []
        for t in targets:
            r = by_target.get(t)
            if r is None or r.get("reward") is None:
                cells.append("-")
                continue
            mark = "" if r.get("converged", True) else "†"
            cells.append(
                f"{_sweep_cell('reward', r['reward'], r)} (α {r['alpha']:.3g}; {r['kl']:.3f}{mark})"
            )
        first = next(iter(by_target.values()))
        forwards, ms = first.get("lm_forwards_per_token"), first.get("ms_per_token")
        table.add_row(
            head, *cells, "-" if forwards is None else str(forwards), "-" if ms is None else f"{ms:.2f}"
        )
    console.print(table)
    if any(not r.get("converged", True) for r in rows):
        console.print("† the calibration stopped short of this KL: the closest α it measured.")


def print_significant(comparisons: list[dict[str, Any]], console: Console | None = None) -> None:
    """One line per paired difference whose 95 % interval excludes 0 (the `comparisons` table),
    then how many did not."""
    console = console or Console()
    if not comparisons:
        return
    hits = [r for r in comparisons if r["significant"]]
    lines = [
        f"  KL {r['target_kl']:g}: {r['head_a']} − {r['head_b']} = {r['reward_diff']:+.3f} "
        f"[{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]"
        for r in hits
    ]
    console.print(
        f"Paired differences at matched KL whose 95 % interval excludes 0: {len(hits)} of {len(comparisons)}"
        + (" (the others are within noise):" if hits else "; every gap is within noise.")
    )
    for line in lines:
        console.print(line)
