"""Evaluate stage: score every generation of an α sweep and summarise it per (head, α).

Input: one or more generation artifacts (table `generations`, one artifact per (head, α)).
Output artifact `<store>/evaluate/<key>/` with two tables:

- `scores` (`SCORES_SCHEMA`, one row per generation): its reward, its outcome against α = 0
  of the same head on the same prompt, sample and seed, and its text statistics;
- `summary` (`SUMMARY_SCHEMA`, one row per (head, α)): means and rates over those rows, the
  run id and the held-out preference accuracy the plan carries.

The metric definitions (words, distinct-n, repetition, ties) are in `alignheads.models.metrics`.
Rewards come from the tiny world's ground truth (`reward="world"`) or a Hugging Face
sequence-classification reward model (a Hub id or a local directory) scoring
``prompt + response``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from alignheads.models import metrics
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key, file_sha256
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import read_table, write_table
from alignheads.tasks.generate import GENERATIONS_SCHEMA
from alignheads.tasks.generate import TABLE as GENERATIONS_TABLE

STAGE = "evaluate"
EVALUATE_VERSION = 1
WORLD_REWARD = "world"
# files larger than this are fingerprinted by size + first and last MiB, not read whole
_FULL_HASH_LIMIT = 256 << 20

# columns that may be null (per-head statistics); every other column must be filled
_NULLABLE = {"kl_mean", "kl_sum", "strength_mean", "strength_max", "utilisation", "align_norm_mean"}

SCORES_SCHEMA = pa.schema(
    [
        ("head", pa.string()),
        ("head_key", pa.string()),
        ("alpha", pa.float64()),
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("reward", pa.float64()),
        ("outcome", pa.string()),
        ("reward_source", pa.string()),
        ("n_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("kl_mean", pa.float64()),
        ("distinct_1", pa.float64()),
        ("distinct_2", pa.float64()),
        ("repetition", pa.float64()),
        ("strength_mean", pa.float64()),
        ("utilisation", pa.float64()),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("head", pa.string()),
        ("head_key", pa.string()),
        ("alpha", pa.float64()),
        ("reward", pa.float64()),
        ("reward_std", pa.float64()),
        ("win_rate", pa.float64()),
        ("tie_rate", pa.float64()),
        ("lose_rate", pa.float64()),
        ("n_compared", pa.int64()),
        ("kl", pa.float64()),
        ("n", pa.int64()),
        ("length", pa.float64()),
        ("distinct_1", pa.float64()),
        ("distinct_2", pa.float64()),
        ("repetition", pa.float64()),
        ("strength_mean", pa.float64()),
        ("utilisation", pa.float64()),
        ("eos_rate", pa.float64()),
        ("preference_accuracy", pa.float64()),
        ("reward_source", pa.string()),
    ]
)


@dataclass(frozen=True)
class EvaluatePlan:
    """The evaluate stage's inputs, resolved, with the artifact key they hash to (JSON-able).

    `generation_paths` are sorted by artifact key, so the order they were given in does not
    matter. `preference_accuracy` is ``{head: {alpha as str(float): accuracy}}``.
    `run_id` is written into the summary but is not part of the key (see `plan_evaluate`).
    """

    key: str
    generation_paths: tuple[str, ...]
    reward: dict
    run_id: str
    preference_accuracy: dict
    batch_size: int
    config: dict
    inputs: dict[str, str]


def _alpha_key(alpha: Any) -> str:
    return repr(float(alpha))


def normalize_preference_accuracy(pref: dict | None) -> dict[str, dict[str, float]]:
    """``{head: {α: acc}}`` with α keys as ``repr(float(α))`` ("1" and 1.0 both give "1.0")."""
    out: dict[str, dict[str, float]] = {}
    for head, by_alpha in (pref or {}).items():
        if not isinstance(by_alpha, dict):
            raise ValueError(f"preference_accuracy[{head!r}] must be a dict {{alpha: accuracy}}")
        entries: dict[str, float] = {}
        for alpha, acc in by_alpha.items():
            try:
                key = _alpha_key(alpha)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"preference_accuracy[{head!r}]: alpha {alpha!r} is not a number") from exc
            entries[key] = None if acc is None else float(acc)
        out[str(head)] = dict(sorted(entries.items()))
    return dict(sorted(out.items()))


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


def plan_evaluate(
    generation_paths: list[str] | list[Path],
    reward: str = WORLD_REWARD,
    *,
    run_id: str = "",
    preference_accuracy: dict | None = None,
    reward_revision: str | None = None,
    reward_dtype: str = "float32",
    reward_max_length: int = 1024,
    reward_batch_size: int = 16,
    trust_remote_code: bool = False,
) -> EvaluatePlan:
    """Key = hash(the generation artifacts' keys, the reward spec, the preference accuracies,
    format version).

    `run_id` (the pipeline's MLflow parent run id, or '') is not in the key: a rerun that finds
    the artifact complete reuses it, and its summary keeps the run id of the run that computed
    it. The preference accuracies are in the key (they change the summary's content).
    `reward_batch_size` is not (scores do not depend on it).
    """
    if not generation_paths:
        raise ValueError("plan_evaluate needs at least one generation artifact")
    if reward_batch_size < 1:
        raise ValueError(f"reward_batch_size must be >= 1, got {reward_batch_size}")
    by_key: dict[str, str] = {}
    for p in generation_paths:
        manifest = read_manifest(Path(p))
        if GENERATIONS_TABLE not in manifest.tables:
            raise ValueError(
                f"{p}: artifact has no table {GENERATIONS_TABLE!r} (has {sorted(manifest.tables)})"
            )
        if manifest.key in by_key and by_key[manifest.key] != str(p):
            continue  # the same artifact named twice (e.g. two stores' copies): count it once
        by_key[manifest.key] = str(p)
    keys = sorted(by_key)
    spec = reward_spec(reward, reward_revision, reward_dtype, reward_max_length, trust_remote_code)
    pref = normalize_preference_accuracy(preference_accuracy)
    config = {"reward": spec, "preference_accuracy": pref, "tie_tolerance": metrics.TIE_TOLERANCE}
    inputs = {f"generations[{i}]": k for i, k in enumerate(keys)}
    return EvaluatePlan(
        key=artifact_key(STAGE, config, inputs, EVALUATE_VERSION),
        generation_paths=tuple(by_key[k] for k in keys),
        reward={**spec, "revision": reward_revision} if spec["kind"] == "model" else spec,
        run_id=str(run_id or ""),
        preference_accuracy=pref,
        batch_size=int(reward_batch_size),
        config=config,
        inputs=inputs,
    )


# --- reading the generations ------------------------------------------------------------------


def load_generations(paths: list[str] | tuple[str, ...]) -> pa.Table:
    """The `generations` tables of the artifacts, concatenated and cast to `GENERATIONS_SCHEMA`.

    Missing nullable statistics columns are filled with nulls; a missing required column, a
    null in a required field, or one (head, head_key, α, prompt_id, sample_index, seed) twice
    raises ValueError naming the artifact and row.
    """
    parts = []
    for p in paths:
        table = read_table(Path(p), GENERATIONS_TABLE)
        missing = [f.name for f in GENERATIONS_SCHEMA if f.name not in table.column_names]
        required_missing = [m for m in missing if m not in _NULLABLE]
        if required_missing:
            raise ValueError(f"{p}: table generations lacks column(s) {', '.join(required_missing)}")
        cols = []
        for field in GENERATIONS_SCHEMA:
            if field.name in missing:
                cols.append(pa.nulls(table.num_rows, field.type))
                continue
            try:
                cols.append(table.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"{p}: column generations.{field.name} is not {field.type}: {exc}") from exc
            if field.name not in _NULLABLE and cols[-1].null_count:
                row = pc.index(pc.is_null(cols[-1]), True).as_py()
                raise ValueError(f"{p}: generations row {row}: field '{field.name}' is null")
        parts.append(pa.Table.from_arrays(cols, schema=GENERATIONS_SCHEMA))
    table = pa.concat_tables(parts)
    ident = ("head", "head_key", "alpha", "prompt_id", "sample_index", "seed")
    seen: dict[tuple, int] = {}
    for i, row in enumerate(zip(*(table.column(c).to_pylist() for c in ident), strict=True)):
        if row in seen:
            raise ValueError(
                f"generation {dict(zip(ident, row, strict=True))} appears twice (rows {seen[row]} and {i} "
                f"of the concatenated artifacts {list(paths)})"
            )
        seen[row] = i
    heads: dict[str, set[str]] = {}
    for head, head_key in zip(
        table.column("head").to_pylist(), table.column("head_key").to_pylist(), strict=True
    ):
        heads.setdefault(head, set()).add(head_key)
    for head, hkeys in heads.items():
        if len(hkeys) > 1:
            raise ValueError(
                f"head {head!r} comes from {len(hkeys)} trained heads ({', '.join(sorted(hkeys))}); "
                "evaluate one sweep per head at a time"
            )
    return table


# --- rewards ----------------------------------------------------------------------------------


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
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path,
        revision=revision,
        dtype=getattr(torch, dtype),
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
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


def compute_rewards(plan: EvaluatePlan, prompts: list[str], responses: list[str], device: str | None = None):
    """(rewards, info) of every generation under the plan's reward source."""
    spec = plan.reward
    if spec["kind"] == "world":
        return world_rewards(prompts, responses), {"source": WORLD_REWARD}
    model, tokenizer = load_reward_model(
        spec["name_or_path"], spec.get("revision"), spec["dtype"], spec["trust_remote_code"], device
    )
    scores, truncated = model_rewards(
        model, tokenizer, prompts, responses, plan.batch_size, spec["max_length"]
    )
    return scores, {"source": spec["name_or_path"], "truncated": truncated}


# --- scores and summary -----------------------------------------------------------------------


def score_table(generations: pa.Table, rewards: list[float], reward_source: str) -> pa.Table:
    """The `scores` table: one row per generation (same order), with outcome against α = 0."""
    if len(rewards) != generations.num_rows:
        raise ValueError(f"{len(rewards)} rewards for {generations.num_rows} generations")
    for i, r in enumerate(rewards):
        if r is None or not math.isfinite(r):
            raise ValueError(f"generation row {i}: reward {r!r} is not a finite number")
    cols = {name: generations.column(name).to_pylist() for name in GENERATIONS_SCHEMA.names}
    keys = list(
        zip(
            cols["head"], cols["head_key"], cols["prompt_id"], cols["sample_index"], cols["seed"], strict=True
        )
    )
    outcomes = metrics.outcomes_against_baseline(keys, cols["alpha"], rewards)
    stats = [metrics.text_stats(r) for r in cols["response"]]
    data = {
        **{c: cols[c] for c in ("head", "head_key", "alpha", "prompt_id", "sample_index", "seed")},
        "reward": [float(r) for r in rewards],
        "outcome": outcomes,
        "reward_source": [reward_source] * len(rewards),
        **{c: cols[c] for c in ("n_tokens", "finish_reason", "kl_mean")},
        **{c: [s[c] for s in stats] for c in ("distinct_1", "distinct_2", "repetition")},
        "strength_mean": cols["strength_mean"],
        "utilisation": cols["utilisation"],
    }
    return pa.Table.from_pydict(data, schema=SCORES_SCHEMA)


def summary_table(scores: pa.Table, run_id: str = "", preference_accuracy: dict | None = None) -> pa.Table:
    """The `summary` table: one row per (head, α) of the scores, sorted by head then α."""
    pref = normalize_preference_accuracy(preference_accuracy)
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in scores.to_pylist():
        groups.setdefault((row["head"], row["alpha"]), []).append(row)
    rows = []
    for (head, alpha), members in sorted(groups.items()):
        agg = metrics.summarize_group(members)
        rows.append(
            {
                "run_id": run_id,
                "head": head,
                "head_key": members[0]["head_key"],
                "alpha": alpha,
                **agg,
                "preference_accuracy": pref.get(head, {}).get(_alpha_key(alpha)),
                "reward_source": members[0]["reward_source"],
            }
        )
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def run_evaluate(store: Path, plan: EvaluatePlan, device: str | None = None) -> ArtifactResult:
    """Build the evaluate artifact (tables `scores` and `summary`) unless a complete one exists.

    `device` is where a reward model runs (default: CUDA when available); unused for "world".
    The manifest's info holds the row count, the reward source and the summary rows.
    """

    def build(staging: Path) -> ArtifactContent:
        generations = load_generations(plan.generation_paths)
        rewards, reward_info = compute_rewards(
            plan,
            generations.column("prompt").to_pylist(),
            generations.column("response").to_pylist(),
            device,
        )
        scores = score_table(generations, rewards, reward_info["source"])
        summary = summary_table(scores, plan.run_id, plan.preference_accuracy)
        info = {"rows": scores.num_rows, "reward": reward_info, "summary": summary.to_pylist()}
        tables = {
            "scores": write_table(scores, staging, "scores"),
            "summary": write_table(summary, staging, "summary"),
        }
        return ArtifactContent(tables=tables, info=info)

    return ensure_artifact(store, STAGE, plan.key, EVALUATE_VERSION, plan.config, plan.inputs, build)
