"""Smoke tests of the benchmark scripts: each one's dry run builds its inputs, measures, and prints its table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import calm_step_bench  # benchmarks/ is on pytest's pythonpath (pyproject.toml)
import decode_bench
import guided_bench
import kv_cache_bench
import malloc_bench
import pipeline_bench
import pytest
import scale_bench


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the printed table rows whose first cell is `first_cell`."""
    rows = [[c.strip() for c in line.split("|")] for line in text.splitlines() if "|" in line]
    return [r for r in rows if r[0] == first_cell]


def test_decode_bench_dry_run(capsys) -> None:
    """Every variant decodes at both batch sizes; the merged IAV and the batched α-sweep produce
    exactly the tokens of the unmerged head and of the separate calls."""
    decode_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    for name in decode_bench.VARIANTS:
        rows = [r for r in table_rows(out, name) if len(r) == 7]  # the speed table, not the sweep's
        assert [r[1] for r in rows] == ["1", "2"], name
        assert all(float(r[2]) > 0 for r in rows)
    assert [r[4] for r in table_rows(out, "base")] == ["1.000", "1.000"]
    assert out.count("iav vs iav-merged greedy tokens equal: 100.0%") == 2
    sweep = table_rows(out, "iav") + table_rows(out, "calm")
    sweep = [r for r in sweep if len(r) == 9]
    assert len(sweep) == 4 and all(r[-1] == "100.0%" for r in sweep)
    assert {r[2] for r in sweep} == {"5", "10"}  # 5 alphas x batch 1 and 2


def test_kv_cache_bench_dry_run(capsys) -> None:
    """Both decoders with both caches at both batch sizes, every cell a measured number, and the
    in-place cache sampling the tokens transformers' own cache samples."""
    kv_cache_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    for decoder in ("generate", "genarm"):
        for cache in ("dynamic", "in-place"):
            rows = table_rows(out, f"{decoder} {cache}")
            assert [r[1] for r in rows] == ["1", "4"], (decoder, cache)
            assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)
        assert [r[5] for r in table_rows(out, f"{decoder} in-place")] == ["yes", "yes"]


def test_calm_step_bench_dry_run(capsys) -> None:
    """Each batch size times the output layer, CALM's step and a decode step, and prints CALM's
    implied speed (no timing is asserted: only that every cell is a measured number)."""
    calm_step_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    for name in ("lm_head", "calm eager", "decode step"):
        rows = table_rows(out, name)
        assert [r[1] for r in rows] == ["1", "16"], name
        assert all(float(r[3]) > 0 for r in rows), name
    assert all(float(r[4]) > 0 for r in table_rows(out, "calm eager"))
    assert not table_rows(out, "calm compiled")  # the dry run skips torch.compile


def test_pipeline_bench_dry_run(capsys) -> None:
    pipeline_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    assert "cached run 1: Nothing recomputed: dry run" in out
    for label in ("cold run (empty store)", "cached re-run (same store)", "bare Prefect flow"):
        assert len(table_rows(out, label)) == 1, label
    assert re.search(r"beyond Prefect's start-up: -?\d+\.\d s \(target <= 5 s: (met|not met)\); "
                     r"cold run -?\d+\.\d s \(target <= 300 s: (met|not met)\)", out)


def test_pipeline_bench_reuses_a_kept_directory_without_a_cold_run(tmp_path: Path, capsys) -> None:
    pipeline_bench.main(["--dry-run", "--keep", str(tmp_path)])
    assert (tmp_path / "run.yaml").is_file() and (tmp_path / "cold.log").is_file()
    (tmp_path / "cold.log").unlink()
    capsys.readouterr()
    pipeline_bench.main(["--dry-run", "--reuse", str(tmp_path)])
    out = capsys.readouterr().out
    assert "cold run: not run (--reuse)" in out and not table_rows(out, "cold run (empty store)")
    assert not (tmp_path / "cold.log").exists()
    assert re.search(r"beyond Prefect's start-up: -?\d+\.\d s \(target <= 5 s: (met|not met)\)$", out.strip())
    with pytest.raises(SystemExit):
        pipeline_bench.main(["--dry-run", "--reuse", str(tmp_path / "elsewhere")])


def test_run_timed_reports_a_failing_command(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"failed \(3\)[\s\S]*boom"):
        pipeline_bench.run_timed(cmd, {}, tmp_path / "log")


@pytest.mark.slow
def test_scale_bench_dry_run(capsys) -> None:
    """A small world's pairs at 1x and 2x: twice the optimizer steps, and a peak memory measured."""
    scale_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    rows = table_rows(out, "iav")
    assert [r[1] for r in rows] == ["1x", "2x"]
    steps = [int(r[2]) for r in rows]
    assert steps[1] == 2 * steps[0] > 0
    assert all(float(r[8]) >= float(r[7]) > 0 for r in rows)  # RSS peak >= RSS at the start, MiB
    assert "iav: peak 2x / 1x =" in out


@pytest.mark.slow
def test_refpass_bench_times_every_step_a_shard_runs_through(tmp_path: Path) -> None:
    """refpass_bench's profile wraps functions by module and name; each must be one the reference
    pass really calls (a moved import once left `build_rows` unwrapped and the script failing)."""
    import refpass_bench

    from alignheads.config import ModelConfig, RefPassConfig
    from alignheads.loading import load_tokenizer
    from alignheads.models.reference import load_reference
    from alignheads.storage.fingerprint import tokenizer_fingerprint
    from alignheads.tasks.refpass import compute_refpass_shard, plan_refpass
    from tests.helpers.tiny_models import tiny_llama
    from tests.helpers.word_pairs import pair_store

    built = pair_store(tmp_path, tiny_llama(tied=False), RefPassConfig(k=8, pairs_per_shard=64), n_train=8)
    fp = tokenizer_fingerprint(load_tokenizer(str(built.model_dir)))
    plan = plan_refpass(RefPassConfig(k=8, pairs_per_shard=64), ModelConfig(), str(built.model_dir), built.tokenize, fp)
    reference = load_reference(str(built.model_dir), device="cpu")
    seconds: dict[str, float] = {}
    with refpass_bench.timed_steps(reference, seconds):
        compute_refpass_shard(plan, 0, reference, progress=False)
    assert set(seconds) == {label for label, _, _ in refpass_bench.PROFILED_STEPS}
    assert all(value > 0 for value in seconds.values())
    # the wrappers are gone afterwards: the module's own function again
    from alignheads.storage import refcache

    assert refcache.build_rows.__module__ == "alignheads.storage.refcache"
    assert refcache.build_rows.__qualname__ == "build_rows"


@pytest.mark.slow
def test_malloc_bench_dry_run(capsys) -> None:
    malloc_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    rows = table_rows(out, "glibc default") + table_rows(out, "1 MiB (before)") + table_rows(out, "the loop's")
    assert [r[1] for r in rows] == ["dynamic", "1 MiB", "8 MiB"]
    assert all(float(r[2]) > 0 and r[7] == "yes" for r in rows)  # timed, and the same tokens
    assert rows[0][6] == "1.000"
    assert "one token sum under every setting: yes" in out


def test_guided_bench_dry_run(capsys) -> None:
    guided_bench.main(["--dry-run"])
    out = capsys.readouterr().out
    kept, cut = table_rows(out, "every row to the end"), table_rows(out, "finished rows leave")
    assert len(kept) == len(cut) == 1 and kept[0][2] == "1.00"
    assert cut[0][3:] == ["yes", "yes"]  # rows leaving changes no token and no KL bit
    forwards = [table_rows(out, v)[0][1] for v in ("(0.0, 0.0, 0.0)", "(1.0, 0.0, 0.0)", "(1.0, 1.0, 0.0)", "(1.0, 1.0, 1.0)")]
    assert forwards == ["1", "2", "3", "4"]
    concurrent = [table_rows(out, name) for name in ("one thread", "two threads", "two processes")]
    assert all(len(r) == 1 and float(r[0][1]) > 0 for r in concurrent)  # each way timed
    assert concurrent[0][0][2] == "1.00"
