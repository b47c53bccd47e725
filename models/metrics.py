"""Evaluation maths as pure functions: words, distinct-n, repetition, win/tie/lose, aggregation.

Definitions (used by the evaluate stage, `tasks/evaluate.py`):

- **words** of a text: the maximal runs of Unicode word characters (`\\w+`), lower-cased;
  punctuation and whitespace only separate them ("It's 5." -> ``["it", "s", "5"]``).
- **distinct-n** of one response: unique word n-grams / all word n-grams (Li et al., 2016),
  in [0, 1], 1 when no n-gram repeats; ``None`` when the response has fewer than n words
  (no n-gram to count), so that such responses are left out of means rather than scored 0 or 1.
- **repetition** of one response: the share of its word 3-grams that repeat an earlier one,
  ``1 - unique 3-grams / all 3-grams``, in [0, 1); 0.0 when it has fewer than 3 words (nothing
  can loop). A response stuck in a loop ("a b c a b c a b c") scores high; a plain answer 0.
- **outcome** of a response against its α = 0 counterpart (same head, prompt, sample and seed):
  ``win`` when its reward is higher by more than ``TIE_TOLERANCE``, ``lose`` when lower by more,
  ``tie`` otherwise.
- **aggregates** are means over the non-null values (``None`` when there are none); rates
  are shares of the rows that have the field (e.g. win rate = wins / compared pairs).
- **kl** of a (head, α) group: the mean over its responses of each response's mean per-token
  KL(π_α ‖ π_base) (``KL_DEFINITION``; why not pooled over tokens: `summarize_group`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

TIE_TOLERANCE = 1e-9
OUTCOMES = ("win", "tie", "lose")

# The summary's `kl` column, in the words every place that shows it uses (the summary table's
# column description, the reward-vs-KL plot's axis, the printed summary's note).
KL_DEFINITION = (
    "KL(π_α ‖ π_base) per token, in nats: the mean over each response's tokens, "
    "then over the responses (each response weighs the same)"
)
KL_LABEL = "KL(π_α ‖ π_base) per token, mean over responses (nats)"

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The text's words: runs of word characters, lower-cased."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of `tokens` (empty when there are fewer than n)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[str], n: int) -> float | None:
    """Unique n-grams / all n-grams of one token sequence; None when it has no n-gram."""
    grams = ngrams(tokens, n)
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def repetition(tokens: Sequence[str], n: int = 3) -> float:
    """Share of the n-grams (default 3-grams) that repeat an earlier one; 0.0 with no n-gram."""
    d = distinct_n(tokens, n)
    return 0.0 if d is None else 1.0 - d


def text_stats(text: str) -> dict[str, float | None]:
    """distinct_1, distinct_2 and repetition of one response's words."""
    toks = words(text)
    return {
        "distinct_1": distinct_n(toks, 1),
        "distinct_2": distinct_n(toks, 2),
        "repetition": repetition(toks),
    }


def outcome(reward: float, baseline: float | None, tol: float = TIE_TOLERANCE) -> str | None:
    """'win' / 'tie' / 'lose' of `reward` against `baseline` (None when there is no baseline)."""
    if baseline is None or reward is None:
        return None
    if math.isnan(reward) or math.isnan(baseline):
        return None
    delta = reward - baseline
    if delta > tol:
        return "win"
    if delta < -tol:
        return "lose"
    return "tie"


def outcomes_against_baseline(
    keys: Sequence[Any], alphas: Sequence[float], rewards: Sequence[float], tol: float = TIE_TOLERANCE
) -> list[str | None]:
    """Outcome of every row against the row with the same key at α = 0.

    `keys[i]` identifies a (head, prompt, sample, seed) — any hashable. Rows at α = 0, and rows
    whose key has no α = 0 row, get None. Two α = 0 rows with one key raise ValueError.
    """
    if not len(keys) == len(alphas) == len(rewards):
        raise ValueError(f"lengths differ: {len(keys)} keys, {len(alphas)} alphas, {len(rewards)} rewards")
    base: dict[Any, float] = {}
    for k, a, r in zip(keys, alphas, rewards, strict=True):
        if a == 0.0:
            if k in base:
                raise ValueError(f"two alpha = 0 rows for {k!r}")
            base[k] = r
    return [
        None if a == 0.0 else outcome(r, base.get(k), tol)
        for k, a, r in zip(keys, alphas, rewards, strict=True)
    ]


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the non-null, non-NaN values; None when there are none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def std(values: Iterable[float | None]) -> float | None:
    """Sample standard deviation (n - 1) of the non-null values; 0.0 for one value, None for none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None
    if len(vals) == 1:
        return 0.0
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def outcome_rates(outcomes: Iterable[str | None]) -> dict[str, float | int | None]:
    """win_rate, tie_rate, lose_rate (shares of the compared rows) and n_compared.

    Rates are None when no row was compared (α = 0, or no baseline)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for o in outcomes:
        if o is None:
            continue
        if o not in counts:
            raise ValueError(f"unknown outcome {o!r} (expected one of {OUTCOMES})")
        counts[o] += 1
    total = sum(counts.values())
    rates: dict[str, float | int | None] = {
        f"{o}_rate": (counts[o] / total if total else None) for o in OUTCOMES
    }
    rates["n_compared"] = total
    return rates


def share(flags: Iterable[bool]) -> float | None:
    """Share of True among the flags; None when there are none."""
    vals = list(flags)
    return sum(1 for f in vals if f) / len(vals) if vals else None


def summarize_group(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates of one (head, α) group of score rows (dicts with the `scores` columns and
    `finish_reason`): reward mean/std, outcome rates, means of kl/length/diversity/strength, eos rate.

    ``kl`` is the mean over the responses of each response's ``kl_mean`` (its mean per-token
    KL(π_α ‖ π_base)), not the per-token KL pooled over the group (Σ kl_sum / Σ n_tokens). Chosen
    deliberately, for three reasons:

    - The unit is the one of every other column: reward, win rate, length and diversity are means
      over responses (one per prompt and sample), so the reward–KL frontier and the matched-KL
      table put two per-response means side by side, each prompt weighing the same on both axes.
    - Pooling weights each response by its length, so the responses that run to
      ``max_new_tokens`` (often the looping ones at large α) would dominate a method's KL while
      the short answers barely count, and two methods' KLs would differ by their lengths.
    - It is the number the rest of the project reports: the generate stage's ``kl_mean`` info and
      ``generate --steering-info`` give the same per-response means.

    The pooled value stays one query away:
    ``SELECT head, alpha, sum(kl_sum) / sum(n_tokens) FROM generations GROUP BY head, alpha``.
    Where the KL is shown, ``KL_DEFINITION`` and ``KL_LABEL`` say which one it is.
    """
    if not rows:
        raise ValueError("cannot summarize an empty group")
    return {
        "reward": mean(r["reward"] for r in rows),
        "reward_std": std(r["reward"] for r in rows),
        **outcome_rates(r["outcome"] for r in rows),
        "kl": mean(r["kl_mean"] for r in rows),
        "n": len(rows),
        "length": mean(r["n_tokens"] for r in rows),
        "distinct_1": mean(r["distinct_1"] for r in rows),
        "distinct_2": mean(r["distinct_2"] for r in rows),
        "repetition": mean(r["repetition"] for r in rows),
        "strength_mean": mean(r["strength_mean"] for r in rows),
        "utilisation": mean(r["utilisation"] for r in rows),
        "eos_rate": share(r["finish_reason"] == "eos" for r in rows),
    }
