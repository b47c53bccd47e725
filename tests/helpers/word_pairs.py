"""Preference pairs a tiny model can learn: chosen responses use one block of words, rejected another."""

from __future__ import annotations

import random


def word_pairs(n: int, seed: int) -> list[dict]:
    """`n` rows {prompt, chosen, rejected}: prompts of words w30–w59, chosen responses of w0–w14,
    rejected responses of w60–w74 (tokens of `tests.helpers.tiny_models.tiny_tokenizer`)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randint(30, 59)}" for _ in range(rng.randint(2, 5)))
        chosen = " " + " ".join(f"w{rng.randint(0, 14)}" for _ in range(rng.randint(2, 6)))
        rejected = " " + " ".join(f"w{rng.randint(60, 74)}" for _ in range(rng.randint(2, 6)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
