"""The templated dialogue corpus and preference pairs."""

from __future__ import annotations

import random

import pytest

from alignheads.world import corpus as C
from alignheads.world.reward import reward, reward_terms


def test_pretraining_texts_are_deterministic_per_seed() -> None:
    a = C.pretraining_texts(300, seed=3)
    assert a == C.pretraining_texts(300, seed=3)
    assert a != C.pretraining_texts(300, seed=4)


def test_corpus_generation_leaves_global_random_state_alone() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    C.pretraining_texts(50, seed=0)
    C.preference_pairs(20, seed=0, split="train")
    assert random.random() == expected


def test_pretraining_texts_are_hh_dialogues() -> None:
    for text in C.pretraining_texts(300, seed=0):
        assert text.startswith("\n\nHuman: ")
        assert "\n\nAssistant: " in text
        assert not text.endswith(" ")


def test_pretraining_mixes_good_and_bad_in_the_configured_share() -> None:
    # Good styles always score >= 2 and bad styles always < 2, so the share is exact to count.
    n = 2000
    texts = C.pretraining_texts(n, seed=1, good_fraction=0.5)
    good = 0
    for text in texts:
        i = text.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        good += reward(text[:i], text[i:]) >= 2.0
    assert 0.45 < good / n < 0.55  # binomial sd is 0.011


@pytest.mark.parametrize("style", C.GOOD_STYLES + C.BAD_STYLES)
def test_every_style_is_ranked_on_the_right_side(style: str) -> None:
    rng = random.Random(0)
    for _ in range(300):
        q = C.sample_question(rng)
        r = reward(C.format_prompt(q.text), C.make_response(q, style, rng))
        assert (r >= 2.0) == (style in C.GOOD_STYLES), (q, style, r)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_pair_ranks_chosen_above_rejected(split: str) -> None:
    pairs = C.preference_pairs(500, seed=0, split=split)
    assert len(pairs) == 500
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["prompt"].endswith("\n\nAssistant:")
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
        assert p["chosen"] != p["rejected"]
        assert reward(p["prompt"], p["chosen"]) > reward(p["prompt"], p["rejected"])


def test_pairs_are_deterministic_and_splits_differ() -> None:
    train = C.preference_pairs(200, seed=5, split="train")
    assert train == C.preference_pairs(200, seed=5, split="train")
    test = C.preference_pairs(200, seed=5, split="test")
    assert train != test


def test_held_out_questions_never_reach_training_pairs() -> None:
    train = C.preference_pairs(2000, seed=0, split="train")
    test = C.preference_pairs(200, seed=0, split="test")
    held = {
        C.format_prompt(q.text)
        for q in (C.sample_question(random.Random(i)) for i in range(5000))
        if C.is_held_out(q, seed=0, fraction=0.2)
    }
    train_prompts = {p["prompt"] for p in train}
    assert held and not held & train_prompts
    # Without `exclude`, test prompts may repeat training text (about a fifth of the question
    # space is held out) ...
    unseen = sum(p["prompt"] not in train_prompts for p in test)
    assert 0 < unseen < len(test)
    # ... with the training prompts excluded, every test prompt is distinct and unseen.
    fresh = C.preference_pairs(400, seed=0, split="test", exclude=train_prompts)
    prompts = [p["prompt"] for p in fresh]
    assert len(set(prompts)) == 400 and not set(prompts) & train_prompts
    with pytest.raises(RuntimeError, match="unseen test prompts"):
        C.preference_pairs(5000, seed=0, split="test", exclude=train_prompts, multi_turn_prob=0.0)


def test_chosen_responses_use_only_the_worlds_words() -> None:
    # The lexicon behind the fluency term must cover everything the templates say.
    for p in C.preference_pairs(1000, seed=2, split="train"):
        assert reward_terms(p["prompt"], p["chosen"])["fluency"] == 0.0


def test_arithmetic_answer() -> None:
    assert [C.arithmetic_answer(7, op, 3) for op in C.ARITH_OPS] == [10, 4, 21]
    with pytest.raises(ValueError):
        C.arithmetic_answer(1, "over", 2)
