"""`alignheads query --format table` through the console script: floats rounded to 4 significant
digits (inside lists too), everything else as DuckDB returns it; `--full-precision` keeps every
digit (issue 21, item 3)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SQL = (
    "SELECT 1/3 AS third, [0.1234567::DOUBLE, 2.0] AS xs, 123456.789::DOUBLE AS big, "
    "1e-7 AS tiny, NULL::DOUBLE AS missing, 7 AS n, 1.5 AS exact"
)


def _query(store: Path, *extra: str) -> str:
    exe = Path(sys.executable).parent / "alignheads"
    env = dict(os.environ, COLUMNS="200")  # one line per row: rich wraps at the terminal's width
    done = subprocess.run(
        [str(exe), "query", SQL, "--set", f"store={store}", *extra],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cells(out: str) -> list[str]:
    row = next(line for line in out.splitlines() if line.startswith("│"))
    return [cell.strip() for cell in row.strip("│").split("│")]


def test_table_rounds_floats_and_full_precision_keeps_them(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    assert _cells(_query(store)) == ["0.3333", "[0.1235, 2]", "123457", "1e-07", "NULL", "7", "1.5"]
    full = _cells(_query(store, "--full-precision"))
    assert full[:3] == ["0.3333333333333333", "[0.1234567, 2.0]", "123456.789"]
