"""A local Hugging Face model that is not the tiny world's, built here: a Unigram tokenizer trained on
the data (its own special tokens `<unk>`, `<|begin|>`, `<|end|>`; no pad token, no chat template,
right padding), a randomly initialised small Llama on it, a one-label
`AutoModelForSequenceClassification` reward model, and Anthropic-HH-format preference files.

The world's conventions, for contrast: byte-level BPE, `<pad>`/`<s>`/`</s>`, left padding and a
chat template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

BOS, EOS, UNK = "<|begin|>", "<|end|>", "<unk>"

_TOPICS = ("cats", "rivers", "bread", "stars", "music", "gardens", "trains", "rain", "maps", "tea")
_GOOD = ("kind", "calm", "helpful", "clear", "gentle", "honest")
_BAD = ("rude", "wrong", "angry", "messy", "false", "loud")


def hh_dialogues(n: int, seed: int, question: str = "tell me about {} please") -> list[dict[str, str]]:
    """`n` rows {chosen, rejected} in Anthropic HH format (the prompt is the shared prefix ending in
    "\\n\\nAssistant:"): chosen answers use polite words, rejected ones rude words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(_TOPICS)
        ask = f"\n\nHuman: {question.format(topic)}\n\nAssistant:"
        good = " ".join(rng.choice(_GOOD) for _ in range(rng.randint(2, 5)))
        bad = " ".join(rng.choice(_BAD) for _ in range(rng.randint(2, 5)))
        rows.append({"chosen": f"{ask} {topic} are {good}", "rejected": f"{ask} {topic} are {bad}"})
    return rows


def unigram_tokenizer(texts: list[str], vocab_size: int = 160):
    """A Unigram (SentencePiece-style) fast tokenizer trained on `texts`: BOS `<|begin|>` prepended,
    EOS `<|end|>`, `<unk>`; no pad token and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], unk_token=UNK, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="right"
    )


@dataclass(frozen=True)
class LocalModel:
    model_dir: Path
    reward_dir: Path
    train: Path
    test: Path


def build_local_model(root: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> LocalModel:
    """Write the HH files, the tokenizer + random Llama and the reward model under `root`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    root.mkdir(parents=True, exist_ok=True)
    files = {}
    questions = {"train": "tell me about {} please", "test": "what do you know of {}"}  # no shared prompt
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        files[split] = root / f"hh-{split}.jsonl"
        rows = hh_dialogues(n, s, questions[split])
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [
        r[side]
        for q in questions.values()
        for r in hh_dialogues(100, seed + 2, q)
        for side in ("chosen", "rejected")
    ]
    tokenizer = unigram_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model_dir, reward_dir = root / "llama", root / "reward"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed + 1)
    LlamaForSequenceClassification(
        LlamaConfig(**{**config.to_dict(), "id2label": {0: "reward"}, "label2id": {"reward": 0}})
    ).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return LocalModel(model_dir, reward_dir, files["train"], files["test"])
