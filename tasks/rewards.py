"""Where the α-sweep's rewards come from: the tiny world's ground truth, or a Hugging Face
sequence-classification reward model (a Hub id or a local directory) scoring ``prompt + response``;
and what identifies a reward source in the evaluate stage's key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from alignheads.storage.fingerprint import file_sha256

WORLD_REWARD = "world"
# files larger than this are fingerprinted by size + first and last MiB, not read whole
_FULL_HASH_LIMIT = 256 << 20


def _file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    if size <= _FULL_HASH_LIMIT:
        return file_sha256(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(-(1 << 20), 2)
        digest.update(fh.read(1 << 20))
    return "partial:" + digest.hexdigest()


def reward_spec(
    reward: str,
    revision: str | None = None,
    dtype: str = "float32",
    max_length: int = 1024,
    trust_remote_code: bool = False,
) -> dict:
    """What identifies a reward source, for the key.

    ``"world"``: the tiny world's ground truth. A local directory: its files' checksums (files
    over 256 MiB by size + first and last MiB), so retraining a model there changes the key. A
    Hub id: id + revision (pin `revision` for reproducible keys); plus dtype and max_length.
    """
    if reward == WORLD_REWARD:
        return {"kind": "world"}
    spec: dict[str, Any] = {
        "kind": "model",
        "name_or_path": reward,
        "dtype": dtype,
        "max_length": int(max_length),
        "trust_remote_code": bool(trust_remote_code),
    }
    path = Path(reward).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"reward model directory {path} is empty")
        spec["files"] = {p.relative_to(path).as_posix(): _file_fingerprint(p) for p in files}
    else:
        spec["revision"] = revision
    return spec


def world_rewards(prompts: list[str], responses: list[str]) -> list[float]:
    """The tiny world's deterministic ground-truth reward of each (prompt, response)."""
    from alignheads.world.reward import rewards

    return rewards(prompts, responses)


def load_reward_model(
    name_or_path: str,
    revision: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device: str | None = None,
):
    """(model, tokenizer) of a sequence-classification reward model with one output (safetensors only).

    The tokenizer gets a pad token (its EOS) when it has none, and the model's config the same
    pad id, so batches pool at each row's last real token.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )
    from alignheads.loading import load_pretrained

    model = load_pretrained(
        AutoModelForSequenceClassification, name_or_path, revision, dtype, trust_remote_code
    )
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {name_or_path} has {model.config.num_labels} labels; a reward model has 1"
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def model_rewards(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 16,
    max_length: int = 1024,
) -> tuple[list[float], int]:
    """Reward-model scores of ``prompt + response`` and how many texts were truncated.

    Texts are batched by length (longest first) under `torch.inference_mode`; scores come back
    in input order. Texts longer than `max_length` tokens are cut at the right.
    """
    import torch

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    if not texts:
        return [], 0
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    truncated = sum(1 for n in lengths if n > max_length)
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    device = next(model.parameters()).device
    scores = [0.0] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            logits = model(**enc).logits
            if logits.ndim != 2 or logits.shape[1] != 1:
                raise ValueError(
                    f"reward model returned logits of shape {tuple(logits.shape)}, expected (batch, 1)"
                )
            for i, value in zip(idx, logits[:, 0].float().tolist(), strict=True):
                scores[i] = float(value)
    return scores, truncated


def compute_rewards(
    spec: dict, batch_size: int, prompts: list[str], responses: list[str], device: str | None = None
):
    """(rewards, info) of every generation under the reward source `spec` (see `reward_spec`)."""
    if spec["kind"] == "world":
        return world_rewards(prompts, responses), {"source": WORLD_REWARD}
    model, tokenizer = load_reward_model(
        spec["name_or_path"], spec.get("revision"), spec["dtype"], spec["trust_remote_code"], device
    )
    scores, truncated = model_rewards(model, tokenizer, prompts, responses, batch_size, spec["max_length"])
    return scores, {"source": spec["name_or_path"], "truncated": truncated}
