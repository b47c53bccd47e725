"""The dial sweep's bookkeeping on constructed data: the α-vector grid and its labels, the dial-set
artifact, the dial summary and paired effects, the Pareto front and the report's checks."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from alignheads.config import WORLD_OBJECTIVES, ConfigError, RunConfig, read_config
from alignheads.tasks.dial_evaluate import dial_effects_table, dial_summary_table
from alignheads.tasks.dial_report import dial_checks, dials_markdown
from alignheads.tasks.dial_set import (
    dial_grid,
    full_vector,
    parse_dial_items,
    read_dial_set,
    save_dial_set,
    vector_label,
)
from alignheads.tasks.reporting.pareto import beyond_singles, dominates, pareto_front, save_pareto_plots

NAMES = ["helpful", "polite", "concise"]
STATS = {"confidence": 0.95, "n_resamples": 500, "seed": 0}


def test_default_grid_is_zero_singles_pairs_and_all():
    grid = dial_grid(NAMES, [1.0, 2.0], 1.0)
    labels = [vector_label(v) for v in grid]
    assert labels == [
        "base",
        "helpful=1", "helpful=2", "polite=1", "polite=2", "concise=1", "concise=2",
        "helpful=1,polite=1", "helpful=1,concise=1", "polite=1,concise=1",
        "helpful=1,polite=1,concise=1",
    ]  # fmt: skip
    assert all(list(v) == NAMES for v in grid)  # every vector covers every dial, in order
    assert grid[0] == {"helpful": 0.0, "polite": 0.0, "concise": 0.0}


def test_two_dials_have_no_separate_all_vector_and_duplicates_go():
    grid = dial_grid(["a", "b"], [1.0, 1.0], 1.0)
    assert [vector_label(v) for v in grid] == ["base", "a=1", "b=1", "a=1,b=1"]


def test_explicit_grid_keeps_the_zero_vector_first():
    grid = dial_grid(NAMES, [1.0], 1.0, grid=[{"concise": 0.5}, {}, {"helpful": -1, "polite": 2}])
    assert [vector_label(v) for v in grid] == ["base", "concise=0.5", "helpful=-1,polite=2"]


def test_full_vector_refuses_unknown_dials_and_non_finite():
    assert full_vector(NAMES, {"polite": 2}) == {"helpful": 0.0, "polite": 2.0, "concise": 0.0}
    with pytest.raises(ValueError, match="no dial named 'kind'"):
        full_vector(NAMES, {"kind": 1.0})
    with pytest.raises(ValueError, match="finite"):
        full_vector(NAMES, {"polite": math.inf})


def test_parse_dial_items():
    assert parse_dial_items(["helpful=1", " concise = 0.5"]) == {"helpful": 1.0, "concise": 0.5}
    for bad in (["helpful"], ["=1"], ["helpful=x"], ["helpful=nan"]):
        with pytest.raises(ValueError, match="name=α"):
            parse_dial_items(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_dial_items(["a=1", "a=2"])


def test_dial_set_round_trip_with_store_relative_paths(tmp_path):
    store = tmp_path / "store"
    (store / "train" / "k1").mkdir(parents=True)
    rows = [
        {"name": "helpful", "method": "iav", "objective": "helpful", "train_key": "k1",
         "train_path": str(store / "train" / "k1"), "reward_lm_key": None, "reward_lm_path": None},
    ]  # fmt: skip
    path = save_dial_set(store, rows)
    assert path.parent == store / "dials"
    assert save_dial_set(store, rows) == path  # same dials, same set
    back = read_dial_set(path)
    assert back == rows
    moved = tmp_path / "moved"
    store.rename(moved)  # the set names its artifacts relative to the store
    assert read_dial_set(moved / "dials" / path.name)[0]["train_path"] == str(moved / "train" / "k1")


# --- the summary and the paired effects --------------------------------------------------------


def _scores(effects: dict[str, dict[str, float]]) -> pa.Table:
    """Two prompts × two samples per α vector; `effects[label][objective]` is added to a per-row
    baseline, so every paired difference is exactly that effect."""
    rows = []
    for label, shift in effects.items():
        for p in range(2):
            for s in range(2):
                base = {"helpful": 0.5 * p + 0.1 * s, "polite": -0.2 * p, "reward": 1.0 + p}
                rows.append({
                    "method": "heads", "dial_set": "d", "alpha_vector": label,
                    "alpha_helpful": 1.0 if "helpful" in label else 0.0,
                    "alpha_polite": 1.0 if "polite" in label else 0.0,
                    "prompt_id": f"p{p}", "sample_index": s, "seed": 10 * p + s, "n_tokens": 4 + s,
                    "finish_reason": "eos" if s == 0 else "length", "kl_mean": 0.1 * len(label) if label != "base" else 0.0,
                    "reward": base["reward"] + sum(shift.values()),
                    "helpful": base["helpful"] + shift.get("helpful", 0.0),
                    "polite": base["polite"] + shift.get("polite", 0.0),
                    "term_length": -0.5,
                })  # fmt: skip
    return pa.Table.from_pylist(rows)


EFFECTS = {"base": {}, "helpful=1": {"helpful": 0.75}, "polite=1": {"polite": 0.5},
           "helpful=1,polite=1": {"helpful": 0.7, "polite": 0.55}}  # fmt: skip


def test_summary_means_counts_and_cost():
    scores = _scores(EFFECTS)
    cost = {("heads", "helpful=1"): {"lm_forwards_per_token": 1, "ms_per_token": 2.5}}
    rows = {r["alpha_vector"]: r for r in dial_summary_table(scores, ["helpful", "polite"], cost, STATS, "run").to_pylist()}
    base, helpful = rows["base"], rows["helpful=1"]
    # per-prompt means: p0 = 0.05, p1 = 0.55 -> mean 0.3
    assert base["helpful"] == pytest.approx(0.3)
    assert helpful["helpful"] == pytest.approx(1.05)
    assert helpful["polite"] == pytest.approx(-0.1)
    assert base["reward"] == pytest.approx(1.5)
    assert base["helpful_lo"] <= base["helpful"] <= base["helpful_hi"]
    assert (base["n_prompts"], base["n_samples"], base["n"]) == (2, 2, 4)
    assert base["length"] == pytest.approx(4.5) and base["eos_rate"] == pytest.approx(0.5)
    assert base["term_length"] == pytest.approx(-0.5)
    assert (helpful["lm_forwards_per_token"], helpful["ms_per_token"]) == (1, 2.5)
    assert base["ms_per_token"] is None
    assert helpful["alpha_helpful"] == 1.0 and helpful["alpha_polite"] == 0.0
    assert base["run_id"] == "run"


def test_effects_are_exact_paired_differences():
    effects = dial_effects_table(_scores(EFFECTS), ["helpful", "polite"], STATS).to_pylist()
    by = {(e["alpha_vector"], e["metric"]): e for e in effects}
    assert {label for label, _ in by} == {"helpful=1", "polite=1", "helpful=1,polite=1"}  # not base
    e = by[("helpful=1", "helpful")]
    # the same shift on every prompt: a zero-width interval at exactly the shift
    assert (e["diff"], e["diff_lo"], e["diff_hi"]) == pytest.approx((0.75, 0.75, 0.75))
    assert e["significant"] and e["n_prompts"] == 2
    zero = by[("helpful=1", "polite")]
    assert (zero["diff"], zero["significant"]) == (0.0, False)
    assert by[("helpful=1,polite=1", "reward")]["diff"] == pytest.approx(1.25)


# --- Pareto and the report's checks -------------------------------------------------------------


def test_pareto_front_and_domination():
    points = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.9, 0.9), (1.0, 0.0), (0.5, 0.5)]
    assert dominates((1, 1), (1, 0)) and not dominates((1, 0), (1, 0)) and not dominates((1, 0), (0, 1))
    # ties are not dominated by each other: both copies of (1, 0) stay
    assert pareto_front(points) == [2, 3, 1, 4]


def test_checks_singles_and_pairs_beyond_them(tmp_path):
    scores = _scores(EFFECTS)
    summary = dial_summary_table(scores, ["helpful", "polite"], {}, STATS).to_pylist()
    effects = dial_effects_table(scores, ["helpful", "polite"], STATS).to_pylist()
    dials = {"helpful": "helpful", "polite": "polite"}
    checks = dial_checks(summary, effects, dials, together=1.0)
    singles = {c["dial"]: c for c in checks["singles"]}
    assert singles["helpful"]["own_diff"] == pytest.approx(0.75) and singles["helpful"]["own_significant"]
    assert singles["helpful"]["others"]["polite"]["ok"]  # moved by 0
    (pair,) = checks["pairs"]
    # helpful=1,polite=1 sits at (1.0, 0.45): helpful=1 is at (1.05, -0.1), polite=1 at (0.3, 0.4)
    assert pair["alpha_vector"] == "helpful=1,polite=1" and pair["beyond_singles"] and pair["dominated_by"] == []
    text = dials_markdown(summary, checks, ["helpful", "polite"])
    assert "helpful=1,polite=1: helpful +1.000, polite +0.450: beyond every single dial" in text
    plots = save_pareto_plots(summary, ["helpful", "polite"], tmp_path)
    assert list(plots) == ["pareto_helpful_polite"] and plots["pareto_helpful_polite"].stat().st_size > 10_000


def test_a_pair_dominated_by_a_single_dial_says_so():
    rows = [
        {"alpha_vector": "a=2", "alpha_a": 2.0, "alpha_b": 0.0, "x": 1.0, "y": 1.0},
        {"alpha_vector": "a=1,b=1", "alpha_a": 1.0, "alpha_b": 1.0, "x": 0.9, "y": 0.9},
    ]
    (found,) = beyond_singles(rows, "x", "y", {"a": "x", "b": "y"})
    assert not found["beyond_singles"] and found["dominated_by"] == ["a=2"]


# --- config ---------------------------------------------------------------------------------------


def test_world_objectives_match_the_world():
    from alignheads.world.reward import OBJECTIVES

    assert tuple(OBJECTIVES) == WORLD_OBJECTIVES


def test_dial_settings_layer_over_the_method_section():
    cfg = RunConfig.model_validate({
        "train": {"iav": {"lr": 3e-3, "epochs": 2}},
        "dials": {"enabled": True, "heads": {"helpful": {"settings": {"epochs": 4}}, "polite": {"method": "calm"}}},
    })  # fmt: skip
    helpful = cfg.dial_settings("helpful")
    assert (helpful.lr, helpful.epochs, helpful.enabled) == (3e-3, 4, True)
    assert type(cfg.dial_settings("polite")).__name__ == "CALMTrainConfig"
    assert cfg.needs_world


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dials.heads={helpfull: {}}"], "did you mean 'helpful'"),
        (["dials.heads.helpful.settings={lrr: 1}"], "'lrr' is not a train.iav setting; did you mean 'lr'"),
        (["dials.heads.helpful.settings={lr: -1}"], r"dials.heads.helpful.settings.lr: Input should be greater than 0"),
        (["dials.grid=[{kind: 1}]"], "dials.grid names kind"),
        (["dials.heads={}"], "names no dial"),
    ],
)
def test_dial_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        read_config(None, overrides)


def test_embedded_default_turns_on_three_world_dials():
    cfg = read_config()
    assert cfg.dials.enabled and list(cfg.dials.heads) == ["helpful", "polite", "concise"]
    assert all(cfg.dials.objective_of(n) == n for n in cfg.dials.heads)


def test_summary_rows_follow_the_grid_whatever_the_row_order():
    scores = _scores(EFFECTS)
    shuffled = scores.take(list(reversed(range(scores.num_rows))))
    labels = [r["alpha_vector"] for r in dial_summary_table(shuffled, ["helpful", "polite"], {}, STATS).to_pylist()]
    assert labels == ["base", "helpful=1", "polite=1", "helpful=1,polite=1"]
