"""The baselines (GenARM reward LM, DPO + DeRa) through the train and generate stages every
method shares, over a real reference cache.

The store is built once per module as in tests/training/test_train.py: a tiny Llama + word-level
tokenizer, pairs whose chosen responses use one block of words and rejected another, then the
real data, tokenize and reference-pass stages. Each baseline is trained once (a few seconds).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignheads.config import (
    DPOTrainConfig,
    GenARMTrainConfig,
    RefPassConfig,
    SweepConfig,
)
from alignheads.loading import load_causal_lm, load_tokenizer
from alignheads.storage.tables import read_table
from alignheads.tasks import evaluate as evaluate_stage
from alignheads.tasks import generate as gen
from alignheads.tasks import sampling
from alignheads.tasks import train as train_stage
from alignheads.tasks.prompts import prompt_set, save_prompt_set
from tests.helpers.tiny_models import tiny_llama
from tests.helpers.word_pairs import pair_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    built = pair_store(
        tmp_path_factory.mktemp("baselines"), tiny_llama(tied=False), RefPassConfig(k=8, pairs_per_shard=48)
    )
    source = {
        "name_or_path": str(built.model_dir),
        "revision": None,
        "trust_remote_code": False,
        "dtype": "float32",
    }
    return {
        "store": built.store,
        "model_dir": built.model_dir,
        "data": built.data,
        "refpass": built.refpass,
        "source": source,
    }


SETTINGS = {"enabled": True, "batch_size": 8, "epochs": 2, "lr": 3e-3, "eval_every": 4, "warmup_ratio": 0.0}


@pytest.fixture(scope="module")
def trained(world):
    """Both baselines trained once: {name: (plan, first ArtifactResult)}."""
    out = {}
    for kind, cfg in (("genarm", GenARMTrainConfig(**SETTINGS)), ("dpo-dera", DPOTrainConfig(**SETTINGS))):
        plan = train_stage.plan_train(kind, cfg, world["refpass"], world["source"])
        out[kind] = (plan, train_stage.run_train(world["store"], plan, progress=False))
    return out


def test_keys_follow_the_settings_like_the_heads(world):
    plan = train_stage.plan_train("dpo-dera", DPOTrainConfig(**SETTINGS), world["refpass"], world["source"])
    again = train_stage.plan_train("dpo-dera", DPOTrainConfig(**SETTINGS), world["refpass"], world["source"])
    assert again.key == plan.key
    other_beta = DPOTrainConfig(**(SETTINGS | {"beta": 0.2}))
    assert train_stage.plan_train("dpo-dera", other_beta, world["refpass"], world["source"]).key != plan.key
    watched = DPOTrainConfig(**(SETTINGS | {"eval_every": 1, "enabled": False}))  # not what it computes
    assert train_stage.plan_train("dpo-dera", watched, world["refpass"], world["source"]).key == plan.key
    arm = train_stage.plan_train("genarm", GenARMTrainConfig(**SETTINGS), world["refpass"], world["source"])
    assert arm.key != plan.key
    assert plan.inputs == {"refpass": world["refpass"].name}
    with pytest.raises(ValueError, match="unknown method 'rlhf'"):
        train_stage.plan_train("rlhf", DPOTrainConfig(), world["refpass"], world["source"])


def test_lora_trains_only_the_adapted_projections_and_saves_a_plain_checkpoint(world):
    """With lora_rank, peft adapters on q_proj and v_proj are trained and merged: the saved model
    is a plain transformers checkpoint whose other weights equal the base model's exactly."""
    from safetensors.torch import load_file

    cfg = DPOTrainConfig(
        **(SETTINGS | {"lora_rank": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"]})
    )
    plan = train_stage.plan_train("dpo-dera", cfg, world["refpass"], world["source"])
    full = train_stage.plan_train("dpo-dera", DPOTrainConfig(**SETTINGS), world["refpass"], world["source"])
    assert plan.key != full.key and plan.config["lora_rank"] == 4 and "lora_rank" not in full.config
    result = train_stage.run_train(world["store"], plan, progress=False)
    tuned = load_file(result.path / "model" / "model.safetensors")
    base = {k: v.detach() for k, v in load_causal_lm(world["source"]["name_or_path"]).state_dict().items()}
    assert not any("lora" in name for name in tuned)  # merged: no adapter tensors left
    changed = {name for name, value in tuned.items() if not torch.equal(value, base[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), changed
    assert result.manifest.info["eval"]["eval/rewards/accuracies"] > 0.5


def test_baselines_learn_the_preference_and_are_cached(world, trained):
    for kind, (plan, first) in trained.items():
        assert first.computed
        info = first.manifest.info
        assert info["kind"] == kind and info["steps"] == 2 * 64 // 8
        assert info["eval"]["eval/rewards/accuracies"] >= 0.9, (kind, info["eval"])
        assert (first.path / "model" / "model.safetensors").is_file()
        assert not list(first.path.rglob("*.bin")) and not list(first.path.rglob("*.pt"))
        again = train_stage.run_train(world["store"], plan, progress=False)
        assert not again.computed and again.path == first.path
        names = set(read_table(first.path, "train_metrics").column("name").to_pylist())
        assert {"loss", "rewards/accuracies", "eval/rewards/accuracies"} <= names


def test_dpo_preference_accuracy_at_alpha_one_is_the_trained_models(trained):
    plan, result = trained["dpo-dera"]
    acc = evaluate_stage.held_out_accuracy(plan, result.path, [0.0, 1.0, 2.0])
    assert acc["1.0"] == pytest.approx(result.manifest.info["eval"]["eval/rewards/accuracies"])
    assert acc["2.0"] >= 0.9 and set(acc) == {"0.0", "1.0", "2.0"}


def test_sweep_generations_share_schema_seeds_and_cache_with_the_heads(world, trained):
    sweep = SweepConfig(alphas=[0, 1], n_prompts=6, max_new_tokens=6, batch_size=4, do_sample=True, top_p=0.9)
    prompts = prompt_set(world["data"], sweep)
    paths = []
    for kind, (_, result) in trained.items():
        saved = save_prompt_set(world["store"], prompts)
        plans = [gen.plan_generate(result.path, alpha, saved, sweep, world["source"]) for alpha in (0.0, 1.0)]
        assert all(plan.inputs == {"train": result.key} and plan.head == kind for plan in plans)
        first = gen.run_generate(world["store"], plans, progress=False)  # both α in one pass
        assert all(r.computed and r.path.parent.name == gen.STAGE for r in first)
        assert all(r.manifest.info["lm_forwards_per_token"] == 2 for r in first)
        assert not any(r.computed for r in gen.run_generate(world["store"], plans, progress=False))
        paths += [str(r.path) for r in first]
    table = evaluate_stage.load_generations(paths)  # the evaluate stage reads them unchanged
    assert read_table(Path(paths[0]), gen.TABLE).schema == gen.GENERATIONS_SCHEMA
    assert table.num_rows == 4 * len(prompts)
    rows = table.to_pylist()
    # common random numbers: the same seed per (prompt, sample) for every method and α
    seeds = {(r["prompt_id"], r["sample_index"]): set() for r in rows}
    for r in rows:
        seeds[(r["prompt_id"], r["sample_index"])].add(r["seed"])
    assert all(len(s) == 1 for s in seeds.values())
    # DeRa at α = 0 is the base: same text as the plain model sampled by the heads' sweep code,
    # although DeRa's α = 0 rows shared their batches with α = 1 rows
    tok = load_tokenizer(str(world["model_dir"]))
    plain = sampling.sample_responses(load_causal_lm(str(world["model_dir"])), tok, prompts, sweep)
    for head in ("dpo-dera", "genarm"):
        at0 = [r for r in rows if r["head"] == head and r["alpha"] == 0.0]
        assert [r["response"] for r in at0] == [r["response"] for r in plain]
        # DeRa returns the base logits themselves (KL exactly 0); GenARM their log-softmax (roundoff)
        assert all(0.0 <= r["kl_mean"] <= (0.0 if head == "dpo-dera" else 1e-6) for r in at0)
    assert all(r["kl_mean"] > 0 for r in rows if r["alpha"] == 1.0)
