"""Terminal output: the run summary (where each table is) and query results, with rich."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from alignheads.config import RunConfig


def print_run_summary(
    cfg: RunConfig, outcomes: dict[str, dict[str, Any]], console: Console | None = None
) -> None:
    """One row per stage: status, artifact key, tables with row counts, path; then the store."""
    console = console or Console()
    table = Table(title=f"alignheads run '{cfg.name}'")
    for col in ("stage", "status", "key", "tables (rows)", "path"):
        table.add_column(col, overflow="fold")
    for stage, out in outcomes.items():
        tables = ", ".join(f"{n} ({r})" for n, r in out["tables"].items()) or "-"
        table.add_row(stage, out["status"], out["key"], tables, out["path"])
    console.print(table)
    print_head_summary(outcomes, console)
    rejected = sum(outcomes.get("data", {}).get("info", {}).get("rejects", {}).values())
    if rejected:
        console.print(
            f'[yellow]{rejected} bad rows skipped[/] (see: alignheads query "SELECT * FROM rejects")'
        )
    if all(out["status"] != "computed" for out in outcomes.values()):
        console.print("Nothing recomputed: every stage was already complete in the store.")
    else:
        done = [s for s, out in outcomes.items() if out["status"] == "computed"]
        reused = [s for s, out in outcomes.items() if out["status"] != "computed"]
        tail = f"; reused from the store: {', '.join(reused)}" if reused else ""
        console.print(f"Computed: {', '.join(done)}{tail}.")
    console.print(f"Store: {cfg.store}")


def print_head_summary(outcomes: dict[str, dict[str, Any]], console: Console) -> None:
    """Trained heads: steps, final training loss, held-out preference accuracy and margin at α = 1."""
    heads = {name.removeprefix("train-"): out for name, out in outcomes.items() if name.startswith("train-")}
    if not heads:
        return
    table = Table(title="trained heads (held-out pairs, alpha = 1)")
    for col in ("head", "steps", "train loss", "preference accuracy", "reward margin"):
        table.add_column(col, justify="right")
    for kind, out in heads.items():
        info = out["info"]
        ev, final = info.get("eval", {}), info.get("final", {})
        table.add_row(
            kind,
            str(info.get("steps", "-")),
            _fmt(final.get("loss")),
            _fmt(ev.get("eval/rewards/accuracies")),
            _fmt(ev.get("eval/rewards/margins")),
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
