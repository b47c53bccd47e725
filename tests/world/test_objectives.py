"""Per-objective preference pairs (the dials' data): each pair isolates one objective."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from alignheads.world import corpus as C
from alignheads.world.reward import OBJECTIVES, TERMS, objective_scores, reward_terms

N = 200


def _digest(pairs: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize(
    ("seed", "split", "digest"),
    [
        # Computed from `preference_pairs` before objective pairs were added to the corpus.
        (0, "train", "d139cefebcc8a226a6f6109db45deb40f0abc66b8baa4d7cb2af9188231c1875"),
        (7, "train", "f31605bd634235d962e79ffc9f366aebc5fe9d9be0d5d7f8d69b4e8155cdb1c5"),
        (0, "test", "620238fc1ad929764db8621a99365ce3c9158c5bc2e419398c0537d87cee6514"),
    ],
)
def test_main_preference_pairs_are_unchanged(seed: int, split: str, digest: str) -> None:
    assert _digest(C.preference_pairs(50, seed=seed, split=split)) == digest


def test_main_test_pairs_with_exclude_are_unchanged() -> None:
    train = {p["prompt"] for p in C.preference_pairs(100, seed=0, split="train")}
    test = C.preference_pairs(50, seed=0, split="test", exclude=train)
    assert _digest(test) == "b067e2589ae1b284bb252184591641e3321f5cbb332a75722373de5148159b92"


def test_objective_scores_sum_their_terms() -> None:
    prompt = C.format_prompt("What is 3 plus 4?")
    # right (+2), one polite (+0.5) and one rude phrase (-1.5), 1 + 5 + 1 + 6 + 6 = 19 words (-0.15)
    response = " Sure! 3 plus 4 is 7. Ugh. Well, let me think about this. I think I know this one."
    assert objective_scores(prompt, response) == pytest.approx(
        {"helpful": 2.0, "polite": -1.0, "concise": -0.15}, abs=1e-12
    )
    assert set(C.OBJECTIVE_PAIR_BUILDERS) == set(OBJECTIVES)
    assert all(t in TERMS for names in OBJECTIVES.values() for t in names)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_chosen_wins_on_the_objective_and_ties_on_every_other_term(objective: str, split: str) -> None:
    pairs = C.objective_pairs(objective, N, seed=0, split=split)
    assert len(pairs) == N
    own = OBJECTIVES[objective]
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
        chosen, rejected = reward_terms(p["prompt"], p["chosen"]), reward_terms(p["prompt"], p["rejected"])
        assert sum(chosen[t] for t in own) > sum(rejected[t] for t in own), p
        # The templates allow an exact tie on every other term (measured: 30 000 pairs per
        # objective over three seeds, all tied), so the dial sees its objective and nothing else.
        assert {t: chosen[t] for t in TERMS if t not in own} == {
            t: rejected[t] for t in TERMS if t not in own
        }, p


def test_helpful_pairs_are_right_against_wrong_in_one_tone() -> None:
    pairs = C.objective_pairs("helpful", N, seed=1, split="train")
    polite = 0
    for p in pairs:
        chosen, rejected = reward_terms(p["prompt"], p["chosen"]), reward_terms(p["prompt"], p["rejected"])
        assert (chosen["correctness"], rejected["correctness"]) == (2.0, -1.0)
        opener = p["chosen"].split()[0]
        polite += opener in {o.split()[0] for o in C.POLITE_OPENERS} and p["rejected"].split()[0] == opener
    assert 0 < polite < N  # both tones occur


def test_polite_pairs_cover_the_three_tone_contrasts_on_one_core() -> None:
    pairs = C.objective_pairs("polite", N, seed=1, split="train")
    contrasts = set()
    for p in pairs:
        chosen, rejected = reward_terms(p["prompt"], p["chosen"]), reward_terms(p["prompt"], p["rejected"])
        contrasts.add((chosen["politeness"] > 0, rejected["rudeness"] < 0))
        assert chosen["rudeness"] == rejected["politeness"] == 0.0
        assert chosen["length"] == rejected["length"] == 0.0  # both within the free words
    # (polite, rude), (polite, plain), (plain, rude)
    assert contrasts == {(True, True), (True, False), (False, True)}


def test_concise_pairs_pad_the_same_answer_with_distinct_fillers() -> None:
    for p in C.objective_pairs("concise", N, seed=1, split="train"):
        core = p["chosen"].strip()
        assert core in p["rejected"]
        padding = [s for s in C.PAD_FILLERS if s in p["rejected"]]
        assert 3 <= len(padding) <= 5
        assert len(p["rejected"]) == len(p["chosen"]) + sum(len(s) + 1 for s in padding)
        assert reward_terms(p["prompt"], p["chosen"])["length"] == 0.0
        assert reward_terms(p["prompt"], p["rejected"])["length"] <= -0.15


def test_test_prompts_are_distinct_and_unseen() -> None:
    main_train = {p["prompt"] for p in C.preference_pairs(400, seed=0, split="train")}
    for objective in OBJECTIVES:
        train = {p["prompt"] for p in C.objective_pairs(objective, N, seed=0, split="train")}
        test = [
            p["prompt"]
            for p in C.objective_pairs(objective, N, seed=0, split="test", exclude=main_train | train)
        ]
        assert len(set(test)) == N
        assert not set(test) & (main_train | train)


def test_train_prompts_never_use_a_held_out_question() -> None:
    held = {
        C.format_prompt(q.text)
        for q in (C.sample_question(random.Random(i)) for i in range(5000))
        if C.is_held_out(q, seed=0, fraction=0.2)
    }
    for objective in OBJECTIVES:
        train = {p["prompt"] for p in C.objective_pairs(objective, 1000, seed=0, split="train")}
        assert held and not held & train


def test_pairs_are_deterministic_with_a_stream_per_objective_and_split() -> None:
    first = C.objective_pairs("polite", 50, seed=3, split="train")
    assert first == C.objective_pairs("polite", 50, seed=3, split="train")
    assert first != C.objective_pairs("polite", 50, seed=4, split="train")
    assert first != C.objective_pairs("polite", 50, seed=3, split="test")
    prompts = [p["prompt"] for p in first]
    assert prompts != [p["prompt"] for p in C.objective_pairs("helpful", 50, seed=3, split="train")]
    assert prompts != [p["prompt"] for p in C.preference_pairs(50, seed=3, split="train")]


def test_unknown_objective_and_exhausted_prompts_raise() -> None:
    with pytest.raises(ValueError, match="unknown objective 'funny'"):
        C.objective_pairs("funny", 1, seed=0, split="train")
    # Excluding (nearly) every single-turn prompt leaves fewer than 10 to find in 10 000 draws.
    rng = random.Random(0)
    everything = {C.format_prompt(C.sample_question(rng).text) for _ in range(50_000)}
    with pytest.raises(RuntimeError, match="lower world.n_objective_test_pairs"):
        C.objective_pairs("helpful", 10, seed=0, split="test", exclude=everything, multi_turn_prob=0.0)
