"""The tiny world's ground-truth reward: a deterministic score of a response to an HH prompt.

The reward reads the last ``Human:`` turn of the prompt, recognises the task family, recomputes
the right answer and adds up independent terms (see :func:`reward_terms`):

=============  =====================================================================
correctness    +2 right answer only; +0.5 right and wrong both given; -1 only wrong;
               -0.5 no answer found; 0 when the question is not one the world knows
politeness     +0.5 when a polite phrase is present
rudeness       -1.5 per rude phrase, at most two counted
length         -0.05 per word beyond 16, at most -2
repetition     -3 x the larger of the duplicated-sentence and duplicated-trigram shares
fluency        -2 x the share of words outside the world's lexicon
turn_leak      -1 when the response runs on into a new ``Human:`` turn (scored up to it)
empty          -4 when the response has no words at all (the terms above are then 0)
=============  =====================================================================

An empty response thus scores -4 (-5 when it was cut at a new turn). Every term is bounded,
so any text, garbage included, gets a finite score, between -12 and 2.5.

The dials (one head per objective) are each trained on one slice of the reward.
:data:`OBJECTIVES` names the terms each objective sums, and :func:`objective_scores` gives
every objective's score of one response:

=========  ========================  ==================================================
helpful    correctness               the right answer, not a wrong one
polite     politeness + rudeness     a polite phrase, no rude ones
concise    length                    no words beyond the free 16
=========  ========================  ==================================================

Repetition, fluency, turn_leak and empty belong to no objective: every dial's pairs tie on them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache

from alignheads.world import corpus as C

POLITE_PHRASES: tuple[str, ...] = (
    "sure",
    "of course",
    "happy to help",
    "certainly",
    "good question",
    "hope this helps",
    "glad to help",
    "have a nice day",
    "please",
    "thank you",
)
RUDE_PHRASES: tuple[str, ...] = (
    "ugh",
    "whatever",
    "seriously",
    "obviously",
    "go away",
    "stupid",
    "idiot",
    "dumb",
    "annoying",
    "waste my time",
    "shut up",
)
TERMS: tuple[str, ...] = (
    "correctness",
    "politeness",
    "rudeness",
    "length",
    "repetition",
    "fluency",
    "turn_leak",
    "empty",
)
# Objective -> the reward terms it sums; the other terms are what its pairs hold fixed.
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "helpful": ("correctness",),
    "polite": ("politeness", "rudeness"),
    "concise": ("length",),
}
FREE_WORDS = 16  # a response this long or shorter pays no length penalty
EMPTY_SCORE = -4.0

_WORD = re.compile(r"[a-z]+|\d+")
_WORD_OR_STOP = re.compile(r"[a-z]+|\d+|[.!?;:]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@cache
def lexicon() -> frozenset[str]:
    """Every word the corpus templates and tables can produce (answers and phrasing)."""
    strings: list[str] = [
        *C.CAPITALS,
        *C.CAPITALS.values(),
        *C.OBJECT_COLOURS,
        *C.COLOUR_WORDS,
        *C.ANIMAL_SOUNDS,
        *C.ANIMAL_SOUNDS.values(),
        *C.REPEAT_WORDS,
        *C.REVERSE_WORDS,
        *C.LIST_CATEGORIES,
        *(w for ws in C.LIST_CATEGORIES.values() for w in ws),
        *C.NUMBER_WORDS.values(),
        *C.ARITH_OPS,
        *(t for ts in C.QUESTION_TEMPLATES.values() for t in ts),
        *C.POLITE_OPENERS,
        *C.POLITE_CLOSERS,
        *C.RUDE_OPENERS,
        *C.RUDE_CLOSERS,
        *C.RAMBLE_FILLERS,
        *C.ANSWER_PHRASES,
        *POLITE_PHRASES,
        *RUDE_PHRASES,
        "Human Assistant",  # the turn markers themselves
    ]
    return frozenset(w for s in strings for w in _words(s))


def last_question(prompt: str) -> str:
    """The text of the last ``Human:`` turn (the whole prompt when it has no HH markers)."""
    text = prompt
    i = text.rfind("Human:")
    if i >= 0:
        text = text[i + len("Human:") :]
    j = text.find("Assistant:")
    if j >= 0:
        text = text[:j]
    return text.strip()


def parse_question(question: str) -> tuple[str, tuple[str, ...]] | None:
    """``(family, params)`` of a question the world knows, else ``None``."""
    q = question.lower()
    if m := re.search(r"(\d+) (plus|minus|times) (\d+)", q):
        return "arithmetic", (m[1], m[2], m[3])
    if m := re.search(r"capital of (\w+)", q):
        country = {k.lower(): k for k in C.CAPITALS}.get(m[1])
        return ("capital", (country,)) if country else None
    if m := re.search(r"colou?r (?:is|of) (.+?)[?.]", q):
        return ("colour", (m[1],)) if m[1] in C.OBJECT_COLOURS else None
    if m := re.search(r"(?:sound does|what does) (.+?) (?:make|say)", q):
        return ("sound", (m[1],)) if m[1] in C.ANIMAL_SOUNDS else None
    if m := re.search(r"(?:the word|say) (\w+) (two|three|four) times", q):
        return "repeat", (m[1], m[2])
    if m := re.search(r"(\w+) backwards", q):
        return "reverse", (m[1],)
    if m := re.search(r"(two|three|four) (fruits|animals|colours)", q):
        return "list", (m[1], m[2])
    return None


def _runs(text: str, word: str) -> list[int]:
    """Lengths of the maximal runs of ``word`` (sentence ends break a run, commas do not)."""
    runs, cur = [], 0
    for tok in _WORD_OR_STOP.findall(text.lower()):
        if tok == word:
            cur += 1
        else:
            if cur:
                runs.append(cur)
            cur = 0
    if cur:
        runs.append(cur)
    return runs


def judge(family: str, params: tuple[str, ...], response: str) -> tuple[bool, bool]:
    """``(gives_right_answer, gives_wrong_answer)`` for a response to a known question."""
    words = _words(response)
    wset = set(words)
    if family == "arithmetic":
        a, op, b = params
        # The restated question "3 plus 4" is not a claim; every other number is.
        claims_text = re.sub(rf"\b{a}\s+{op}\s+{b}\b", " ", response.lower())
        claims = {int(n) for n in re.findall(r"\d+", claims_text)}
        ans = C.arithmetic_answer(int(a), op, int(b))
        return ans in claims, bool(claims - {ans})
    if family == "capital":
        right = C.CAPITALS[params[0]].lower()
        others = {c.lower() for c in C.CAPITALS.values()} - {right}
        return right in wset, bool(wset & others)
    if family == "colour":
        right = C.OBJECT_COLOURS[params[0]]
        return right in wset, bool(wset & (set(C.COLOUR_WORDS) - {right}))
    if family == "sound":
        right = C.ANIMAL_SOUNDS[params[0]]
        return right in wset, bool(wset & (set(C.ANIMAL_SOUNDS.values()) - {right}))
    if family == "repeat":
        word, n = params[0], C.NUMBER_VALUES[params[1]]
        runs = _runs(response, word)
        return n in runs, any(r >= 2 and r != n for r in runs)
    if family == "reverse":
        word = params[0]
        rev = word[::-1]
        scrambles = {w for w in wset if sorted(w) == sorted(word)} - {word, rev}
        return rev in wset, bool(scrambles)
    if family == "list":
        n, cat = C.NUMBER_VALUES[params[0]], params[1]
        pool = set(C.LIST_CATEGORIES[cat])
        other = {w for c, ws in C.LIST_CATEGORIES.items() if c != cat for w in ws} - pool
        found = wset & pool
        return len(found) == n, (bool(found) and len(found) != n) or bool(wset & other)
    raise ValueError(f"unknown family {family!r}")


def _phrase_count(words: list[str], phrases: Sequence[str]) -> int:
    padded = " " + " ".join(words) + " "
    return sum(padded.count(f" {p} ") for p in phrases)


def _duplicate_share(items: list) -> float:
    return 1.0 - len(set(items)) / len(items) if items else 0.0


def reward_terms(prompt: str, response: str) -> dict[str, float]:
    """The reward's named terms for one (prompt, response); :func:`reward` is their sum."""
    terms = dict.fromkeys(TERMS, 0.0)
    # A model that does not stop invents the next turn: score only its answer, and penalise.
    cut = response.find("Human:")
    if cut >= 0:
        response = response[:cut]
        terms["turn_leak"] = -1.0
    words = _words(response)
    if not words:
        terms["empty"] = EMPTY_SCORE
        return terms

    parsed = parse_question(last_question(prompt))
    if parsed is not None:
        right, wrong = judge(*parsed, response)
        terms["correctness"] = {(True, False): 2.0, (True, True): 0.5, (False, True): -1.0}.get(
            (right, wrong), -0.5
        )
    terms["politeness"] = 0.5 if _phrase_count(words, POLITE_PHRASES) else 0.0
    terms["rudeness"] = -1.5 * min(_phrase_count(words, RUDE_PHRASES), 2)
    terms["length"] = -min(0.05 * max(0, len(words) - FREE_WORDS), 2.0)

    # Repetition: whole sentences said again, and loops inside sentences (word trigrams).
    # For "repeat the word w n times" the runs of w are the task, not repetition.
    sentences = [s.strip() for s in re.split(r"[.!?]+", response.lower()) if _words(s)]
    sentences = [" ".join(_words(s)) for s in sentences]
    loop_words = [w for w in words if not (parsed and parsed[0] == "repeat" and w == parsed[1][0])]
    trigrams = list(zip(loop_words, loop_words[1:], loop_words[2:], strict=False))
    terms["repetition"] = -3.0 * max(_duplicate_share(sentences), _duplicate_share(trigrams))

    # Fluency: words the world never uses; scrambles of a reverse-task word are answers, not noise.
    known = lexicon()
    target = sorted(parsed[1][0]) if parsed and parsed[0] == "reverse" else None
    unknown = sum(1 for w in words if w not in known and not w.isdigit() and sorted(w) != target)
    terms["fluency"] = -2.0 * unknown / len(words)
    return terms


def objective_sums(terms: Mapping[str, float]) -> dict[str, float]:
    """Each objective's score: the sum of its :data:`OBJECTIVES` terms in ``terms``."""
    return {name: float(sum(terms[t] for t in names)) for name, names in OBJECTIVES.items()}


def objective_scores(prompt: str, response: str) -> dict[str, float]:
    """Every objective's score of ``response`` to ``prompt`` (one :func:`reward_terms` call)."""
    return objective_sums(reward_terms(prompt, response))


def reward(prompt: str, response: str) -> float:
    """Ground-truth reward of ``response`` to ``prompt``; deterministic, finite, higher is better."""
    return float(sum(reward_terms(prompt, response).values()))


def rewards(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """:func:`reward` over parallel sequences of prompts and responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [reward(p, r) for p, r in zip(prompts, responses, strict=True)]
