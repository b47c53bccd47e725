"""Preference pairs a tiny model can learn (chosen responses use one block of words, rejected another),
and a store the real stages fill from them."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from alignheads.config import RefPassConfig


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


@dataclass(frozen=True)
class PairStore:
    """A store the real stages filled from `word_pairs`: where the model, data, tokenized pairs
    and reference cache are."""

    store: Path
    model_dir: Path
    data: Path
    tokenize: Path
    refpass: Path


def pair_store(root: Path, model, refpass: RefPassConfig, *, n_train: int = 64, reference=None) -> PairStore:
    """Save `model` (and `reference`, when given, as the refpass's reference model) with the tiny
    tokenizer under `root`, write `n_train` + 16 word pairs as JSONL, and run the data, tokenize
    (prompts ≤ 16, responses ≤ 8 tokens) and reference-pass stages on them."""
    from alignheads.config import DataConfig, ModelConfig, SourceConfig, TokenizeConfig
    from alignheads.loading import load_tokenizer
    from alignheads.storage.fingerprint import tokenizer_fingerprint
    from alignheads.tasks import data as data_stage
    from alignheads.tasks import refpass as refpass_stage
    from alignheads.tasks import tokenize as tokenize_stage
    from tests.helpers.tiny_models import tiny_tokenizer

    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    if reference is not None:
        reference.save_pretrained(root / "reference")
        tiny_tokenizer().save_pretrained(root / "reference")
        refpass = refpass.model_copy(update={"reference_model": str(root / "reference")})
    for split, n, seed in (("train", n_train, 0), ("test", 16, 1)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in word_pairs(n, seed)))
    tok = load_tokenizer(str(model_dir))
    fp = tokenizer_fingerprint(tok)
    store = root / "store"
    data_cfg = DataConfig(
        train=SourceConfig(path=str(root / "train.jsonl")), test=SourceConfig(path=str(root / "test.jsonl"))
    )
    data = data_stage.run_data(store, data_stage.plan_data(data_cfg, None, None, fp), tok)
    tplan = tokenize_stage.plan_tokenize(
        TokenizeConfig(max_prompt_length=16, max_response_length=8), data.key, data.path, fp
    )
    tokenized = tokenize_stage.run_tokenize(store, tplan, tok)
    rplan = refpass_stage.plan_refpass(refpass, ModelConfig(), str(model_dir), tokenized.path, fp)
    ref = refpass_stage.run_refpass(store, rplan)
    return PairStore(store, model_dir, data.path, tokenized.path, ref.path)
