"""The baselines (GenARM reward LM, DPO + DeRa) through the train and generate stages every
method shares, over a real reference cache.

The store is built once per module as in tests/training/test_train.py: a tiny Llama + word-level
tokenizer, pairs whose chosen responses use one block of words and rejected another, then the
real data, tokenize and reference-pass stages. Each baseline is trained once (a few seconds).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from alignheads.config import (
    DPOTrainConfig,
    EvaluateConfig,
    GenARMTrainConfig,
    RefPassConfig,
    SweepConfig,
)
from alignheads.loading import load_causal_lm, load_tokenizer
from alignheads.storage.tables import read_table
from alignheads.tasks import accuracy as accuracy_stage
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


def test_dpo_preference_accuracy_at_alpha_one_is_the_trained_models(world, trained):
    plan, result = trained["dpo-dera"]
    aplan = accuracy_stage.plan_accuracy(asdict(plan), result.path, [2.0, 0.0, 1.0, 1.0])
    built = accuracy_stage.run_accuracy(world["store"], aplan)
    acc = accuracy_stage.read_accuracies([str(built.path)])["dpo-dera"]
    assert list(acc) == [0.0, 1.0, 2.0] and aplan.inputs == {"train": result.key}
    assert acc[1.0] == pytest.approx(result.manifest.info["eval"]["eval/rewards/accuracies"])
    assert acc[2.0] >= 0.9
    rows = read_table(built.path, accuracy_stage.TABLE).to_pylist()
    held_out = train_stage.pair_streams(plan)[1].count_pairs()
    assert held_out > 0 and [r["n_pairs"] for r in rows] == [held_out] * 3
    assert not accuracy_stage.run_accuracy(world["store"], aplan).computed  # cached on its key


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


def test_a_methods_sweep_loads_it_once_and_builds_what_its_stages_build_alone(world, trained, tmp_path, monkeypatch):
    """Calibrate, generate and the held-out accuracy share one load of the method (GenARM: the LM
    and its reward LM) and give exactly the artifacts each stage gives with its own load; a rerun
    loads nothing, and a missing artifact is rebuilt alone over one new load."""
    from alignheads.tasks import calibrate as calibrate_stage
    from alignheads.tasks import method_sweep

    loads = []
    real = train_stage.load_run_model
    monkeypatch.setattr(train_stage, "load_run_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    plan, result = trained["genarm"]
    sweep = SweepConfig(alphas=[0, 1], n_prompts=4, max_new_tokens=5, batch_size=4, do_sample=True)
    prompts = save_prompt_set(world["store"], prompt_set(world["data"], sweep))
    calibration = save_prompt_set(world["store"], prompt_set(world["data"], sweep.model_copy(update={"seed": 9})))
    targets = EvaluateConfig(target_kls=[0.05], calibration_steps=2)
    cplan = calibrate_stage.plan_calibrate(result.path, calibration, sweep, targets, world["source"])
    splan = method_sweep.plan_method_sweep(
        result.path, [0.0, 1.0], prompts, sweep, world["source"], calibrate=cplan, train_plan=asdict(plan)
    )

    alone = tmp_path / "alone"  # each stage on its own, one load each
    calibrated = calibrate_stage.run_calibrate(alone, cplan, progress=False)
    alpha = calibrate_stage.targets_alphas(calibrated.manifest.info["targets"])[0.05]
    alphas = [0.0, 1.0] + ([alpha] if alpha not in (0.0, 1.0) else [])
    gens = gen.run_generate(alone, [gen.plan_generate(result.path, a, prompts, sweep, world["source"]) for a in alphas], progress=False)
    acc = accuracy_stage.run_accuracy(alone, accuracy_stage.plan_accuracy(asdict(plan), result.path, alphas))
    assert len(loads) == 3

    shared = tmp_path / "shared"
    loads.clear()
    swept = method_sweep.run_method_sweep(shared, splan, progress=False)
    assert swept.loads == 1 and len(loads) == 1
    assert [g.info["alpha"] for g in swept.generate] == alphas and swept.calibrate.key == calibrated.key
    for mine, theirs, table in [(swept.calibrate, calibrated, "calibration"), (swept.accuracy, acc, "accuracy")] + [
        (g, r, gen.TABLE) for g, r in zip(swept.generate, gens, strict=True)
    ]:
        assert mine.key == theirs.key and mine.computed
        assert read_table(Path(mine.path), table).equals(read_table(theirs.path, table)), table

    again = method_sweep.run_method_sweep(shared, splan, progress=False)
    assert again.loads == 0 and len(loads) == 1 and not any(r.computed for r in again.results())
    assert method_sweep.is_swept(shared, splan)
    shutil.rmtree(swept.generate[1].path)
    assert not method_sweep.is_swept(shared, splan)
    rebuilt = method_sweep.run_method_sweep(shared, splan, progress=False)
    assert rebuilt.loads == 1 and [r.computed for r in rebuilt.results()] == [False, False, True] + [False] * (len(alphas) - 1)
