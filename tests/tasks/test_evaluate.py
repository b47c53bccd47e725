"""Evaluate stage on hand-made generations: world rewards, outcomes vs α = 0, summary, views, caching,
and the Hugging Face reward-model path with a tiny Llama classifier."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
from alignheads.storage.query import run_query
from alignheads.storage.tables import read_table, write_table
from alignheads.tasks.accuracy import ACCURACY_SCHEMA
from alignheads.tasks.evaluate import (
    GENERATIONS_SCHEMA,
    SCORES_SCHEMA,
    SUMMARY_SCHEMA,
    load_generations,
    plan_evaluate,
    run_evaluate,
    summary_table,
)
from alignheads.tasks.rewards import model_rewards

ARITH = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"
CAPITAL = "\n\nHuman: What is the capital of France?\n\nAssistant:"
PROMPTS = {"p0": ARITH, "p1": CAPITAL}
SEEDS = {("p0", 0): 11, ("p0", 1): 12, ("p1", 0): 13, ("p1", 1): 14}

# (head, alpha) -> [(prompt_id, sample_index, response, world reward by hand, kl_mean)]
SWEEP = {
    ("iav", 0.0): [
        ("p0", 0, " It is 6.", -1.0, 0.0),  # wrong answer: -1
        ("p0", 1, " It is 5.", 2.0, 0.0),  # right: +2
        ("p1", 0, " It is Paris.", 2.0, 0.0),
        ("p1", 1, "", -4.0, 0.0),  # empty: -4
    ],
    ("iav", 1.0): [
        ("p0", 0, " Sure, it is 5.", 2.5, 0.2),  # right + polite: win
        ("p0", 1, " It is 5.", 2.0, 0.4),  # same: tie
        ("p1", 0, " It is Rome.", -1.0, 0.6),  # wrong: lose
        ("p1", 1, " Sure, the answer is Paris.", 2.5, 0.8),  # win
    ],
    ("calm", 0.0): [("p0", 0, " It is 5.", 2.0, 0.0)],
    ("calm", 2.0): [
        ("p0", 0, " 5 5 5 5 5 5", -0.25, 1.0),  # right, repetition -2.25: lose
        ("p1", 0, " Paris paris paris paris.", 0.5, 3.0),  # no α = 0 baseline: null outcome
    ],
}


def generations_table(head: str, alpha: float, rows: list) -> pa.Table:
    n = len(rows)
    calm = head == "calm"
    data = {
        "head": [head] * n,
        "head_key": [f"key-{head}"] * n,
        "alpha": [alpha] * n,
        "prompt_id": [r[0] for r in rows],
        "sample_index": [r[1] for r in rows],
        "seed": [SEEDS[(r[0], r[1])] for r in rows],
        "prompt": [PROMPTS[r[0]] for r in rows],
        "response": [r[2] for r in rows],
        "n_tokens": [len(r[2]) for r in rows],  # any int: the summary averages it
        "finish_reason": ["length" if r[2] == "" else "eos" for r in rows],
        "kl_mean": [r[4] for r in rows],
        "kl_sum": [r[4] * 3 for r in rows],
        "strength_mean": [alpha + 0.5 if calm else None for _ in rows],
        "strength_max": [alpha + 1.0 for _ in rows],
        "utilisation": [0.25 * alpha if calm else None for _ in rows],
        "align_norm_mean": [None if calm else 1.0 for _ in rows],
    }
    return pa.Table.from_pydict(data, schema=GENERATIONS_SCHEMA)


def make_generation_artifact(store: Path, head: str, alpha: float, table: pa.Table) -> Path:
    key = f"{head}-{alpha}".replace(".", "_")

    def build(staging):
        return ArtifactContent(tables={"generations": write_table(table, staging, "generations")})

    return ensure_artifact(store, "generate", key, 1, {"head": head, "alpha": alpha}, {}, build).path


def make_accuracy_artifact(store: Path, head: str, key: str, accuracy: dict[float, float]) -> Path:
    """An accuracy artifact (`tasks.accuracy`'s table) of `head` trained as `key`."""
    rows = [{"head": head, "head_key": key, "alpha": a, "preference_accuracy": v, "n_pairs": 10} for a, v in accuracy.items()]
    table = pa.Table.from_pylist(rows, schema=ACCURACY_SCHEMA)

    def build(staging):
        return ArtifactContent(tables={"accuracy": write_table(table, staging, "accuracy")})

    return ensure_artifact(store, "accuracy", f"acc-{key}", 1, {"head": head}, {"train": key}, build).path


@pytest.fixture()
def sweep(tmp_path):
    store = tmp_path / "store"
    paths = [
        str(make_generation_artifact(store, head, alpha, generations_table(head, alpha, rows)))
        for (head, alpha), rows in SWEEP.items()
    ]
    return store, paths


def _by(table: pa.Table, *cols):
    return {tuple(r[c] for c in cols): r for r in table.to_pylist()}


def test_scores_rewards_outcomes_and_text_stats(sweep):
    store, paths = sweep
    result = run_evaluate(store, plan_evaluate(paths, "world", run_id="run-1"))
    assert result.computed is True
    scores = read_table(result.path, "scores")
    assert scores.schema.equals(SCORES_SCHEMA)
    assert scores.num_rows == sum(len(v) for v in SWEEP.values()) == 11
    rows = _by(scores, "head", "alpha", "prompt_id", "sample_index")
    for (head, alpha), gens in SWEEP.items():
        for pid, idx, _response, expected, kl in gens:
            row = rows[(head, alpha, pid, idx)]
            assert row["reward"] == pytest.approx(expected), (head, alpha, pid, idx)
            assert row["kl_mean"] == kl and row["seed"] == SEEDS[(pid, idx)]
            assert row["reward_source"] == "world"
    outcomes = {k: r["outcome"] for k, r in rows.items()}
    assert outcomes == {
        ("iav", 0.0, "p0", 0): None,
        ("iav", 0.0, "p0", 1): None,
        ("iav", 0.0, "p1", 0): None,
        ("iav", 0.0, "p1", 1): None,
        ("iav", 1.0, "p0", 0): "win",
        ("iav", 1.0, "p0", 1): "tie",
        ("iav", 1.0, "p1", 0): "lose",
        ("iav", 1.0, "p1", 1): "win",
        ("calm", 0.0, "p0", 0): None,
        ("calm", 2.0, "p0", 0): "lose",
        ("calm", 2.0, "p1", 0): None,
    }
    loop = rows[("calm", 2.0, "p0", 0)]  # " 5 5 5 5 5 5"
    assert (loop["distinct_1"], loop["distinct_2"], loop["repetition"]) == pytest.approx((1 / 6, 1 / 5, 0.75))
    empty = rows[("iav", 0.0, "p1", 1)]
    assert (empty["distinct_1"], empty["distinct_2"], empty["repetition"]) == (None, None, 0.0)
    polite = rows[("iav", 1.0, "p1", 1)]  # five distinct words
    assert (polite["distinct_1"], polite["distinct_2"], polite["repetition"]) == (1.0, 1.0, 0.0)
    assert rows[("calm", 2.0, "p0", 0)]["utilisation"] == 0.5
    assert rows[("iav", 1.0, "p0", 0)]["utilisation"] is None


def test_summary_one_row_per_head_alpha_with_hand_computed_numbers(sweep):
    store, paths = sweep
    result = run_evaluate(store, plan_evaluate(paths, run_id="run-1"))
    stored = read_table(result.path, "summary")
    assert stored.schema.equals(SUMMARY_SCHEMA)
    # no trained artifact was named: the stage leaves the preference accuracy empty
    assert stored.column("preference_accuracy").null_count == stored.num_rows
    # the summary of the stored scores with each method's held-out accuracy by α (as the stage
    # computes it from the trained artifacts) is the stored summary plus that column
    pref = {"iav": {"1.0": 0.93, 0: 0.5}, "calm": {"2": 0.8}}
    summary = summary_table(read_table(result.path, "scores"), "run-1", pref)
    assert summary.drop_columns(["preference_accuracy"]) == stored.drop_columns(["preference_accuracy"])
    for col in ("run_id", "head", "alpha", "reward", "win_rate", "kl", "n"):
        assert col in summary.column_names
    keys = [(r["head"], r["alpha"]) for r in summary.to_pylist()]
    assert keys == [("calm", 0.0), ("calm", 2.0), ("iav", 0.0), ("iav", 1.0)]
    rows = _by(summary, "head", "alpha")

    iav1 = rows[("iav", 1.0)]
    assert iav1["run_id"] == "run-1" and iav1["head_key"] == "key-iav"
    assert iav1["n"] == 4 and iav1["n_compared"] == 4
    assert iav1["reward"] == pytest.approx(1.5)  # (2.5 + 2 - 1 + 2.5) / 4
    assert iav1["reward_std"] == pytest.approx(math.sqrt(8.5 / 3))
    assert (iav1["win_rate"], iav1["tie_rate"], iav1["lose_rate"]) == (0.5, 0.25, 0.25)
    assert iav1["kl"] == pytest.approx(0.5)
    assert iav1["preference_accuracy"] == 0.93
    assert iav1["strength_mean"] is None and iav1["utilisation"] is None
    assert iav1["eos_rate"] == 1.0

    iav0 = rows[("iav", 0.0)]
    assert iav0["reward"] == pytest.approx(-0.25)  # (-1 + 2 + 2 - 4) / 4
    assert (iav0["win_rate"], iav0["tie_rate"], iav0["lose_rate"], iav0["n_compared"]) == (
        None,
        None,
        None,
        0,
    )
    assert iav0["eos_rate"] == 0.75 and iav0["preference_accuracy"] == 0.5
    assert iav0["distinct_1"] == 1.0  # the empty response is left out of the mean

    calm2 = rows[("calm", 2.0)]
    assert calm2["n"] == 2 and calm2["n_compared"] == 1
    assert calm2["reward"] == pytest.approx(0.125)  # (-0.25 + 0.5) / 2
    assert (calm2["win_rate"], calm2["lose_rate"]) == (0.0, 1.0)
    assert calm2["kl"] == pytest.approx(2.0)
    assert calm2["distinct_1"] == pytest.approx((1 / 6 + 1 / 4) / 2)
    assert calm2["repetition"] == pytest.approx((0.75 + 0.5) / 2)
    assert calm2["strength_mean"] == 2.5 and calm2["utilisation"] == 0.5
    assert calm2["preference_accuracy"] == 0.8
    assert rows[("calm", 0.0)]["preference_accuracy"] is None


def test_summary_carries_the_accuracy_artifacts_numbers(sweep):
    store, paths = sweep
    accuracy = [
        make_accuracy_artifact(store, "iav", "key-iav", {0.0: 0.5, 1.0: 0.93}),
        make_accuracy_artifact(store, "calm", "key-calm", {2.0: 0.8}),
    ]
    result = run_evaluate(store, plan_evaluate(paths, run_id="run-1", accuracy_paths=accuracy))
    rows = _by(read_table(result.path, "summary"), "head", "alpha")
    got = {arm: row["preference_accuracy"] for arm, row in rows.items()}
    assert got == {("calm", 0.0): None, ("calm", 2.0): 0.8, ("iav", 0.0): 0.5, ("iav", 1.0): 0.93}


def test_views_answer_and_rerun_is_cached(sweep):
    store, paths = sweep
    plan = plan_evaluate(paths, run_id="run-1")
    assert run_evaluate(store, plan).computed is True
    again = run_evaluate(store, plan_evaluate(list(reversed(paths)), run_id="run-1"))
    assert again.computed is False and again.key == plan.key

    t = run_query(
        store, "SELECT run_id, head, alpha, reward, win_rate, kl, n FROM summary ORDER BY head, alpha"
    )
    assert [(r["head"], r["alpha"], r["n"]) for r in t.to_pylist()] == [
        ("calm", 0.0, 2 - 1),
        ("calm", 2.0, 2),
        ("iav", 0.0, 4),
        ("iav", 1.0, 4),
    ]
    assert t.to_pylist()[3]["win_rate"] == 0.5 and t.to_pylist()[3]["run_id"] == "run-1"
    counts = run_query(
        store,
        "SELECT outcome, count(*) AS c FROM scores WHERE head = 'iav' GROUP BY outcome ORDER BY outcome",
    ).to_pylist()
    assert counts == [{"outcome": "lose", "c": 1}, {"outcome": "tie", "c": 1}, {"outcome": "win", "c": 2},
                      {"outcome": None, "c": 4}]  # fmt: skip
    joined = run_query(
        store,
        "SELECT s.reward, g.response FROM scores s JOIN generations g USING (head, alpha, prompt_id, "
        "sample_index, seed) WHERE s.head = 'calm' AND s.alpha = 2 ORDER BY s.prompt_id",
    ).to_pylist()
    assert joined == [{"reward": -0.25, "response": " 5 5 5 5 5 5"},
                      {"reward": 0.5, "response": " Paris paris paris paris."}]  # fmt: skip


def test_key_depends_on_inputs_reward_and_trained_artifacts_not_run_id(sweep, tmp_path):
    store, paths = sweep
    base = plan_evaluate(paths, run_id="a")
    assert plan_evaluate(paths, run_id="b").key == base.key
    assert plan_evaluate(paths[:-1]).key != base.key
    # the accuracy artifacts the summary carries are inputs, by key: not by where they are
    first = make_accuracy_artifact(store, "iav", "train-1", {0.0: 0.5, 1.0: 0.9})
    scored = plan_evaluate(paths, accuracy_paths=[first])
    assert scored.key != base.key and scored.inputs["accuracy[0]"] == "acc-train-1"
    moved = tmp_path / "elsewhere" / "acc-train-1"
    shutil.copytree(first, moved)
    assert plan_evaluate(paths, accuracy_paths=[moved]).key == scored.key
    other = make_accuracy_artifact(store, "iav", "train-2", {0.0: 0.5, 1.0: 0.9})
    assert plan_evaluate(paths, accuracy_paths=[other]).key != scored.key
    model_dir = tmp_path / "rm"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    rm = plan_evaluate(paths, str(model_dir))
    assert rm.key != base.key and rm.reward["kind"] == "model"
    (model_dir / "config.json").write_text('{"changed": 1}')
    assert plan_evaluate(paths, str(model_dir)).key != rm.key


def test_bad_generations_are_named(tmp_path):
    store = tmp_path / "store"
    table = generations_table("iav", 0.0, SWEEP[("iav", 0.0)])
    dup = make_generation_artifact(store, "iav", 0.0, pa.concat_tables([table, table.slice(0, 1)]))
    with pytest.raises(ValueError, match="appears twice"):
        load_generations([str(dup)])
    nulls = table.set_column(7, "response", pa.array(["a", None, "b", "c"], pa.string()))
    bad = make_generation_artifact(store, "iav", 9.0, nulls)
    with pytest.raises(ValueError, match=r"generations row 1: field 'response' is null"):
        load_generations([str(bad)])
    lacking = make_generation_artifact(store, "calm", 9.0, table.drop_columns(["seed"]))
    with pytest.raises(ValueError, match="lacks column.*seed"):
        load_generations([str(lacking)])
    # the per-head statistics columns may be absent: filled with nulls
    lean = make_generation_artifact(
        store, "calm", 8.0, table.drop_columns(["utilisation", "align_norm_mean"])
    )
    assert load_generations([str(lean)]).column("utilisation").null_count == 4
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(Exception, match="manifest"):
        plan_evaluate([str(empty_dir)])


# --- the Hugging Face reward-model path -------------------------------------------------------


@pytest.fixture()
def tiny_reward_model(tmp_path, plain_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(plain_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # make scores clearly differ between texts
    out = tmp_path / "reward-model"
    model.save_pretrained(out)
    plain_tokenizer.save_pretrained(out)
    return out, model


def _direct_scores(model, tokenizer, texts):
    import torch

    with torch.inference_mode():
        return [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]


def test_reward_model_scores_match_unbatched_and_are_deterministic(tiny_reward_model, plain_tokenizer):
    _, model = tiny_reward_model
    prompts = [ARITH, CAPITAL, ARITH, CAPITAL, ARITH]
    responses = [" It is 5.", " Paris.", " Maybe 6, who cares.", "", " It is 5. It is 5. It is 5."]
    scores, truncated = model_rewards(model, plain_tokenizer, prompts, responses, batch_size=2)
    direct = _direct_scores(model, plain_tokenizer, [p + r for p, r in zip(prompts, responses, strict=True)])
    assert len(scores) == 5 and truncated == 0
    assert scores == pytest.approx(direct, abs=1e-5)  # padding and batching change nothing
    assert len(set(round(s, 4) for s in scores)) > 1
    assert model_rewards(model, plain_tokenizer, prompts, responses, batch_size=3)[0] == pytest.approx(scores)
    _, cut = model_rewards(model, plain_tokenizer, prompts, responses, batch_size=2, max_length=8)
    assert cut == 5


def test_run_evaluate_with_a_reward_model_directory(sweep, tiny_reward_model, plain_tokenizer):
    store, paths = sweep
    model_dir, model = tiny_reward_model
    plan = plan_evaluate(paths, str(model_dir), run_id="rm", reward_batch_size=3)
    result = run_evaluate(store, plan, device="cpu")
    scores = read_table(result.path, "scores").to_pylist()
    gens = load_generations(plan.generation_paths).to_pylist()
    direct = _direct_scores(model, plain_tokenizer, [g["prompt"] + g["response"] for g in gens])
    assert [s["reward"] for s in scores] == pytest.approx(direct, abs=1e-5)
    assert {s["reward_source"] for s in scores} == {str(model_dir)}
    assert result.manifest.info["reward"] == {"source": str(model_dir), "truncated": 0}
    assert run_evaluate(store, plan).computed is False
    # a world-reward evaluation of the same sweep lives beside it; the views union both
    run_evaluate(store, plan_evaluate(paths, run_id="w"))
    t = run_query(store, "SELECT run_id, count(*) AS rows FROM summary GROUP BY run_id ORDER BY run_id")
    assert t.to_pylist() == [{"run_id": "rm", "rows": 4}, {"run_id": "w", "rows": 4}]


def test_summary_kl_is_the_mean_over_responses_and_its_column_says_so(sweep):
    """Issue 18, item 7c: the stored summary's `kl` column carries its definition, and the value
    is the mean of the responses' kl_mean, whatever their lengths (iav at α = 1: responses of 15,
    9, 12 and 27 characters as n_tokens; pooling Σ kl_sum / Σ n_tokens would give 6 / 63)."""
    from alignheads.models.metrics import KL_DEFINITION

    store, paths = sweep
    result = run_evaluate(store, plan_evaluate(paths, run_id="run-1"))
    stored = read_table(result.path, "summary")
    field = stored.schema.field("kl")
    assert field.metadata == {b"description": KL_DEFINITION.encode()}
    iav1 = _by(stored, "head", "alpha")[("iav", 1.0)]
    assert iav1["kl"] == pytest.approx((0.2 + 0.4 + 0.6 + 0.8) / 4)
    assert iav1["kl"] != pytest.approx(6 / 63)


def test_intervals_calibrated_points_and_paired_comparisons_by_hand(sweep):
    """Per-prompt means first (2 prompts × 2 samples for IAV), then intervals over prompts; the
    calibrated table picks the summary row of each method's calibrated α; the comparisons pair
    arms prompt by prompt (numbers worked out from SWEEP)."""
    store, paths = sweep
    calibration = {
        "iav": [{"target": 0.5, "alpha": 1.0, "kl": 0.45, "converged": True, "steps": 1}],
        "calm": [{"target": 0.5, "alpha": 2.0, "kl": 0.6, "converged": False, "steps": 8}],
    }
    plan = plan_evaluate(paths, run_id="r", calibration=calibration)
    assert plan.key != plan_evaluate(paths, run_id="r").key  # the calibration is in the key
    result = run_evaluate(store, plan)
    rows = _by(read_table(result.path, "summary"), "head", "alpha")
    iav1 = rows[("iav", 1.0)]
    assert (iav1["n_prompts"], iav1["n_samples"]) == (2, 2)
    # per-prompt reward means 2.25 (p0) and 0.75 (p1): every bootstrap mean lies between them
    assert iav1["reward"] == pytest.approx(1.5)
    assert 0.75 <= iav1["reward_lo"] <= iav1["reward"] <= iav1["reward_hi"] <= 2.25
    assert 0.3 <= iav1["kl_lo"] <= 0.5 <= iav1["kl_hi"] <= 0.7  # per-prompt KL 0.3 and 0.7
    assert (iav1["win_rate_lo"], iav1["win_rate"], iav1["win_rate_hi"]) == (0.5, 0.5, 0.5)  # 1/2 per prompt
    assert rows[("iav", 0.0)]["win_rate_lo"] is None  # no win rate at α = 0
    calm0 = rows[("calm", 0.0)]
    assert calm0["n_prompts"] == 1 and calm0["reward_lo"] is None  # one prompt: no interval

    calibrated = read_table(result.path, "calibrated").to_pylist()
    assert [(r["target_kl"], r["head"], r["alpha"], r["calibration_kl"], r["converged"]) for r in calibrated] == [
        (0.5, "calm", 2.0, 0.6, False),
        (0.5, "iav", 1.0, 0.45, True),
    ]
    assert calibrated[1]["reward"] == iav1["reward"] and calibrated[1]["kl_hi"] == iav1["kl_hi"]

    comparisons = {(r["head_a"], r["head_b"]): r for r in read_table(result.path, "comparisons").to_pylist()}
    assert set(comparisons) == {("calm", "iav"), ("iav", "α=0"), ("calm", "α=0")}
    pair = comparisons[("calm", "iav")]  # per prompt: −0.25 − 2.25 and 0.5 − 0.75
    assert pair["reward_diff"] == pytest.approx(-1.375) and pair["n_prompts"] == 2
    assert -2.5 <= pair["diff_lo"] <= pair["diff_hi"] <= -0.25 and pair["significant"]
    base = comparisons[("iav", "α=0")]  # 1.75 on both prompts: a zero-width interval
    assert (base["reward_diff"], base["diff_lo"], base["diff_hi"]) == pytest.approx((1.75, 1.75, 1.75))
    assert base["significant"] and base["kl_b"] == 0.0 and base["alpha_b"] == 0.0
    lone = comparisons[("calm", "α=0")]  # only p0 is shared
    assert lone["n_prompts"] == 1 and lone["diff_lo"] is None and not lone["significant"]
    assert lone["reward_diff"] == pytest.approx(-2.25)
    # the views answer as the issue asks
    got = run_query(store, "SELECT head, alpha, reward, reward_lo, reward_hi FROM summary").num_rows
    assert got == 4 and run_query(store, "SELECT * FROM comparisons").num_rows == 3
