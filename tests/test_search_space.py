"""The search space of `alignheads tune`: parsing with one clear line per problem, grid and
random expansion (counts, determinism, the same number of trials per method), and the
validation prompts (after the sweep's evaluation and calibration prompts, disjoint from both)."""

from __future__ import annotations

import pytest

from alignheads.config import (
    ConfigError,
    SweepConfig,
    TrainConfig,
    load_search_space,
    parse_search_space,
    space_trials,
)
from alignheads.flows.tune import trial_settings
from alignheads.tasks.prompts import sweep_prompt_sets, validation_prompt_set


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        space_trials(parse_search_space(raw))
    return str(info.value)


def test_a_space_parses_from_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("kind: random\ntrials: 3\nseed: 7\niav: {lr: [1e-3, 2e-3], lambda_nll: [0.5, 1.0]}\ncalm: {rank: [16, 32]}\n")
    space = load_search_space(path)
    assert space.kind == "random" and space.trials == 3 and space.seed == 7 and space.target_kl == 0.1
    assert space.methods() == {"iav": {"lr": [1e-3, 2e-3], "lambda_nll": [0.5, 1.0]}, "calm": {"rank": [16, 32]}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"iav": {"lrr": [1e-3]}}, "iav.lrr: unknown setting; did you mean 'lr'?"),
        ({"calmm": {"rank": [4]}}, "calmm: unknown key; did you mean 'calm'?"),
        ({"calm": {"rank": [4, -1]}}, "calm.rank[1]: Input should be greater than 0 (got -1)"),
        ({"calm": {"rank": []}}, "calm.rank: give at least one value"),
        ({"calm": {"enabled": [True]}}, "calm.enabled: unknown setting"),
        ({}, "name at least one method to search"),
        ({"kind": "bayes", "calm": {"rank": [4]}}, "kind: Input should be 'grid' or 'random'"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_key(raw, expected):
    message = _error(raw)
    assert expected in message
    assert len(message.splitlines()) == 2  # the heading and the one problem


def test_a_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="cannot read search space .*nope.yaml"):
        load_search_space(tmp_path / "nope.yaml")


def test_a_grid_is_every_combination_in_order():
    trials = space_trials(parse_search_space({"iav": {"lr": [1, 2], "lambda_nll": [0.5, 1.0]}}))
    assert trials == {
        "iav": [
            {"lr": 1, "lambda_nll": 0.5},
            {"lr": 1, "lambda_nll": 1.0},
            {"lr": 2, "lambda_nll": 0.5},
            {"lr": 2, "lambda_nll": 1.0},
        ]
    }


def test_grids_of_different_sizes_are_refused_unless_trials_caps_them():
    raw = {"iav": {"lr": [1e-3, 2e-3, 3e-3]}, "calm": {"rank": [4, 8]}}
    assert "the grid gives iav 3, calm 2" in _error(raw)
    capped = space_trials(parse_search_space(raw | {"trials": 2}))
    assert {m: len(t) for m, t in capped.items()} == {"iav": 2, "calm": 2}


def test_random_search_is_deterministic_with_equal_trials_per_method():
    raw = {"kind": "random", "trials": 3, "iav": {"lr": [1, 2, 3], "lambda_l2": [0, 1]}, "calm": {"rank": [4, 8]}}
    trials = space_trials(parse_search_space(raw))
    assert {m: len(t) for m, t in trials.items()} == {"iav": 3, "calm": 3}
    assert trials == space_trials(parse_search_space(raw))  # same seed, same trials
    iav = [tuple(t.values()) for t in trials["iav"]]
    assert len(set(iav)) == 3  # distinct while the grid has enough
    others = [space_trials(parse_search_space(raw | {"seed": s}))["iav"] for s in range(1, 6)]
    assert any(o != trials["iav"] for o in others)


def test_a_trial_is_the_methods_section_with_its_values():
    train = TrainConfig.model_validate({"calm": {"enabled": False, "lr": 0.5, "rank": 8}})
    settings = trial_settings(train, "calm", {"rank": 2})
    assert (settings.rank, settings.lr, settings.enabled) == (2, 0.5, True)


def test_validation_prompts_follow_the_evaluation_and_calibration_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"question {i}?\n" for i in range(30)))
    sweep = SweepConfig(prompts_file=str(path), n_prompts=10)
    evaluation, calibration, _ = sweep_prompt_sets(None, sweep, 6)
    validation = validation_prompt_set(None, sweep, 6, 8)
    assert [t for _, t in validation] == [f"question {i}?" for i in range(16, 24)]
    texts = {t for _, t in validation}
    assert not texts & {t for _, t in evaluation + calibration}
    with pytest.raises(ValueError, match="validation prompts"):
        validation_prompt_set(None, sweep, 6, 20)


def test_the_command_refuses_a_bad_space_in_one_line_before_any_flow_runs(tmp_path, capsys):
    from alignheads.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("calm: {rnak: [4, 8]}\n")
    assert main(["tune", "--space", str(space), "--set", f"store={tmp_path / 'store'}"]) == 2
    err = capsys.readouterr().err
    assert "calm.rnak: unknown setting; did you mean 'rank'?" in err
    assert not (tmp_path / "store").exists()


def test_the_incumbent_is_each_methods_first_trial_and_counts_in_the_budget():
    """With `incumbent`, trial 0 of every method is the run config's settings (no values), the draws
    fill the other `trials - 1`, and the run config's section is what that trial trains."""
    raw = {"kind": "random", "trials": 3, "incumbent": True, "iav": {"lr": [1, 2, 3]}, "calm": {"rank": [4, 8]}}
    trials = space_trials(parse_search_space(raw))
    assert {m: len(t) for m, t in trials.items()} == {"iav": 3, "calm": 3}
    assert trials["iav"][0] == {} == trials["calm"][0]
    assert all(t for t in trials["iav"][1:]) and len({t["lr"] for t in trials["iav"][1:]}) == 2
    grid = space_trials(parse_search_space({"incumbent": True, "calm": {"rank": [4, 8]}}))
    assert grid == {"calm": [{}, {"rank": 4}, {"rank": 8}]}
    train = TrainConfig.model_validate({"calm": {"lr": 0.5, "rank": 8}})
    assert trial_settings(train, "calm", {}) == train.calm.model_copy(update={"enabled": True})
