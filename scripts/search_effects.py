"""Each setting's effect in a full-factorial search (`alignheads tune` with `kind: grid`, every
searched setting at two values), read from the search's own trials.

All trials of a search share the validation prompts and the samples' seeds, so the reward of two
trials can be compared prompt by prompt. A setting's effect is the mean, over the trials' pairs
that differ in that setting alone, of the per-prompt reward difference (high value − low value),
with a 95 % bootstrap interval over prompts (`alignheads.models.intervals`, as the evaluation's
paired comparisons):

    .venv/bin/python scripts/search_effects.py [--store store] [--search latest] [--method iav]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from alignheads.flows.tuned import TRIALS_TABLE, find_search
from alignheads.models.intervals import mean_interval, per_prompt_means
from alignheads.storage.tables import read_table


def trial_means(store: Path, evaluate_key: str) -> dict[str, float]:
    """{prompt id: mean reward over its samples} of one trial's calibrated-α generations."""
    scores = read_table(store / "evaluate" / evaluate_key, "scores").to_pydict()
    return per_prompt_means(scores["prompt_id"], scores["reward"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("store"))
    parser.add_argument("--search", default="latest")
    parser.add_argument("--method", default="iav")
    args = parser.parse_args()
    path = find_search(args.store, args.search)
    rows = [r for r in read_table(path, TRIALS_TABLE).to_pylist() if r["method"] == args.method]
    settings = [json.loads(r["settings"]) for r in rows]
    keys = list(
        dict.fromkeys(k for s in settings for k in s)
    )  # the space's order; an incumbent ({}) names none
    if any(set(s) != set(keys) for s in settings):
        raise SystemExit(f"{path}: trials set different settings (an incumbent?); not a factorial")
    varied = {k: sorted({s[k] for s in settings}) for k in keys if len({s[k] for s in settings}) > 1}
    if any(len(v) != 2 for v in varied.values()) or len(rows) != 2 ** len(varied):
        raise SystemExit(f"{path}: not a full 2-level factorial over {sorted(varied)} ({len(rows)} trials)")
    means = [trial_means(args.store, r["evaluate_key"]) for r in rows]
    print(
        f"search {path.name}, method {args.method}: {len(rows)} trials, validation reward at the calibrated α"
    )
    for s, r in zip(settings, rows, strict=True):
        print(
            f"  {json.dumps({k: s[k] for k in varied})}: {r['reward']:+.3f} [{r['reward_lo']:+.3f}, {r['reward_hi']:+.3f}] (α {r['alpha']:.3g}, KL {r['kl']:.3f})"
        )
    print(
        "effect of each setting, its low -> high value (mean of 4 paired per-prompt differences, 95 % interval):"
    )
    for key, (low, high) in varied.items():
        diffs: dict[str, list[float]] = {}
        for (i, a), (j, b) in itertools.combinations(enumerate(settings), 2):
            others_same = all(a[k] == b[k] for k in varied if k != key)
            if not others_same:
                continue
            hi, lo = (i, j) if a[key] == high else (j, i)
            for p in (p for p in means[hi] if p in means[lo]):  # in order: the bootstrap's draws depend on it
                diffs.setdefault(p, []).append(means[hi][p] - means[lo][p])
        per_prompt = [sum(d) / len(d) for d in diffs.values()]
        ci = mean_interval(per_prompt)
        print(f"  {key} {low} -> {high}: {ci.mean:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}] over {ci.n} prompts")


if __name__ == "__main__":
    main()
