"""The tune flow end to end on the 64-pair world: two CALM trials (IAV off) trained, calibrated to
a target KL and scored on validation prompts; the search's result is an artifact of its own (table
`trials`, queryable); a second search recomputes nothing and returns the same artifact; the
prompts are disjoint from the sweep's; MLflow holds one parent run per search and one child per
trial.

One search shared by the module (the world, refpass and two short trainings), one cached rerun.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignheads.cli import main
from alignheads.config import RunConfig, parse_search_space
from alignheads.flows.tune import BEST_TAG, section_method, trial_settings, tune
from alignheads.flows.tuned import TRIALS_SCHEMA, TRIALS_TABLE
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import read_table
from alignheads.tasks.prompts import read_prompt_set, sweep_prompt_sets
from tests.helpers.small_runs import small_run, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPACE = {"kind": "grid", "calm": {"rank": [2, 4]}, "target_kl": 0.1, "validation_prompts": 8}


def tune_config(store: Path) -> RunConfig:
    raw = small_run(store, name="tune-test")
    raw["train"]["iav"] = {"enabled": False}
    raw["train"]["calm"] |= {"epochs": 1}
    raw["evaluate"] = {"target_kls": [0.05], "calibration_prompts": 4, "calibration_steps": 3,
                       "bootstrap_resamples": 200}  # fmt: skip
    return RunConfig.model_validate(raw).resolved()


@pytest.fixture(scope="module")
def searched(prefect_harness, tmp_path_factory):
    cfg = tune_config(tmp_path_factory.mktemp("tune") / "store")
    space = parse_search_space(SPACE)
    first = tune(space=space, config=cfg)
    second = tune(space=space, config=cfg)
    return cfg, first, second


def _client(cfg: RunConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cfg.store / 'mlflow.db'}")


def test_every_trial_is_a_scored_train_artifact(searched):
    cfg, first, _ = searched
    assert [(t.method, t.settings) for t in first.trials] == [("calm", {"rank": 2}), ("calm", {"rank": 4})]
    assert len({t.train.key for t in first.trials}) == 2
    for trial in first.trials:
        assert trial.train.status == "computed" and trial.train.info["kind"] == "calm"
        assert trial.reward is not None and trial.reward_lo <= trial.reward <= trial.reward_hi
        assert trial.alpha is not None and trial.alpha > 0
        # only the calibrated α is sampled: at α = 0 every trial is the base LM, the same samples
        assert [g.info["alpha"] for g in trial.generate] == [trial.alpha]
    assert sum(t.best for t in first.trials) == 1
    best = first.best()["calm"]
    assert best.reward == max(t.reward for t in first.trials)


def test_the_search_result_is_an_artifact_with_a_row_per_trial(searched):
    cfg, first, _ = searched
    search = first.search
    assert (search.stage, search.status, search.tables) == ("search", "computed", {TRIALS_TABLE: 2})
    assert search.directory == cfg.store / "search" / search.key
    table = read_table(search.directory, TRIALS_TABLE)
    assert table.schema.equals(TRIALS_SCHEMA)
    expected = [
        {"method": "calm", "trial": t.index, "settings": json.dumps(t.settings), "train_key": t.train.key,
         "evaluate_key": t.evaluate.key, "reward": t.reward, "reward_lo": t.reward_lo, "reward_hi": t.reward_hi,
         "alpha": t.alpha, "kl": t.kl, "converged": t.converged, "eval_accuracy": t.eval_accuracy, "best": t.best}
        for t in first.trials
    ]  # fmt: skip
    assert table.to_pylist() == expected
    best = first.best()["calm"]
    settings = trial_settings(cfg.train, "calm", best.settings).model_dump(mode="json")
    assert settings["rank"] == best.settings["rank"] and settings["epochs"] == 1
    assert read_manifest(search.directory, "search").info == {
        "target_kl": SPACE["target_kl"],
        "validation_prompts": first.validation_prompts,
        "methods": ["calm"],
        "best": {"calm": {"trial": best.index, "train_key": best.train.key, "evaluate_key": best.evaluate.key,
                          "reward": best.reward, "values": best.settings, "settings": settings}},
    }  # fmt: skip


def test_the_trials_are_a_query_view(searched, capsys):
    cfg, first, _ = searched
    sql = "SELECT trial, train_key, best FROM trials ORDER BY trial"
    assert main(["query", sql, "--format", "json", "--set", f"store={cfg.store}"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"trial": t.index, "train_key": t.train.key, "best": t.best} for t in first.trials]


def test_a_second_search_recomputes_nothing(searched):
    _, first, second = searched
    statuses = {s.status for t in second.trials for s in t.stages()}
    statuses |= {s.status for _, s in second.inputs.stages()}
    assert "computed" not in statuses, statuses
    assert second.search.status == "reused"
    assert (second.search.key, second.search.path) == (first.search.key, first.search.path)
    assert [(t.train.key, t.reward, t.best) for t in second.trials] == [
        (t.train.key, t.reward, t.best) for t in first.trials
    ]


def test_validation_prompts_are_disjoint_from_evaluation_and_calibration_prompts(searched):
    cfg, first, _ = searched
    validation = read_prompt_set(first.validation_prompts)
    evaluation, calibration, _ = sweep_prompt_sets(
        first.inputs.data.path, cfg.sweep, cfg.evaluate.calibration_prompts, cfg.data.train_overlap
    )
    assert len(validation) == SPACE["validation_prompts"]
    texts = {text for _, text in validation}
    assert not texts & {text for _, text in evaluation}
    assert not texts & {text for _, text in calibration}
    for trial in first.trials:  # the trial's generations are on the validation prompts
        assert trial.generate[0].info["prompts"] == len(validation)


def test_mlflow_has_a_parent_run_per_search_and_a_child_run_per_trial(searched):
    cfg, first, second = searched
    client = _client(cfg)
    for outcome, cached in ((first, "false"), (second, "true")):
        parent = client.get_run(outcome.mlflow_run)
        assert parent.data.params["tune.calm.rank"] == "[2, 4]"
        assert parent.data.tags["alignheads.cached"] == cached
        assert parent.data.tags["alignheads.search"] == outcome.search.key
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{outcome.mlflow_run}'"
        )
        assert sorted(r.info.run_name for r in children) == ["trial-calm-0", "trial-calm-1"]
        for run in children:
            trial = next(t for t in outcome.trials if t.mlflow_run == run.info.run_id)
            assert run.data.params["train.calm.rank"] == str(trial.settings["rank"])
            assert run.data.metrics["val_reward"] == pytest.approx(trial.reward)
            assert run.data.tags[BEST_TAG] == str(trial.best).lower()
        assert parent.data.tags[f"{BEST_TAG}.calm"] == outcome.best()["calm"].mlflow_run
    # a trial trained by the search run carries its training history; a cached one only its scores
    for outcome, history in ((first, True), (second, False)):
        for trial in outcome.trials:
            metrics = client.get_run(trial.mlflow_run).data.metrics
            assert ("eval/rewards/accuracies" in metrics) is history


def test_the_command_prints_the_trials_and_the_best(searched, tmp_path, capsys):
    cfg, first, _ = searched
    config = write_config(tmp_path / "run.yaml", cfg.model_dump(mode="json"))
    space = write_config(tmp_path / "space.yaml", SPACE)
    assert main(["tune", "--space", str(space), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "calm:" in out and "trial 0: rank=2" in out and "trial 1: rank=4" in out
    assert f"best: calm trial {first.best()['calm'].index}" in out
    assert (
        f"search: {first.search.path} (run with its best trials: alignheads run --tuned {first.search.key})"
        in out
    )


def test_a_search_names_sections_and_trains_the_methods_that_own_them():
    owners = {section: section_method(section).name for section in ("iav", "calm", "genarm", "dpo")}
    assert owners == {"iav": "iav", "calm": "calm", "genarm": "genarm", "dpo": "dpo-dera"}


def test_a_baseline_search_scores_its_trials_under_the_methods_name(searched):
    """A search names the section (`dpo`), the trial trains, generates and is evaluated as the
    method that owns it (`dpo-dera`): its calibration reaches the evaluation under that name."""
    cfg, _, _ = searched
    space = parse_search_space(
        {"kind": "grid", "dpo": {"lr": [1e-4]}, "target_kl": 0.1, "validation_prompts": 8}
    )
    (trial,) = tune(space=space, config=cfg).trials
    assert trial.method == "dpo" and trial.train.info["kind"] == "dpo-dera" and trial.best
    assert [g.info["head"] for g in trial.generate] == ["dpo-dera"]
    assert (
        trial.alpha is not None
        and trial.alpha > 0
        and [g.info["alpha"] for g in trial.generate] == [trial.alpha]
    )
    assert trial.reward_lo <= trial.reward <= trial.reward_hi


def test_an_incumbent_trial_is_the_run_configs_own_training(searched, tmp_path):
    """With `incumbent`, trial 0 trains the run config's `train.calm` as it is, and the trials
    drawn after it are the space's (a trial trained before is reused); a best incumbent is named
    as the run config's settings when a run takes it."""
    from alignheads.flows.tuned import save_search, tuned_line
    from alignheads.tasks.train import trained_settings

    cfg, first, _ = searched
    outcome = tune(space=parse_search_space(SPACE | {"incumbent": True, "trials": 2}), config=cfg)
    assert [t.settings for t in outcome.trials] == [{}, {"rank": 2}]
    _, settings = trained_settings(outcome.trials[0].train.path)
    the_configs_own = ("lr", "rank", "epochs", "lambda_nll", "lambda_l2", "s_max", "beta", "seed")
    for key in the_configs_own:
        assert getattr(settings, key) == getattr(cfg.train.calm, key), key
    assert (
        outcome.trials[1].train.key == first.trials[0].train.key
        and outcome.trials[1].train.status != "computed"
    )

    record = {"trial": 0, "train_key": "k", "evaluate_key": "e", "reward": 0.25, "values": {}, "settings": {}}
    search = save_search(
        tmp_path / "store", [], {"methods": ["calm"], "best": {"calm": record}, "target_kl": 0.1}
    )
    assert "calm trial 0 (the run config's settings; validation reward 0.25)" in tuned_line(search.path)
