"""Evaluation maths on hand-computed examples: words, distinct-n, repetition, outcomes, aggregates."""

from __future__ import annotations

import math

import pytest

from alignheads.models import metrics as M


def test_words_lowercase_and_split_on_punctuation():
    assert M.words("It's 5. Sure,   PARIS!") == ["it", "s", "5", "sure", "paris"]
    assert M.words("") == []
    assert M.words(" ...!? ") == []


def test_ngrams():
    assert M.ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert M.ngrams(["a"], 2) == []
    with pytest.raises(ValueError):
        M.ngrams(["a"], 0)


def test_distinct_n_hand_computed():
    toks = ["a", "b", "a", "b", "c"]
    assert M.distinct_n(toks, 1) == pytest.approx(3 / 5)
    # bigrams ab ba ab bc -> 3 unique of 4
    assert M.distinct_n(toks, 2) == pytest.approx(3 / 4)
    assert M.distinct_n(["x"] * 6, 1) == pytest.approx(1 / 6)
    assert M.distinct_n(["x"] * 6, 2) == pytest.approx(1 / 5)
    assert M.distinct_n([], 1) is None
    assert M.distinct_n(["a"], 2) is None


def test_repetition_is_share_of_repeated_trigrams():
    assert M.repetition(["a", "b", "c", "a", "b", "c", "a", "b", "c"]) == pytest.approx(1 - 3 / 7)
    assert M.repetition(["x"] * 6) == pytest.approx(0.75)
    assert M.repetition(["a", "b", "c", "d"]) == 0.0
    assert M.repetition(["a", "a"]) == 0.0  # fewer than 3 words: nothing can loop
    assert M.repetition([]) == 0.0


def test_text_stats():
    assert M.text_stats(" Paris paris paris paris.") == {
        "distinct_1": pytest.approx(1 / 4),
        "distinct_2": pytest.approx(1 / 3),
        "repetition": pytest.approx(0.5),
    }
    assert M.text_stats("") == {"distinct_1": None, "distinct_2": None, "repetition": 0.0}


def test_outcome_with_tie_tolerance():
    assert M.outcome(1.0, 0.5) == "win"
    assert M.outcome(0.5, 1.0) == "lose"
    assert M.outcome(1.0, 1.0) == "tie"
    assert M.outcome(1.0 + 1e-10, 1.0) == "tie"
    assert M.outcome(1.0 - 1e-10, 1.0) == "tie"
    assert M.outcome(1.0 + 2e-9, 1.0) == "win"
    assert M.outcome(1.0, None) is None
    assert M.outcome(math.nan, 1.0) is None


def test_outcomes_against_baseline_matches_on_key():
    keys = ["p0", "p1", "p0", "p1", "p2", "p0"]
    alphas = [0.0, 0.0, 1.0, 1.0, 1.0, 2.0]
    rewards = [1.0, 2.0, 1.5, 2.0, 9.0, 0.0]
    assert M.outcomes_against_baseline(keys, alphas, rewards) == [None, None, "win", "tie", None, "lose"]
    with pytest.raises(ValueError, match="two alpha = 0 rows"):
        M.outcomes_against_baseline(["a", "a"], [0.0, 0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="lengths differ"):
        M.outcomes_against_baseline(["a"], [0.0, 1.0], [1.0])


def test_mean_std_share():
    assert M.mean([1.0, None, 3.0]) == 2.0
    assert M.mean([None, math.nan]) is None
    assert M.std([2.5, 2.0, -1.0, 2.5]) == pytest.approx(math.sqrt(8.5 / 3))
    assert M.std([4.0]) == 0.0
    assert M.std([]) is None
    assert M.share([True, False, True, True]) == 0.75
    assert M.share([]) is None


def test_outcome_rates():
    rates = M.outcome_rates(["win", "tie", None, "lose", "win"])
    assert rates == {"win_rate": 0.5, "tie_rate": 0.25, "lose_rate": 0.25, "n_compared": 4}
    assert M.outcome_rates([None, None]) == {
        "win_rate": None,
        "tie_rate": None,
        "lose_rate": None,
        "n_compared": 0,
    }
    with pytest.raises(ValueError, match="unknown outcome"):
        M.outcome_rates(["draw"])


def test_summarize_group():
    base = {"strength_mean": None, "utilisation": None, "distinct_2": None, "repetition": 0.0}
    rows = [
        {**base, "reward": 1.0, "outcome": "win", "kl_mean": 0.1, "n_tokens": 4, "distinct_1": 1.0,
         "finish_reason": "eos"},
        {**base, "reward": 3.0, "outcome": "lose", "kl_mean": 0.3, "n_tokens": 8, "distinct_1": 0.5,
         "finish_reason": "length"},
    ]  # fmt: skip
    agg = M.summarize_group(rows)
    assert agg["reward"] == 2.0
    assert agg["reward_std"] == pytest.approx(math.sqrt(2.0))
    assert (agg["win_rate"], agg["tie_rate"], agg["lose_rate"], agg["n_compared"]) == (0.5, 0.0, 0.5, 2)
    assert agg["kl"] == pytest.approx(0.2)
    assert (agg["n"], agg["length"], agg["distinct_1"], agg["eos_rate"]) == (2, 6.0, 0.75, 0.5)
    assert agg["distinct_2"] is None and agg["strength_mean"] is None and agg["utilisation"] is None
    with pytest.raises(ValueError):
        M.summarize_group([])


def test_summary_kl_is_the_mean_over_responses_and_says_so():
    """Issue 18, item 7c: the summary's `kl` was called "mean per-token KL" (plots, docs) while
    it is the mean of per-response means. The definition is kept, deliberately (see
    `summarize_group`), and named for what it is."""
    base = {"reward": 0.0, "outcome": None, "finish_reason": "eos", "distinct_1": None,
            "distinct_2": None, "repetition": 0.0, "strength_mean": None, "utilisation": None}  # fmt: skip
    rows = [{**base, "kl_mean": 0.1, "n_tokens": 2}, {**base, "kl_mean": 0.7, "n_tokens": 10}]
    agg = M.summarize_group(rows)
    assert agg["kl"] == pytest.approx(0.4)  # (0.1 + 0.7) / 2: each response weighs the same
    pooled = (0.1 * 2 + 0.7 * 10) / 12  # 0.6: what "pooled per token" would have given
    assert agg["kl"] != pytest.approx(pooled)
    for text in (M.KL_DEFINITION, M.KL_LABEL):
        assert "per token" in text and "mean over" in text and "KL(π_α ‖ π_base)" in text
        assert "mean per-token KL" not in text  # the old, ambiguous name
    assert "the mean over each response's tokens, then over the responses" in M.KL_DEFINITION
    assert "Σ kl_sum / Σ n_tokens" in M.summarize_group.__doc__  # the alternative, and why not
