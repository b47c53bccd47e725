"""Build the tiny world into a directory: model + tokenizer, preference pairs, and a build report.

Layout written into ``out_dir`` (the caller creates it empty, renames it into place and writes
any manifest; nothing here does either)::

    model/         config.json, generation_config.json, model.safetensors, tokenizer files
    train.jsonl    {"prompt", "chosen", "rejected"} per line
    test.jsonl     the same, held-out
    objectives/<name>/train.jsonl   one objective's pairs (a dial's data), for every name in
    objectives/<name>/test.jsonl    reward.OBJECTIVES; test prompts unseen in both train sets
    report.json    the dict returned by build_world
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignheads.config import WorldConfig
from alignheads.world import corpus
from alignheads.world.layout import objective_pair_files
from alignheads.world.pretrain import encode_corpus, make_model, one_thread, pretrain
from alignheads.world.reward import OBJECTIVES, TERMS, objective_sums, reward_terms, rewards
from alignheads.world.tokenizer import build_tokenizer


def tiny_test_config(**overrides: Any) -> WorldConfig:
    """A smaller, faster world for test suites (well under 25 s on 2 cores), same properties."""
    base: dict[str, Any] = {
        "n_train_pairs": 256,
        "n_test_pairs": 128,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 192,
        "max_position_embeddings": 192,
        "pretrain_steps": 1000,
        "pretrain_batch_size": 16,
        "pretrain_lr": 5e-3,
        "n_pretrain_dialogues": 4000,
        "report_samples": 128,
        "report_max_new_tokens": 64,
        "n_objective_train_pairs": 128,
        "n_objective_test_pairs": 64,
    }
    return WorldConfig(**{**base, **overrides})


def write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    """One JSON object per line, UTF-8."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int,
) -> tuple[list[str], list[bool]]:
    """Pure ancestral samples (temperature 1, no top-k/top-p) for each prompt, left-padded batch.

    Returns the decoded responses and whether each one stopped with EOS. The seed applies to a
    private copy of the torch RNG, so the caller's random state is unchanged.
    """
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    finished = [bool((row == tokenizer.eos_token_id).any()) for row in new]
    return tokenizer.batch_decode(new, skip_special_tokens=True), finished


def _mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def objective_pair_stats(objective: str, pairs: Sequence[dict[str, str]]) -> dict[str, Any]:
    """How cleanly ``pairs`` isolate ``objective``: the share where chosen beats rejected on it,
    and for every other reward term the share of exact ties and the mean chosen - rejected."""
    chosen = [reward_terms(p["prompt"], p["chosen"]) for p in pairs]
    rejected = [reward_terms(p["prompt"], p["rejected"]) for p in pairs]
    wins = [
        objective_sums(c)[objective] > objective_sums(r)[objective]
        for c, r in zip(chosen, rejected, strict=True)
    ]
    others = {
        term: {
            "tie_rate": _mean([float(c[term] == r[term]) for c, r in zip(chosen, rejected, strict=True)]),
            "mean_diff": _mean([c[term] - r[term] for c, r in zip(chosen, rejected, strict=True)]),
        }
        for term in TERMS
        if term not in OBJECTIVES[objective]
    }
    return {"chosen_beats_rate": _mean([float(w) for w in wins]), "other_terms": others}


def _objective_report(
    out_dir: Path, cfg: WorldConfig, main_train_prompts: set[str], pair_kw: dict[str, Any]
) -> dict[str, Any]:
    """Write every objective's pair files and return the report's ``objectives`` section."""
    section: dict[str, Any] = {}
    for objective in OBJECTIVES:
        train = corpus.objective_pairs(objective, cfg.n_objective_train_pairs, cfg.seed, "train", **pair_kw)
        seen = main_train_prompts | {p["prompt"] for p in train}
        test = corpus.objective_pairs(
            objective, cfg.n_objective_test_pairs, cfg.seed, "test", exclude=seen, **pair_kw
        )
        files = objective_pair_files(out_dir, objective)
        files["train"].parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(files["train"], train)
        write_jsonl(files["test"], test)
        section[objective] = {
            "n_train_pairs": len(train),
            "n_test_pairs": len(test),
            **objective_pair_stats(objective, train + test),
        }
    return section


def build_world(out_dir: Path, cfg: WorldConfig, progress: bool = True) -> dict[str, Any]:
    """Generate the corpus and pairs, train tokenizer and base LM, sample it, write everything.

    Returns the build report (also written to ``out_dir/report.json``). ``report["between"]``
    says whether the base samples' mean reward lies strictly between the rejected and chosen
    means of the test pairs, the property the world exists to provide. ``report["objectives"]``
    gives, per objective, its pair counts and :func:`objective_pair_stats` over all its pairs.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)

    texts = corpus.pretraining_texts(
        cfg.n_pretrain_dialogues, cfg.seed, cfg.good_fraction, cfg.multi_turn_prob
    )
    pair_kw = {"held_out_fraction": cfg.held_out_fraction, "multi_turn_prob": cfg.multi_turn_prob}
    train = corpus.preference_pairs(cfg.n_train_pairs, cfg.seed, "train", **pair_kw)
    train_prompts = {p["prompt"] for p in train}
    test = corpus.preference_pairs(cfg.n_test_pairs, cfg.seed, "test", exclude=train_prompts, **pair_kw)

    tokenizer = build_tokenizer(texts, cfg.vocab_size, cfg.max_position_embeddings)
    model = make_model(cfg, tokenizer)
    sequences = encode_corpus(texts, tokenizer, cfg.max_position_embeddings)
    t_pretrain = time.perf_counter()
    with one_thread():  # the weights must not depend on the caller's OpenMP thread count
        losses = pretrain(model, sequences, cfg, tokenizer.pad_token_id, progress=progress)
    pretrain_seconds = time.perf_counter() - t_pretrain

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "test.jsonl", test)
    objectives = _objective_report(out_dir, cfg, train_prompts, pair_kw)

    # Base samples on distinct test prompts (cycled when the test set has fewer).
    distinct = list(dict.fromkeys(p["prompt"] for p in test))
    prompts = [distinct[i % len(distinct)] for i in range(cfg.report_samples)]
    t_sample = time.perf_counter()
    with one_thread():
        responses, finished = sample(model, tokenizer, prompts, cfg.report_max_new_tokens, cfg.seed)
    sample_seconds = time.perf_counter() - t_sample
    base_r = rewards(prompts, responses)

    all_pairs = train + test
    r_chosen = rewards([p["prompt"] for p in all_pairs], [p["chosen"] for p in all_pairs])
    r_rejected = rewards([p["prompt"] for p in all_pairs], [p["rejected"] for p in all_pairs])
    n_train = len(train)
    chosen_test, rejected_test = _mean(r_chosen[n_train:]), _mean(r_rejected[n_train:])
    base_mean = _mean(base_r)

    report: dict[str, Any] = {
        "seed": cfg.seed,
        "build_seconds": round(time.perf_counter() - start, 2),
        "pretrain_seconds": round(pretrain_seconds, 2),
        "sample_seconds": round(sample_seconds, 2),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "corpus_dialogues": len(texts),
        "corpus_tokens": sum(len(s) for s in sequences),
        "pretrain_steps": len(losses),
        "final_loss": round(_mean(losses[-20:]), 4),
        "n_train_pairs": len(train),
        "n_test_pairs": len(test),
        "test_prompts_distinct": len({p["prompt"] for p in test}),
        "test_prompts_unseen_in_train": sum(p["prompt"] not in train_prompts for p in test),
        "reward_chosen_mean": chosen_test,
        "reward_rejected_mean": rejected_test,
        "reward_base_mean": base_mean,
        "reward_base_std": float(statistics.pstdev(base_r)),
        "reward_chosen_mean_train": _mean(r_chosen[:n_train]),
        "reward_rejected_mean_train": _mean(r_rejected[:n_train]),
        "base_samples": len(base_r),
        "base_finished_fraction": sum(finished) / len(finished),
        "pair_accuracy": sum(c > r for c, r in zip(r_chosen, r_rejected, strict=True)) / len(all_pairs),
        "between": rejected_test < base_mean < chosen_test,
        "objectives": objectives,
        "examples": [
            {"prompt": p, "response": r, "reward": s}
            for p, r, s in list(zip(prompts, responses, base_r, strict=True))[:4]
        ],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The build report as printable text: sizes, timing, the three reward means, and one line
    per objective (pair counts, how often chosen wins, the other terms that do not always tie)."""
    lines = [
        "Tiny world build report",
        f"  built in {report['build_seconds']:.1f} s (pretraining {report['pretrain_seconds']:.1f} s, "
        f"sampling {report['sample_seconds']:.1f} s; seed {report['seed']})",
        f"  model: {report['n_parameters']:,} parameters, vocabulary {report['vocab_size']}, "
        f"final pretraining loss {report['final_loss']:.3f} after {report['pretrain_steps']} steps",
        f"  corpus: {report['corpus_dialogues']:,} dialogues, {report['corpus_tokens']:,} tokens",
        f"  pairs: {report['n_train_pairs']} train, {report['n_test_pairs']} test "
        f"({report['test_prompts_distinct']} distinct test prompts, "
        f"{report['test_prompts_unseen_in_train']} of the pairs' prompts unseen in train)",
        f"  ground-truth reward ranks chosen above rejected on {report['pair_accuracy']:.1%} of pairs",
        "  mean ground-truth reward (test prompts):",
        f"    chosen     {report['reward_chosen_mean']:+.3f}",
        f"    base LM    {report['reward_base_mean']:+.3f}  (std {report['reward_base_std']:.3f}, "
        f"{report['base_samples']} samples, {report['base_finished_fraction']:.0%} stopped with EOS)",
        f"    rejected   {report['reward_rejected_mean']:+.3f}",
        "  base samples lie strictly between rejected and chosen: " + ("yes" if report["between"] else "NO"),
    ]
    lines.append("  objective pairs (chosen beats rejected on the objective; other terms tied):")
    for name, obj in report.get("objectives", {}).items():
        untied = [
            f"{term} {st['tie_rate']:.1%} (mean diff {st['mean_diff']:+.3f})"
            for term, st in obj["other_terms"].items()
            if st["tie_rate"] < 1.0
        ]
        lines.append(
            f"    {name:<8} {obj['n_train_pairs']} train, {obj['n_test_pairs']} test; "
            f"beats {obj['chosen_beats_rate']:.1%}; ties: "
            + ("; ".join(untied) + "; others 100%" if untied else "all other terms 100%")
        )
    for ex in report.get("examples", []):
        question = ex["prompt"].rsplit("Human:", 1)[-1].replace("\n\nAssistant:", "").strip()
        lines.append(f"    e.g. {question!r} -> {ex['response'].strip()!r} ({ex['reward']:+.2f})")
    return "\n".join(lines)
