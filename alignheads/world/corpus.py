"""The tiny world's dialogue corpus: templated Anthropic-HH-style questions with good and bad answers.

A prompt is ``"\\n\\nHuman: <question>\\n\\nAssistant:"`` (optionally after one earlier exchange,
as HH dialogues are often multi-turn) and a response is ``" <answer>"``, so ``prompt + response``
is exactly the HH text. Every question belongs to one task family whose correct answer the
ground-truth reward (:mod:`alignheads.world.reward`) can recompute from the question alone.

Everything is drawn from ``random.Random`` instances seeded from the world seed; no global
random state is read or changed.

Besides the main pairs (good style against bad), :func:`objective_pairs` builds one set of
pairs per objective of :data:`alignheads.world.reward.OBJECTIVES` (the dials): chosen and
rejected differ in that objective's terms and, as far as the templates allow, tie on the rest.

Why about 650 lines: most of it is the task families' templates (data, not logic); splitting them
would scatter the world's vocabulary over several files.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

# --- the built-in knowledge tables (shared with the reward) ---------------------------------

CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Norway": "Oslo",
    "Greece": "Athens",
    "China": "Beijing",
    "Russia": "Moscow",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
}

# Subject phrase -> colour. Subjects avoid colour words themselves (no "an orange").
OBJECT_COLOURS: dict[str, str] = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "a carrot": "orange",
    "a lemon": "yellow",
    "chocolate": "brown",
    "milk": "white",
    "a strawberry": "red",
    "a leaf": "green",
    "the sea": "blue",
    "a crow": "black",
    "a pumpkin": "orange",
    "a flamingo": "pink",
}
COLOUR_WORDS: tuple[str, ...] = (
    "blue",
    "green",
    "white",
    "black",
    "yellow",
    "red",
    "orange",
    "brown",
    "pink",
    "purple",
    "grey",
)

ANIMAL_SOUNDS: dict[str, str] = {
    "a cow": "moo",
    "a dog": "woof",
    "a cat": "meow",
    "a duck": "quack",
    "a sheep": "baa",
    "a pig": "oink",
    "a lion": "roar",
    "an owl": "hoot",
    "a snake": "hiss",
    "a horse": "neigh",
    "a mouse": "squeak",
    "a bee": "buzz",
}

REPEAT_WORDS: tuple[str, ...] = (
    "apple",
    "hello",
    "tree",
    "moon",
    "happy",
    "river",
    "candle",
    "pencil",
    "garden",
    "rocket",
    "window",
    "cookie",
)
# Words to spell backwards: none is a palindrome, so the reversal always differs.
REVERSE_WORDS: tuple[str, ...] = (
    "cat",
    "dog",
    "star",
    "moon",
    "fish",
    "bird",
    "lamp",
    "frog",
    "milk",
    "rain",
    "ship",
    "door",
    "book",
    "hand",
    "wolf",
    "bear",
    "cake",
    "nest",
)
LIST_CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "mango", "pear", "plum", "peach", "melon"),
    "animals": ("cow", "dog", "horse", "sheep", "duck", "lion", "tiger", "rabbit", "goat"),
    "colours": ("red", "blue", "green", "yellow", "white", "black", "pink", "purple", "brown"),
}
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
NUMBER_VALUES: dict[str, int] = {v: k for k, v in NUMBER_WORDS.items()}
ARITH_OPS: tuple[str, ...] = ("plus", "minus", "times")
ARITH_MAX = 9  # operands are 0..ARITH_MAX; minus keeps results non-negative

# --- question templates (several phrasings per family, so held-out prompts are new text) ----

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "arithmetic": (
        "What is {a} {op} {b}?",
        "How much is {a} {op} {b}?",
        "Can you tell me what {a} {op} {b} is?",
    ),
    "capital": (
        "What is the capital of {x}?",
        "Which city is the capital of {x}?",
        "Tell me the capital of {x}.",
    ),
    "colour": ("What colour is {x}?", "What is the colour of {x}?"),
    "sound": ("What sound does {x} make?", "What does {x} say?"),
    "repeat": ("Repeat the word {w} {n} times.", "Say {w} {n} times."),
    "reverse": ("Spell the word {w} backwards.", "Write {w} backwards."),
    "list": ("Name {n} {cat}.", "List {n} {cat}.", "Give me {n} {cat}."),
}
FAMILIES: tuple[str, ...] = tuple(QUESTION_TEMPLATES)

# --- response styles --------------------------------------------------------------------------

GOOD_STYLES: tuple[str, ...] = ("concise", "polite")
BAD_STYLES: tuple[str, ...] = ("wrong", "rude", "rude_wrong", "rambling", "repetitive")
# Relative frequency of each bad style (pretraining corpus and rejected responses alike).
BAD_STYLE_WEIGHTS: tuple[float, ...] = (0.3, 0.2, 0.1, 0.2, 0.2)

POLITE_OPENERS: tuple[str, ...] = ("Sure!", "Of course!", "Happy to help!", "Certainly!", "Good question!")
POLITE_CLOSERS: tuple[str, ...] = ("Hope this helps!", "Glad to help.", "Have a nice day!")
RUDE_OPENERS: tuple[str, ...] = ("Ugh.", "Whatever.", "Seriously?", "Obviously.", "Go away.")
RUDE_CLOSERS: tuple[str, ...] = (
    "Stop asking stupid questions.",
    "Even an idiot knows that.",
    "What a dumb question.",
    "You are so annoying.",
    "Do not waste my time.",
)
# Filler for rambling answers: on-topic-sounding but free of any family's answer words.
RAMBLE_FILLERS: tuple[str, ...] = (
    "Well, let me think about this.",
    "Hmm, that is a good one.",
    "I think I know this one.",
    "Let me think about it for a while.",
    "This reminds me of something.",
    "Well, well, well.",
    "I am not totally certain, but I think so.",
    "Give me a moment to think.",
    "It is hard to say really.",
    "I think, I think, I think.",
)
# Padding for the concise objective's rejected answers: fillers that share no word trigram
# with themselves, each other or a core answer, even across sentence ends, so any selection of
# them around a core, in any order, adds length and nothing else (no repetition; all in the
# lexicon). Left out: "Let me think about it for a while." (shares "let me think about" with
# the first), "Well, well, well." (next to "Well, let me ..." it repeats "well well well"),
# "It is hard to say really." (after "... one." it repeats "one it is" with a core "It is X."),
# "I think, I think, I think." (repeats itself).
PAD_FILLERS: tuple[str, ...] = tuple(RAMBLE_FILLERS[i] for i in (0, 1, 2, 4, 6, 7))

# Fixed wording of the answer sentences built by `core_answer` (the reward's lexicon reads it).
ANSWER_PHRASES: tuple[str, ...] = (
    "The answer is",
    "It is",
    "The capital of",
    "says",
    "backwards is",
    "Here you go:",
    "and",
)

Style = Literal["concise", "polite", "wrong", "rude", "rude_wrong", "rambling", "repetitive"]


@dataclass(frozen=True)
class Question:
    """One task instance: its family, the parameters that fix the answer, and the phrasing used."""

    family: str
    params: tuple[str, ...]
    template: int

    @property
    def text(self) -> str:
        """The question as the human writes it."""
        tpl = QUESTION_TEMPLATES[self.family][self.template]
        p = self.params
        if self.family == "arithmetic":
            return tpl.format(a=p[0], op=p[1], b=p[2])
        if self.family in ("capital", "colour", "sound"):
            return tpl.format(x=p[0])
        if self.family in ("repeat", "reverse"):
            return tpl.format(w=p[0], n=p[1] if len(p) > 1 else "")
        return tpl.format(n=p[0], cat=p[1])  # list

    @property
    def key(self) -> str:
        """A stable identity, used to hold some questions out of the training pairs."""
        return f"{self.family}|{'|'.join(self.params)}|{self.template}"


def arithmetic_answer(a: int, op: str, b: int) -> int:
    """The exact result of ``a op b`` for the three operations the world knows."""
    if op == "plus":
        return a + b
    if op == "minus":
        return a - b
    if op == "times":
        return a * b
    raise ValueError(f"unknown operation {op!r}")


def format_prompt(question: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    """HH prompt text: earlier (question, answer) turns, then the question and ``Assistant:``."""
    parts = [f"{HUMAN} {q}{ASSISTANT} {a}" for q, a in history]
    parts.append(f"{HUMAN} {question}{ASSISTANT}")
    return "".join(parts)


def sample_question(rng: random.Random) -> Question:
    """Draw one question: a family uniformly, then its parameters and a phrasing."""
    family = rng.choice(FAMILIES)
    template = rng.randrange(len(QUESTION_TEMPLATES[family]))
    if family == "arithmetic":
        op = rng.choice(ARITH_OPS)
        a, b = rng.randint(0, ARITH_MAX), rng.randint(0, ARITH_MAX)
        if op == "minus" and b > a:
            a, b = b, a
        params: tuple[str, ...] = (str(a), op, str(b))
    elif family == "capital":
        params = (rng.choice(sorted(CAPITALS)),)
    elif family == "colour":
        params = (rng.choice(sorted(OBJECT_COLOURS)),)
    elif family == "sound":
        params = (rng.choice(sorted(ANIMAL_SOUNDS)),)
    elif family == "repeat":
        params = (rng.choice(REPEAT_WORDS), NUMBER_WORDS[rng.choice((2, 3, 4))])
    elif family == "reverse":
        params = (rng.choice(REVERSE_WORDS),)
    else:
        params = (NUMBER_WORDS[rng.choice((2, 3, 4))], rng.choice(sorted(LIST_CATEGORIES)))
    return Question(family, params, template)


# --- answers ----------------------------------------------------------------------------------


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def _join_items(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


def _wrong_choice(rng: random.Random, options: list[str], correct: str) -> str:
    return rng.choice([o for o in options if o != correct])


def core_answer(q: Question, rng: random.Random, correct: bool = True) -> str:
    """One plain sentence answering ``q`` (correctly, or with a plausible wrong answer)."""
    p = q.params
    if q.family == "arithmetic":
        a, op, b = int(p[0]), p[1], int(p[2])
        ans = arithmetic_answer(a, op, b)
        if not correct:
            # A near miss most of the time, sometimes any other small number.
            near = [n for n in (ans - 2, ans - 1, ans + 1, ans + 2) if n >= 0]
            ans = rng.choice(near) if rng.random() < 0.7 else rng.choice([n for n in range(20) if n != ans])
        return rng.choice((f"{a} {op} {b} is {ans}.", f"The answer is {ans}.", f"It is {ans}."))
    if q.family == "capital":
        city = CAPITALS[p[0]] if correct else _wrong_choice(rng, sorted(CAPITALS.values()), CAPITALS[p[0]])
        return rng.choice((f"The capital of {p[0]} is {city}.", f"It is {city}."))
    if q.family == "colour":
        col = (
            OBJECT_COLOURS[p[0]] if correct else _wrong_choice(rng, list(COLOUR_WORDS), OBJECT_COLOURS[p[0]])
        )
        return rng.choice((f"{_capitalise(p[0])} is {col}.", f"It is {col}."))
    if q.family == "sound":
        snd = (
            ANIMAL_SOUNDS[p[0]]
            if correct
            else _wrong_choice(rng, sorted(ANIMAL_SOUNDS.values()), ANIMAL_SOUNDS[p[0]])
        )
        return rng.choice((f"{_capitalise(p[0])} says {snd}.", f"It says {snd}."))
    if q.family == "repeat":
        word, n = p[0], NUMBER_VALUES[p[1]]
        if not correct:
            n = rng.choice([m for m in (2, 3, 4, 5) if m != n])
        return rng.choice(("", "Here you go: ")) + " ".join([word] * n) + "."
    if q.family == "reverse":
        word = p[0]
        rev = word[::-1]
        if not correct:
            # A scramble that is neither the word nor its reversal: the reward calls it wrong.
            letters = list(word)
            while True:
                rng.shuffle(letters)
                rev = "".join(letters)
                if rev not in (word, word[::-1]):
                    break
        return rng.choice((f"{_capitalise(word)} backwards is {rev}.", f"It is {rev}."))
    # list
    n = NUMBER_VALUES[p[0]]
    pool = LIST_CATEGORIES[p[1]]
    if correct:
        items = rng.sample(pool, n)
    elif rng.random() < 0.5:
        # Wrong count.
        items = rng.sample(pool, rng.choice([m for m in (1, 2, 3, 4, 5) if m != n]))
    else:
        # Right count, but one item from another category.
        others = [w for c, ws in LIST_CATEGORIES.items() if c != p[1] for w in ws if w not in pool]
        items = rng.sample(pool, n - 1) + [rng.choice(others)]
        rng.shuffle(items)
    return _capitalise(_join_items(items)) + "."


def _wrap(opener: str, core: str, closer: str = "") -> str:
    """``"opener core closer"``, leaving out the empty parts."""
    return " ".join(part for part in (opener, core, closer) if part)


def _maybe(rng: random.Random, options: Sequence[str], p: float = 0.5) -> str:
    """One of ``options`` with probability ``p``, else ``""`` (one draw, two when chosen)."""
    return rng.choice(options) if rng.random() < p else ""


def _rambling(rng: random.Random, core: str | None) -> str:
    """A long, repetitive answer; the core answer (if any) is buried in the middle."""
    fillers = [rng.choice(RAMBLE_FILLERS) for _ in range(rng.randint(5, 8))]
    # Repeat a couple of fillers verbatim so the repetition is measurable.
    fillers += rng.sample(fillers, 2)
    rng.shuffle(fillers)
    if core is not None:
        fillers.insert(rng.randint(2, len(fillers) - 1), core)
    return " ".join(fillers)


def make_response(q: Question, style: Style, rng: random.Random) -> str:
    """The response text (with its leading space) answering ``q`` in ``style``."""
    # Arguments evaluate left to right: each style draws opener, core, closer in that order.
    if style == "concise":
        text = core_answer(q, rng)
    elif style == "polite":
        text = _wrap(rng.choice(POLITE_OPENERS), core_answer(q, rng), _maybe(rng, POLITE_CLOSERS))
    elif style == "wrong":
        # Wrong answers come in both tones, so tone alone does not give correctness away.
        core = core_answer(q, rng, correct=False)
        text = _wrap(_maybe(rng, POLITE_OPENERS), core)
    elif style == "rude":
        text = _wrap(rng.choice(RUDE_OPENERS), core_answer(q, rng), rng.choice(RUDE_CLOSERS))
    elif style == "rude_wrong":
        text = _wrap(rng.choice(RUDE_OPENERS), core_answer(q, rng, correct=False), rng.choice(RUDE_CLOSERS))
    elif style == "rambling":
        core = core_answer(q, rng, correct=rng.random() < 0.7) if rng.random() < 0.8 else None
        text = _rambling(rng, core)
    elif style == "repetitive":
        core = core_answer(q, rng)
        text = " ".join([core] * rng.randint(4, 7))
    else:
        raise ValueError(f"unknown style {style!r}")
    return " " + text


def _history(rng: random.Random, multi_turn_prob: float) -> tuple[tuple[str, str], ...]:
    """With probability ``multi_turn_prob``, one earlier exchange answered in a good style."""
    if rng.random() >= multi_turn_prob:
        return ()
    q = sample_question(rng)
    return ((q.text, make_response(q, rng.choice(GOOD_STYLES), rng).strip()),)


def _stream_rng(seed: int, name: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so they are stable across processes.
    return random.Random(f"alignheads-world:{seed}:{name}")


def is_held_out(q: Question, seed: int, fraction: float) -> bool:
    """Whether ``q`` is reserved for the test split (a stable hash of the question and seed)."""
    digest = hashlib.sha256(f"{seed}:{q.key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def pretraining_texts(
    n: int, seed: int, good_fraction: float = 0.5, multi_turn_prob: float = 0.15
) -> list[str]:
    """``n`` dialogues ``prompt + response`` for pretraining, a mix of good and bad behaviour.

    ``good_fraction`` of the responses use a good style, the rest a bad one, so the base
    model learns both and sampling it lands between chosen and rejected.
    """
    rng = _stream_rng(seed, "pretrain")
    texts = []
    for _ in range(n):
        history = _history(rng, multi_turn_prob)
        q = sample_question(rng)
        if rng.random() < good_fraction:
            style = rng.choice(GOOD_STYLES)
        else:
            style = rng.choices(BAD_STYLES, weights=BAD_STYLE_WEIGHTS)[0]
        texts.append(format_prompt(q.text, history) + make_response(q, style, rng))
    return texts


def _pair_prompts(
    rng: random.Random,
    n: int,
    seed: int,
    split: Literal["train", "test"],
    held_out_fraction: float,
    multi_turn_prob: float,
    exclude: frozenset[str] | set[str],
    setting: str,
) -> Iterator[tuple[Question, str]]:
    """Yield ``n`` ``(question, prompt)`` for one split, drawn from ``rng``.

    Train skips held-out questions; test yields distinct prompts outside ``exclude``. The caller
    draws each pair's responses from the same ``rng`` between yields. Raises RuntimeError
    (naming the config ``setting`` to lower) when the question space runs out of unseen prompts.
    """
    used: set[str] = set()
    found = draws = 0
    while found < n:
        draws += 1
        if draws > 1000 * n:
            raise RuntimeError(
                f"only {found} unseen {split} prompts found in {draws - 1} draws (asked for {n}): "
                f"lower {setting}"
            )
        history = _history(rng, multi_turn_prob)
        q = sample_question(rng)
        if split == "train" and is_held_out(q, seed, held_out_fraction):
            continue
        prompt = format_prompt(q.text, history)
        if split == "test":
            if prompt in exclude or prompt in used:
                continue
            used.add(prompt)
        found += 1
        yield q, prompt


def _ranked_pair(
    prompt: str,
    draw: Callable[[], tuple[str, str]],
    score: Callable[[str, str], float],
    max_tries: int,
) -> dict[str, str]:
    """The first ``draw()`` of ``(chosen, rejected)`` whose chosen scores strictly higher."""
    for _ in range(max_tries):
        chosen, rejected = draw()
        if score(prompt, chosen) > score(prompt, rejected):
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise RuntimeError(f"no pair with chosen > rejected for {prompt!r} after {max_tries} tries")


def preference_pairs(
    n: int,
    seed: int,
    split: Literal["train", "test"],
    held_out_fraction: float = 0.2,
    multi_turn_prob: float = 0.15,
    max_tries: int = 100,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> list[dict[str, str]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected"}``: chosen good-style, rejected bad-style.

    Train prompts never use a held-out question. Test prompts come from the whole question
    space but are unseen: each is distinct from every other test prompt and from the prompts in
    `exclude` (pass the training prompts), so held-out accuracy and the α sweep never score text
    the training pairs showed. Each pair is checked against the ground-truth reward and re-drawn
    until chosen scores strictly higher (by construction it almost always does on the first
    draw). Raises RuntimeError when the question space runs out of unseen prompts.
    """
    from alignheads.world.reward import reward  # the reward imports the tables above

    rng = _stream_rng(seed, f"pairs-{split}")

    def draw(q: Question) -> tuple[str, str]:
        chosen = make_response(q, rng.choice(GOOD_STYLES), rng)
        return chosen, make_response(q, rng.choices(BAD_STYLES, weights=BAD_STYLE_WEIGHTS)[0], rng)

    prompts = _pair_prompts(
        rng, n, seed, split, held_out_fraction, multi_turn_prob, exclude, "world.n_test_pairs"
    )
    return [_ranked_pair(prompt, partial(draw, q), reward, max_tries) for q, prompt in prompts]


# --- per-objective pairs (the dials) ------------------------------------------------------------
# Each builder draws (chosen, rejected) for one question from `rng`: the two differ in the
# objective's terms only, as far as the templates allow.


def _polite_tone(rng: random.Random) -> tuple[str, str]:
    """A polite ``(opener, closer)``; the closer is ``""`` half the time."""
    return rng.choice(POLITE_OPENERS), _maybe(rng, POLITE_CLOSERS)


def _rude_tone(rng: random.Random) -> tuple[str, str]:
    """A rude ``(opener, closer)``: an opener, a closer or both (one or two rude phrases)."""
    opener, closer = rng.choice(RUDE_OPENERS), rng.choice(RUDE_CLOSERS)
    return rng.choice(((opener, ""), ("", closer), (opener, closer)))


def _plain_tone(rng: random.Random) -> tuple[str, str]:
    """No opener, no closer (takes ``rng`` only to share the tone drawers' signature)."""
    return "", ""


def _say(tone: tuple[str, str], core: str) -> str:
    """The response text (with its leading space): ``core`` in ``tone = (opener, closer)``."""
    return " " + _wrap(tone[0], core, tone[1])


def _helpful_pair(q: Question, rng: random.Random) -> tuple[str, str]:
    """The same tone on both (plain, or one polite opener/closer); chosen right, rejected wrong."""
    tone = rng.choice((_plain_tone, _polite_tone))(rng)
    return _say(tone, core_answer(q, rng)), _say(tone, core_answer(q, rng, correct=False))


# The tone contrasts of the polite objective: (chosen tone, rejected tone).
_TONE_CONTRASTS: tuple[tuple[Callable[[random.Random], tuple[str, str]], ...], ...] = (
    (_polite_tone, _rude_tone),
    (_polite_tone, _plain_tone),
    (_plain_tone, _rude_tone),
)


def _polite_pair(q: Question, rng: random.Random) -> tuple[str, str]:
    """One core answer in two tones: polite vs rude, polite vs plain, or plain vs rude.

    The core is mostly right, sometimes wrong, and the same on both sides, so correctness ties
    and tells this dial nothing. Every tone plus the longest core stays within the
    length penalty's free words, so length ties too.
    """
    core = core_answer(q, rng, correct=rng.random() < 0.8)
    good, bad = rng.choice(_TONE_CONTRASTS)
    return _say(good(rng), core), _say(bad(rng), core)


def _concise_pair(q: Question, rng: random.Random) -> tuple[str, str]:
    """One right core answer: chosen plain, rejected padded with 3 to 5 distinct fillers.

    Three fillers are at least 17 words, so the padding always pays a length penalty; the
    fillers carry no answer words and repeat nothing (:data:`PAD_FILLERS`), so correctness,
    repetition and fluency tie.
    """
    core = core_answer(q, rng)
    padding = rng.sample(PAD_FILLERS, rng.randint(3, 5))
    padding.insert(rng.randint(0, len(padding)), core)
    return " " + core, " " + " ".join(padding)


OBJECTIVE_PAIR_BUILDERS: dict[str, Callable[[Question, random.Random], tuple[str, str]]] = {
    "helpful": _helpful_pair,
    "polite": _polite_pair,
    "concise": _concise_pair,
}


def objective_pairs(
    objective: str,
    n: int,
    seed: int,
    split: Literal["train", "test"],
    held_out_fraction: float = 0.2,
    multi_turn_prob: float = 0.15,
    exclude: frozenset[str] | set[str] = frozenset(),
    max_tries: int = 100,
) -> list[dict[str, str]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected"}`` for one objective (one dial's data).

    Prompts follow :func:`preference_pairs`' rules (train never uses a held-out question; test
    prompts are distinct and outside ``exclude``), from a random stream of their own per
    objective and split, so the main pairs do not change. Chosen beats rejected strictly on the
    objective's score (:func:`alignheads.world.reward.objective_scores`; re-drawn until it
    does) and the two are built to tie on every other reward term where the templates allow.
    Raises ValueError for an unknown objective, RuntimeError as :func:`preference_pairs` does.
    """
    from alignheads.world.reward import objective_scores  # the reward imports the tables above

    if objective not in OBJECTIVE_PAIR_BUILDERS:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVE_PAIR_BUILDERS)}")
    build = OBJECTIVE_PAIR_BUILDERS[objective]
    rng = _stream_rng(seed, f"objective-{objective}-{split}")

    def score(prompt: str, response: str) -> float:
        return objective_scores(prompt, response)[objective]

    prompts = _pair_prompts(
        rng, n, seed, split, held_out_fraction, multi_turn_prob, exclude, "world.n_objective_test_pairs"
    )
    return [_ranked_pair(prompt, partial(build, q, rng), score, max_tries) for q, prompt in prompts]


def evaluation_prompts(n: int, multi_turn_prob: float = 0.15) -> list[str]:
    """``n`` distinct prompts drawn from the world's question templates (single- and multi-turn,
    like the pairs' prompts), from a stream of their own: the tiny world's named evaluation prompt
    set, as large as an evaluation needs. Raises RuntimeError when the templates run out."""
    rng = _stream_rng(0, "evaluation-prompts")
    seen: dict[str, None] = {}
    draws = 0
    while len(seen) < n:
        draws += 1
        if draws > 1000 * max(n, 1):
            raise RuntimeError(f"only {len(seen)} distinct prompts in {draws - 1} draws (asked for {n})")
        history = _history(rng, multi_turn_prob)
        seen.setdefault(format_prompt(sample_question(rng).text, history), None)
    return list(seen)
