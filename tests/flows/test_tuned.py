"""A search's best trials back in a run config (`flows.tuned`): the settings of the latest search, or
of one named by key or directory; the pipeline (`alignheads run --tuned`) then reuses the best
trial's training instead of training again; the registered model's `best` alias is the search's
best trial (its validation reward, not the held-out accuracy rule). No search: one line naming
the store.

One search of test_tune.py's space on its own store (module fixture), then one pipeline run on
its best trial and cached reruns.
"""

from __future__ import annotations

import pytest

from alignheads.cli import main
from alignheads.config import parse_search_space
from alignheads.flows.pipeline import pipeline
from alignheads.flows.tune import trial_settings, tune
from alignheads.flows.tuned import best_settings, find_search, with_tuned
from alignheads.storage.artifacts import list_artifacts
from tests.flows.test_tune import SPACE, tune_config
from tests.helpers.small_runs import write_config


@pytest.fixture(scope="module")
def searched(prefect_harness, tmp_path_factory):
    cfg = tune_config(tmp_path_factory.mktemp("tuned") / "store")
    return cfg, tune(space=parse_search_space(SPACE), config=cfg)


def _registry(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.store / 'mlflow.db'}")
    versions = client.search_model_versions(f"name = '{cfg.name}-calm'")
    return client, {v.tags["alignheads.train_key"]: str(v.version) for v in versions}


@pytest.mark.integration
@pytest.mark.slow
def test_best_settings_of_the_latest_search_and_of_one_named_by_key_or_directory(searched):
    cfg, outcome = searched
    best = outcome.best()["calm"]
    expected = {"calm": trial_settings(cfg.train, "calm", best.settings).model_dump(mode="json")}
    assert expected["calm"]["rank"] == best.settings["rank"]
    assert best_settings(cfg.store) == expected
    assert best_settings(cfg.store, outcome.search.key) == expected
    assert best_settings(cfg.store, outcome.search.path) == expected
    assert find_search(cfg.store) == outcome.search.directory


@pytest.mark.integration
@pytest.mark.slow
def test_with_tuned_replaces_the_tuned_section_and_keeps_enabled_and_the_rest(searched):
    cfg, outcome = searched
    best = outcome.best()["calm"]
    calm = cfg.train.calm.model_copy(update={"enabled": False, "rank": 16, "lr": 0.5})
    mine = cfg.model_copy(update={"train": cfg.train.model_copy(update={"calm": calm})})
    tuned = with_tuned(mine, "latest")
    assert tuned.train.calm.rank == best.settings["rank"]
    assert tuned.train.calm.lr == cfg.train.calm.lr  # the search's section, not this config's
    assert tuned.train.calm.enabled is False
    assert tuned.train.iav == mine.train.iav  # not searched: as configured
    assert tuned.model_dump(exclude={"train"}) == mine.model_dump(exclude={"train"})


@pytest.mark.integration
@pytest.mark.slow
def test_the_pipeline_on_the_tuned_config_reuses_the_best_trials_training(searched):
    cfg, outcome = searched
    best = outcome.best()["calm"]
    trained = list_artifacts(cfg.store, "train")
    run = pipeline(config=with_tuned(cfg, outcome.search.key))
    assert run.train["calm"].key == best.train.key
    assert run.train["calm"].status in ("reused", "cached")
    assert run.evaluate.status == "computed"  # the sweep itself ran, on the trial's head
    assert list_artifacts(cfg.store, "train") == trained


@pytest.mark.integration
@pytest.mark.slow
def test_run_tuned_names_the_search_and_trains_nothing(searched, tmp_path, capsys):
    cfg, outcome = searched
    best = outcome.best()["calm"]
    trained = list_artifacts(cfg.store, "train")
    _, versions = _registry(cfg)
    config = write_config(tmp_path / "run.yaml", cfg.model_dump(mode="json"))
    assert main(["run", "--config", str(config), "--tuned"]) == 0  # no value: the latest search
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("tuned settings"))
    assert line.startswith(f"tuned settings from search {outcome.search.key}: calm trial {best.index} ")
    assert f"rank={best.settings['rank']}" in line
    assert list_artifacts(cfg.store, "train") == trained
    assert _registry(cfg)[1] == versions  # no new model version either


@pytest.mark.integration
@pytest.mark.slow
def test_best_aliases_the_best_trials_version_and_a_search_moves_it_back(searched):
    from alignheads.storage.model_registry import move_alias
    from alignheads.storage.tracking import open_tracker

    cfg, outcome = searched
    client, versions = _registry(cfg)
    # each trial trained by the search is a version of <name>-calm, logged by its child run
    assert set(versions) == {t.train.key for t in outcome.trials}
    name = f"{cfg.name}-calm"
    for trial in outcome.trials:
        assert client.get_model_version(name, versions[trial.train.key]).run_id == trial.mlflow_run
    best, other = sorted(outcome.trials, key=lambda t: not t.best)
    assert str(client.get_registered_model(name).aliases["best"]) == versions[best.train.key]

    tracker = open_tracker(cfg.store, cfg.name)
    assert move_alias(tracker, name, "best", versions[other.train.key]) == versions[best.train.key]
    tune(space=parse_search_space(SPACE), config=cfg)  # cached: trains nothing, moves the alias back
    assert str(client.get_registered_model(name).aliases["best"]) == versions[best.train.key]
    assert _registry(cfg)[1] == versions


def test_no_search_in_the_store_is_one_line_naming_the_store(tmp_path):
    store = tmp_path / "store"
    with pytest.raises(FileNotFoundError) as latest:
        best_settings(store)
    assert str(store) in str(latest.value) and "alignheads tune" in str(latest.value)
    with pytest.raises(FileNotFoundError) as by_key:
        best_settings(store, "0123456789abcdef")
    assert "'0123456789abcdef'" in str(by_key.value) and str(store) in str(by_key.value)
    for error in (latest.value, by_key.value):
        assert "\n" not in str(error)


def test_a_directory_of_another_stage_is_refused(tmp_path):
    from alignheads.storage.manifest import ArtifactError
    from alignheads.tasks.prompts import save_prompt_set

    prompts = save_prompt_set(tmp_path / "store", [("p0", "hello")])
    with pytest.raises(ArtifactError):
        best_settings(tmp_path / "store", str(prompts))
