"""Generate stage for the baselines: one `generations` artifact per (baseline, α).

The same stage, table schema, prompts, decoding settings and common random numbers as the
heads' sweep (`alignheads.tasks.generate`): prompts in a fixed order and batching, and
``torch.manual_seed(batch_seed(seed, sample, batch))`` before each batch. Decoding runs the
base LM and the baseline's fine-tuned LM side by side (`alignheads.models.guided`), each with
its own KV cache, the next-token logits combined by the baseline's rule at α; per token the
exact KL(π_α ‖ π_base) is recorded as for the heads. Key = hash(baseline artifact key,
baseline name, α, prompt-set fingerprint, decoding settings, model dtype, version).

Decoding cost: 2 LM forward passes per generated token (the heads: 1 plus the head), recorded
in the manifest's info with the measured decoding time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from alignheads.config import SweepConfig
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks import generate as gen
from alignheads.tasks import train_baseline

LM_FORWARDS_PER_TOKEN = 2


def plan_baseline_generate(
    baseline_path: str | Path,
    alpha: float,
    prompts: Sequence[gen.Prompt],
    sweep: SweepConfig,
    model_source: dict[str, Any],
) -> gen.GeneratePlan:
    """The (baseline, α) generation plan; `baseline_path` is a complete baseline artifact."""
    if not prompts:
        raise ValueError("the prompt set is empty")
    manifest = read_manifest(Path(baseline_path), train_baseline.STAGE)
    kind = manifest.info.get("kind")
    if kind not in train_baseline.COMBINE:
        raise ValueError(f"{baseline_path}: baseline manifest info 'kind' is {kind!r}")
    return gen.generation_plan(
        kind, "baseline", manifest.key, baseline_path, alpha, prompts, sweep, model_source
    )


def sample_guided(
    base: Any,
    tuned: Any,
    tokenizer: Any,
    prompts: Sequence[gen.Prompt],
    sweep: SweepConfig,
    combine,
    *,
    progress: bool = False,
    desc: str = "generating",
) -> list[dict[str, Any]]:
    """Responses to `prompts` from two models combined by ``combine(z_base, z_tuned)``, with the
    heads' common random numbers; rows as `alignheads.tasks.generate.sample_responses` gives."""
    from alignheads.models.guided import guided_decode

    eos_ids = gen._eos_ids(tokenizer, base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]

    def decode(input_ids, mask):
        out = guided_decode(
            base, tuned, input_ids, mask, combine,
            max_new_tokens=sweep.max_new_tokens, do_sample=sweep.do_sample,
            temperature=sweep.temperature, top_p=sweep.top_p,
            eos_token_id=eos_ids, pad_token_id=pad_id,
        )  # fmt: skip
        return out.sequences, {"kl_to_base": out.kl_to_base}

    return gen.sample_batches(decode, tokenizer, prompts, sweep, eos_ids, pad_id, base, progress, desc)


def run_baseline_generate(store: Path, plan: gen.GeneratePlan, *, progress: bool = True) -> ArtifactResult:
    """Generate the plan's (baseline, α) responses unless the artifact is already complete."""

    def build(staging: Path) -> ArtifactContent:
        from alignheads.loading import load_causal_lm, load_tokenizer

        src = plan.model
        trust = src.get("trust_remote_code", False)
        dtype = src.get("dtype", "float32")
        device = gen._resolve_device("auto")
        tokenizer = load_tokenizer(src["name_or_path"], src.get("revision"), trust)
        base = load_causal_lm(src["name_or_path"], src.get("revision"), dtype, trust).to(device)
        model_dir = Path(plan.train_path) / train_baseline.MODEL_SUBDIR
        tuned = load_causal_lm(str(model_dir), None, dtype, trust).to(device)
        combine = partial(train_baseline.COMBINE[plan.head], alpha=plan.alpha)
        started = time.perf_counter()
        rows = sample_guided(
            base, tuned, tokenizer, [(pid, text) for pid, text in plan.prompts], plan.sweep_config, combine,
            progress=progress, desc=f"generate {plan.head} α={plan.alpha:g}",
        )  # fmt: skip
        seconds = time.perf_counter() - started
        table = gen.generations_table(rows, plan.head, plan.head_key, plan.alpha)
        info = {
            "head": plan.head,
            "alpha": plan.alpha,
            "prompts": len(plan.prompts),
            **gen._summary(table),
            "lm_forwards_per_token": LM_FORWARDS_PER_TOKEN,
            "decode_seconds": seconds,
            "generated_tokens": sum(r["n_tokens"] for r in rows),
        }
        return ArtifactContent(tables={gen.TABLE: write_table(table, staging, gen.TABLE)}, info=info)

    return ensure_artifact(store, gen.STAGE, plan.key, gen.GENERATE_VERSION, plan.config, plan.inputs, build)
