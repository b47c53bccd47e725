"""The ground-truth reward: hand-checked scores, determinism, boundedness."""

from __future__ import annotations

import math
import random

import pytest

from alignheads.world.corpus import format_prompt
from alignheads.world.reward import (
    EMPTY_SCORE,
    TERMS,
    last_question,
    parse_question,
    reward,
    reward_terms,
    rewards,
)

ADD = format_prompt("What is 3 plus 4?")


@pytest.mark.parametrize(
    ("question", "response", "expected"),
    [
        # correct (+2), nothing else
        ("What is 3 plus 4?", " 3 plus 4 is 7.", 2.0),
        # wrong number (-1); the restated operands are not claims
        ("What is 3 plus 4?", " 3 plus 4 is 8.", -1.0),
        # wrong answer equal to an operand is still wrong
        ("What is 3 plus 4?", " 3 plus 4 is 3.", -1.0),
        # polite and correct: +2 +0.5
        ("What is 3 plus 4?", " Sure! 3 plus 4 is 7.", 2.5),
        # rude and correct: +2 - 2 x 1.5
        ("What is 3 plus 4?", " Ugh. 3 plus 4 is 7. Stop asking stupid questions.", -1.0),
        # one rude word: +2 - 1.5
        ("What is 3 plus 4?", " Whatever. It is 7.", 0.5),
        # right and wrong both given: +0.5
        ("How much is 6 times 5?", " It is 30. It is 31.", 0.5),
        ("What is the capital of France?", " The capital of France is Paris.", 2.0),
        ("Tell me the capital of France.", " It is Rome.", -1.0),
        ("What colour is the sky?", " The sky is blue.", 2.0),
        ("What does a cow say?", " It says woof.", -1.0),
        ("Repeat the word apple three times.", " apple apple apple.", 2.0),
        ("Say apple three times.", " apple apple.", -1.0),
        ("Spell the word cat backwards.", " It is tac.", 2.0),
        ("Write cat backwards.", " It is act.", -1.0),
        ("Name two fruits.", " Apple and pear.", 2.0),
        ("List two fruits.", " Apple and dog.", -1.0),
        # no answer at all (-0.5), polite (+0.5)
        ("What is 3 plus 4?", " Happy to help!", 0.0),
        # a question the world does not know: no correctness term
        ("Tell me a joke.", " Sure!", 0.5),
    ],
)
def test_hand_checked_scores(question: str, response: str, expected: float) -> None:
    assert reward(format_prompt(question), response) == pytest.approx(expected, abs=1e-12)


def test_repetition_penalty_is_the_duplicated_sentence_share() -> None:
    # 4 identical sentences: 3/4 duplicated -> -3 * 0.75; trigrams 7/10 duplicated (smaller).
    response = " It is 7. It is 7. It is 7. It is 7."
    terms = reward_terms(ADD, response)
    assert terms["repetition"] == pytest.approx(-2.25)
    assert reward(ADD, response) == pytest.approx(2.0 - 2.25)


def test_repeat_task_runs_are_not_repetition() -> None:
    prompt = format_prompt("Repeat the word moon four times.")
    assert reward_terms(prompt, " moon moon moon moon.")["repetition"] == 0.0


def test_length_penalty_per_word_beyond_sixteen() -> None:
    # 5 + 6 + 6 + 1 = 18 words: -0.05 * (18 - 16)
    response = " 3 plus 4 is 7. Well, let me think about this. I think I know this one. Hmm."
    assert reward_terms(ADD, response)["length"] == pytest.approx(-0.1)
    assert reward_terms(ADD, response + " Hmm hmm.")["length"] == pytest.approx(-0.2)
    assert reward_terms(ADD, " 7." * 100)["length"] == -2.0  # capped


def test_turn_leak_is_scored_up_to_the_new_turn_and_penalised() -> None:
    assert reward(ADD, " 3 plus 4 is 7.\n\nHuman: What is 1 plus 1?\n\nAssistant: 2") == pytest.approx(1.0)


def test_empty_and_garbage_are_low_but_finite() -> None:
    assert reward(ADD, "") == EMPTY_SCORE
    assert reward(ADD, " ?!  ") == EMPTY_SCORE
    # unknown words only: no answer (-0.5) and fluency -2
    assert reward(ADD, " xq zzv blorp") == pytest.approx(-2.5)
    junk = " ".join(["zz"] * 500) + "\x00\u2603"
    r = reward(ADD, junk)
    assert math.isfinite(r) and r < -5


def test_terms_sum_to_reward_and_scores_are_deterministic() -> None:
    response = " Sure! 3 plus 4 is 7. Hope this helps!"
    assert sum(reward_terms(ADD, response).values()) == reward(ADD, response)
    assert [reward(ADD, response) for _ in range(3)] == [2.5] * 3


def test_multi_turn_prompt_uses_the_last_question() -> None:
    prompt = format_prompt("What is 3 plus 4?", history=(("What is the capital of Peru?", "It is Lima."),))
    assert last_question(prompt) == "What is 3 plus 4?"
    assert parse_question(last_question(prompt)) == ("arithmetic", ("3", "plus", "4"))
    assert reward(prompt, " It is 7.") == 2.0


def test_rewards_is_elementwise_and_checks_lengths() -> None:
    assert rewards([ADD, ADD], [" It is 7.", " It is 8."]) == [2.0, -1.0]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rewards([ADD, ADD], [" It is 7."])


def test_terms_are_always_the_same_keys_and_stay_in_bounds() -> None:
    assert reward(ADD, "\n\nHuman: hi") == EMPTY_SCORE - 1.0  # empty answer that runs on
    rng = random.Random(0)
    alphabet = "abcdefghij klmnop 0123456789 .!?,\n:Human"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        terms = reward_terms(ADD, text)
        assert tuple(terms) == TERMS
        assert -12.0 <= sum(terms.values()) <= 2.5
