"""Summary plots: valid, non-trivial PNGs from an Arrow table or row dicts; nulls and several runs."""

from __future__ import annotations

import pyarrow as pa
import pytest

from alignheads.tasks.reporting.plots import (
    plot_reward_vs_alpha,
    plot_reward_vs_kl,
    plot_win_rate_vs_alpha,
    save_summary_plots,
    summary_rows,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_summary(run_id: str = "run-1") -> list[dict]:
    rows = []
    for head, slope, kl_slope in (("iav", 1.0, 0.3), ("calm", 0.7, 0.2)):
        for alpha in (0.0, 0.5, 1.0, 1.5, 2.0):
            rows.append(
                {
                    "run_id": run_id,
                    "head": head,
                    "alpha": alpha,
                    "reward": -0.5 + slope * alpha - 0.2 * alpha**2,
                    "reward_std": 1.0,
                    "n": 40,
                    "win_rate": None if alpha == 0 else min(0.9, 0.4 + 0.3 * alpha * slope),
                    "kl": kl_slope * alpha**2,
                }
            )
    return rows


def _assert_png(path, min_bytes=8_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    return data


@pytest.mark.parametrize("fn", [plot_reward_vs_alpha, plot_reward_vs_kl, plot_win_rate_vs_alpha])
def test_plots_from_rows_and_from_arrow(tmp_path, fn):
    rows = make_summary()
    p1 = fn(rows, tmp_path / "rows" / "plot.png")
    p2 = fn(pa.Table.from_pylist(rows), tmp_path / "arrow.png")
    assert p1 == tmp_path / "rows" / "plot.png" and p1.is_file()
    assert _assert_png(p1) == _assert_png(p2)  # same input, same picture


def test_save_summary_plots_and_several_runs(tmp_path):
    rows = make_summary("aaaaaaaaaaaa") + make_summary("bbbbbbbbbbbb")
    paths = save_summary_plots(rows, tmp_path / "plots")
    assert set(paths) == {"reward_vs_alpha", "reward_vs_kl", "win_rate_vs_alpha"}
    for name, path in paths.items():
        assert path == tmp_path / "plots" / f"{name}.png"
        _assert_png(path)


def test_rows_with_null_values_are_skipped_and_empty_summary_refused(tmp_path):
    rows = [{"head": "iav", "alpha": 0.0, "reward": 1.0, "win_rate": None, "kl": None}]
    _assert_png(plot_win_rate_vs_alpha(rows, tmp_path / "w.png"), 3_000)  # says "no data"
    _assert_png(plot_reward_vs_alpha(rows, tmp_path / "r.png"), 3_000)
    with pytest.raises(ValueError, match="empty"):
        plot_reward_vs_alpha([], tmp_path / "e.png")
    assert summary_rows(pa.table({"head": ["iav"], "alpha": [0.0]})) == [{"head": "iav", "alpha": 0.0}]


# --- the summary as terminal and markdown tables (alignheads.tasks.reporting.printing) ---------------------------


def _report_rows():
    rows = make_summary()
    for r in rows:
        r.update(length=12.25, preference_accuracy=0.93 if r["alpha"] == 1.0 else None)
    return rows


def test_print_sweep_summary_shows_every_head_and_alpha():
    from rich.console import Console

    from alignheads.tasks.reporting.printing import print_sweep_summary

    console = Console(record=True, width=140)
    print_sweep_summary(pa.Table.from_pylist(_report_rows()), console=console)
    text = console.export_text()
    assert "run run-1" in text
    for header in ("method", "α", "reward [95 %]", "Δ", "win [95 %]", "KL [95 %]", "len", "pref"):
        assert header in text
    lines = [line for line in text.splitlines() if "│ iav" in line or "│ calm" in line]
    assert len(lines) == 10
    iav1 = next(line for line in lines if "│ iav " in line and "│   1 │" in line)
    # reward 0.3, Δ +0.8 against α = 0's -0.5, win rate 0.7, KL 0.3, length 12.2, accuracy 0.93
    for cell in ("0.300", "+0.800", "0.700", "12.2", "0.930"):
        assert cell in iav1
    assert "-0.000" not in text


def test_summary_markdown_table():
    from alignheads.tasks.reporting.printing import summary_markdown

    md = summary_markdown(_report_rows())
    lines = md.strip().splitlines()
    assert lines[0] == "| method | α | n | reward [95 %] | Δ | win [95 %] | KL [95 %] | len | pref |"
    assert lines[1] == "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    assert len(lines) == 12  # header, rule, 10 rows; calm first
    assert lines[2] == "| calm | 0 | 40 | -0.500 | +0.000 | - | 0.000 | 12.2 | - |"
    assert lines[9] == "| iav | 1 | 40 | 0.300 | +0.800 | 0.700 | 0.300 | 12.2 | 0.930 |"
    two_runs = summary_markdown(make_summary("r1") + make_summary("r2"))
    assert two_runs.splitlines()[0].startswith("| run | method |") and "| r2 | iav | 2 |" in two_runs


def test_reward_vs_kl_axis_and_printed_summary_name_the_summary_kl(tmp_path, monkeypatch):
    """Issue 18, item 7c: the frontier's axis said "mean per-token KL" while the summary's `kl` is
    the mean over responses of each response's mean per-token KL; the printed summary did not
    say which. Both now use the words of `metrics.KL_DEFINITION`."""
    from rich.console import Console

    from alignheads.models.metrics import KL_DEFINITION, KL_LABEL
    from alignheads.tasks.reporting import plots
    from alignheads.tasks.reporting.printing import print_sweep_summary

    labels = []
    finish = plots._finish

    def spy(fig, ax, path, title, xlabel, ylabel, empty):
        labels.append(xlabel)
        return finish(fig, ax, path, title, xlabel, ylabel, empty)

    monkeypatch.setattr(plots, "_finish", spy)
    _assert_png(plot_reward_vs_kl(make_summary(), tmp_path / "kl.png"))
    assert labels == [KL_LABEL]
    assert "mean over responses" in labels[0] and "mean per-token KL" not in labels[0]
    console = Console(record=True, width=200)
    print_sweep_summary(pa.Table.from_pylist(_report_rows()), console=console)
    text = " ".join(console.export_text().split())
    assert f"KL: {KL_DEFINITION};" in text


def test_printed_summary_shows_intervals_and_counts():
    from rich.console import Console

    from alignheads.tasks.reporting.printing import print_sweep_summary

    rows = _report_rows()
    for r in rows:
        r.update(reward_lo=r["reward"] - 0.1, reward_hi=r["reward"] + 0.2, kl_lo=-1e-9, kl_hi=r["kl"] + 0.01,
                 n_prompts=20, n_samples=2)  # fmt: skip
    console = Console(record=True, width=200)
    print_sweep_summary(pa.Table.from_pylist(rows), console=console)
    text = console.export_text()
    iav1 = next(line for line in text.splitlines() if "│ iav " in line and "│   1 │" in line)
    assert "0.300 [0.200, 0.500]" in iav1 and "20×2" in iav1
    assert "0.300 [0.000, 0.310]" in iav1  # KL: a roundoff-negative bound prints as 0


def test_frontier_and_paired_difference_plots_with_intervals(tmp_path):
    from alignheads.tasks.reporting.plots import plot_paired_differences, strongest_baseline

    rows = make_summary()
    for r in rows:
        r.update(reward_lo=r["reward"] - 0.1, reward_hi=r["reward"] + 0.1, kl_lo=r["kl"] * 0.9,
                 kl_hi=r["kl"] * 1.1, n_prompts=20, n_samples=2)  # fmt: skip
    calibrated = [
        {"target_kl": 0.1, "head": "iav", "alpha": 0.5, "reward": 0.0},
        {"target_kl": 0.1, "head": "genarm", "alpha": 0.4, "reward": 1.0},
        {"target_kl": 0.1, "head": "dpo-dera", "alpha": 0.6, "reward": 0.5},
    ]
    assert strongest_baseline(calibrated, ("genarm", "dpo-dera")) == "genarm"
    _assert_png(plot_reward_vs_kl(rows, tmp_path / "f.png", calibrated))
    comparisons = [
        {"target_kl": 0.1, "head_a": "genarm", "alpha_a": 0.4, "head_b": "iav", "alpha_b": 0.5,
         "reward_diff": 1.0, "diff_lo": 0.5, "diff_hi": 1.5, "significant": True, "n_prompts": 20},
    ]  # fmt: skip
    _assert_png(plot_paired_differences(comparisons, calibrated, tmp_path / "d.png"), min_bytes=5_000)
