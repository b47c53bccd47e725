"""Two runs at once on one fresh store, as two real `alignheads run` processes.

The second config differs from the first only in its α list, so the two share every stage from
the world to the generations at α = 0 and 1 (both try to build each of them at the same moment)
and differ in one generation per head, the held-out accuracy and the evaluation. Both must succeed; each shared artifact must be
built once and equal an uninterrupted run's; MLflow's new database must survive two processes
creating it at once (it did not: both failed in its migrations).
"""

from __future__ import annotations

import subprocess

import pytest

from alignheads.storage.query import run_query
from tests.helpers.small_runs import (
    assert_nothing_partial_is_final,
    cli_command,
    cli_env,
    describe_store,
    leftovers,
    small_run,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_processes_on_one_store_share_stages_and_never_collide(reference_run, api_url, tmp_path):
    ref_store, outcomes = reference_run
    store = tmp_path / "store"
    same = write_config(tmp_path / "same.yaml", small_run(store))
    more = write_config(tmp_path / "more.yaml", small_run(store, alphas=(0, 1, 2)))
    env = cli_env(api_url, tmp_path / "prefect-home")
    logs = [tmp_path / "same.log", tmp_path / "more.log"]
    procs = [
        subprocess.Popen(cli_command(cfg), env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        for cfg, log in zip((same, more), logs, strict=True)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n\n".join(log.read_text()[-3000:] for log in logs)
    output = "".join(log.read_text() for log in logs)
    # the loser of each race waited for the winner's artifact and reused it
    assert "is being built by another process; waiting for it" in output

    want, got = describe_store(ref_store), describe_store(store)
    shared = {a for a in want if not a.startswith("evaluate/")}  # evaluate differs: one has 3 α
    assert {a: got[a] for a in shared} == {a: want[a] for a in shared}
    extra = sorted(set(got) - set(want))
    # the other α list: its generations (α = 2, one per head), each head's accuracy at its α, evaluate, report
    assert [a.split("/")[0] for a in extra] == ["accuracy"] * 2 + ["evaluate"] + ["generate"] * 2 + ["report"], extra
    assert assert_nothing_partial_is_final(store) == len(got)
    assert leftovers(store) == []
    # nothing doubled: one artifact per stage and key, each row once
    n = run_query(
        store, "SELECT count(*) AS n, count(DISTINCT (artifact, pair_index, side)) AS d FROM refcache"
    )
    assert n.to_pylist() == [{"n": 2 * 96, "d": 2 * 96}]
    gens = run_query(store, "SELECT alpha, count(*) AS n FROM generations GROUP BY alpha ORDER BY alpha")
    assert gens.to_pylist() == [{"alpha": 0.0, "n": 16}, {"alpha": 1.0, "n": 16}, {"alpha": 2.0, "n": 16}]
    # both pipeline runs are recorded in MLflow as finished parent runs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")  # not set_tracking_uri: it
    # sets MLFLOW_TRACKING_URI for every later test
    experiment = client.get_experiment_by_name("reliability").experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`alignheads.store` != ''")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    assert outcomes.world.key in {a.split("/")[1] for a in got if a.startswith("world/")}
