"""Kill anywhere, lose nothing: the pipeline, as a user runs it (`alignheads run` in its own process),
is SIGKILLed at six points spread over the reference pass, training and the α-sweep, restarted
after each, and finally run to completion. Its artifacts must equal an uninterrupted run's.

A kill point is a path appearing in the store (a shard's done-record, a checkpoint, a stage's
hidden staging directory, a report plot), watched from this process every few milliseconds; the
product has no test hook. After every kill, nothing at a final artifact path is partial.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alignheads.storage.manifest import read_manifest
from alignheads.storage.query import run_query
from tests.helpers.small_runs import (
    appeared,
    assert_nothing_partial_is_final,
    cli_env,
    describe_store,
    leftovers,
    run_pipeline,
    small_run,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def kill_points(outcomes) -> list[tuple[str, object, str | None]]:
    """(name, trigger, artifact that must still be incomplete when the kill lands)."""
    refpass, iav, calm = outcomes.refpass.key, outcomes.train["iav"].key, outcomes.train["calm"].key
    first_generation = outcomes.generate[0].key  # iav at α = 0
    evaluate, report = outcomes.evaluate.key, outcomes.report.key
    return [
        ("refpass: 2 of 4 shards recorded", appeared("refpass/.*.shards/00001.json"), f"refpass/{refpass}"),
        ("train iav: checkpoint at step 8 of 16", appeared(f"checkpoints/train/{iav}/step-000008"), f"train/{iav}"),
        ("train calm: its training starting", appeared(f"train/.{calm}.tmp-*"), f"train/{calm}"),
        (
            "sweep: second generation under way",
            appeared(f"generate/{first_generation}", "generate/.*.tmp-*"),
            f"evaluate/{evaluate}",
        ),
        ("sweep: evaluation under way", appeared("evaluate/.*.tmp-*"), None),
        ("sweep: report plots being drawn", appeared("report/.*.tmp-*/reward_vs_alpha.png"), f"report/{report}"),
    ]  # fmt: skip


def test_killed_six_times_then_resumed_equals_the_uninterrupted_run(reference_run, api_url, tmp_path):
    ref_store, outcomes = reference_run
    store = tmp_path / "store"
    config = write_config(tmp_path / "run.yaml", small_run(store))
    # the world is copied (its build is tested elsewhere); data onwards is computed here
    world = Path(outcomes.world.path)
    shutil.copytree(world, store / "world" / world.name)
    env = cli_env(api_url, tmp_path / "prefect-home")

    survived = []
    for name, trigger, unfinished in kill_points(outcomes):
        run = run_pipeline(config, env, store, kill_when=trigger)
        assert run.killed_at is not None, (
            f"{name}: the run ended ({run.returncode}) before the kill point\n{run.output[-3000:]}"
        )
        assert run.returncode == -9, run.output[-3000:]
        if unfinished is not None:
            assert not (store / unfinished).exists(), (
                f"{name}: the kill landed after {unfinished} was complete"
            )
        assert_nothing_partial_is_final(store)
        survived.append(name)

    final = run_pipeline(config, env, store)
    assert final.returncode == 0, final.output[-5000:]
    assert len(survived) == 6

    # every artifact equals the uninterrupted run's: manifests, every table row by row, head files
    want, got = describe_store(ref_store), describe_store(store)
    assert sorted(got) == sorted(want)
    for artifact in want:
        assert got[artifact] == want[artifact], artifact
    assert assert_nothing_partial_is_final(store) == len(want)
    # killed processes' staging dirs, temp files and shard records are all gone
    assert leftovers(store) == []
    # training resumed from its checkpoint instead of starting over
    iav = read_manifest(store / "train" / outcomes.train["iav"].key)
    assert iav.info["resumed_from"] == 8
    # nothing duplicated: each view holds each artifact's rows once
    counts = run_query(store, "SELECT count(*) AS n, count(DISTINCT (pair_index, side)) AS d FROM refcache")
    assert counts.to_pylist() == [{"n": 2 * 96, "d": 2 * 96}]
    gens = run_query(store, "SELECT count(*) AS n FROM generations").to_pylist()[0]["n"]
    assert gens == 4 * 8  # 2 heads x 2 α x 8 prompts
