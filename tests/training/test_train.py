"""Head training over a real reference cache, built by the real stages on a tiny model.

The store is made once per module: a tiny Llama + word-level tokenizer saved to disk, JSONL
pairs in which chosen responses use one block of words and rejected responses another,
then the data, tokenize and reference-pass stages. Training runs through the one training
loop (`train`) on streams of that cache, as the train stage does, for heads and baselines.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignheads.config import (
    CALMTrainConfig,
    IAVTrainConfig,
    RefPassConfig,
)
from alignheads.loading import load_causal_lm
from alignheads.models.methods import method
from alignheads.tasks.training.batches import PairStream
from alignheads.tasks.training.loop import NonFiniteError, TrainJob, train
from tests.helpers.tiny_models import tiny_llama
from tests.helpers.word_pairs import pair_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(store, model dir, tokenize dir, refcache dir) with top-k and hidden states cached."""
    rcfg = RefPassConfig(k=16, store_hidden=True, pairs_per_shard=24, batch_size=16)
    built = pair_store(tmp_path_factory.mktemp("train"), tiny_llama(tied=False), rcfg)
    return built.store, built.model_dir, built.tokenize, built.refpass


def _job(store, cfg, tmp_path, kind="iav", model=None, log=None) -> TrainJob:
    _, model_dir, tok_dir, ref_dir = store
    entry = method(kind)
    needs, _ = entry.batches(cfg)
    return TrainJob(
        method=entry,
        cfg=cfg,
        model=model if model is not None else load_causal_lm(str(model_dir)),
        train=PairStream(ref_dir, tok_dir, "train", needs),
        eval=PairStream(ref_dir, tok_dir, "test", needs),
        checkpoint_dir=tmp_path / "ckpt",
        pad_id=0,
        log=log or (lambda m, s: None),
        progress=False,
    )


def launched(store, cfg, tmp_path, processes: int) -> dict:
    """Train IAV with `cfg` through `accelerate launch` over `processes` CPU processes (gloo), as
    the train stage does for `num_processes > 1`; the head lands in tmp_path/out/head. Returns
    the run's result.json."""
    import dataclasses
    import os
    import subprocess

    from alignheads.tasks.train import launch_command, plan_train

    _, model_dir, _, ref_dir = store
    plan = plan_train("iav", cfg, ref_dir, {"name_or_path": str(model_dir)})
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(dataclasses.asdict(plan)))
    cmd = launch_command(plan_file, tmp_path / "out", tmp_path / "ckpt2", processes) + ["--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "out" / "result.json").read_text())


def _params(head) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def test_iav_learns_the_preference_and_leaves_the_backbone_alone(store, tmp_path):
    cfg = IAVTrainConfig(batch_size=8, epochs=4, lr=3e-2, eval_every=8, warmup_ratio=0.0)
    job = _job(store, cfg, tmp_path)
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    logged: list[tuple[int, dict]] = []
    job.log = lambda m, s: logged.append((s, m))
    result = train(job)
    assert result.steps == 4 * (64 // 8)
    after = job.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen LM untouched
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    assert result.eval_metrics["eval/pairs"] == 16
    first = next(m for _, m in logged if "loss" in m)
    assert first["loss"] == pytest.approx(0.6931, abs=2e-3)  # ln 2 at initialisation (KL, L2 = 0)
    assert result.final_metrics["loss"] < first["loss"]
    names = set().union(*(m.keys() for _, m in logged))
    trl = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    assert trl | {"logps/chosen", "logps/rejected", "kl", "l2"} <= names
    # held-out metrics reach the sink at each evaluation, but not the constant size of the set
    assert "eval/rewards/accuracies" in names and "eval/pairs" not in names


def test_calm_learns_the_preference(store, tmp_path):
    cfg = CALMTrainConfig(batch_size=8, epochs=4, lr=3e-2, rank=8, eval_every=100, warmup_ratio=0.0)
    result = train(_job(store, cfg, tmp_path, kind="calm"))
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9
    assert {"strength/mean", "strength/std"} <= result.final_metrics.keys()


def test_resume_after_a_stop_equals_the_uninterrupted_run(store, tmp_path):
    cfg = IAVTrainConfig(batch_size=8, epochs=2, lr=1e-2, checkpoint_every=3, eval_every=100)
    full = train(_job(store, cfg, tmp_path / "full"))

    class Stop(Exception):
        pass

    def stop_at_5(metrics, step):
        if step == 5:
            raise Stop  # a kill after step 5; the last checkpoint is step 3

    with pytest.raises(Stop):
        train(_job(store, cfg, tmp_path / "cut", log=stop_at_5))
    resumed = train(_job(store, cfg, tmp_path / "cut"))
    assert resumed.resumed_from == 3 and resumed.steps == full.steps == 16
    a, b = _params(full.trained), _params(resumed.trained)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_one_big_batch(store, tmp_path):
    """4 micro-batches of 2 pairs give the gradient of one batch of 8 for the per-pair DPO
    mean (the token-weighted KL/L2 means are per micro-batch, so they are switched off)."""
    big = IAVTrainConfig(
        batch_size=8, grad_accum=1, max_steps=4, lr=1e-2, eval_every=100, lambda_kl=0, lambda_l2=0
    )
    acc = big.model_copy(update={"grad_accum": 4})
    a = _params(train(_job(store, big, tmp_path / "big")).trained)
    b = _params(train(_job(store, acc, tmp_path / "acc")).trained)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


def test_cached_features_give_the_backbone_mode_losses(store, tmp_path):
    backbone = IAVTrainConfig(batch_size=8, max_steps=3, lr=1e-2, eval_every=100, warmup_ratio=0.0)
    cached = backbone.model_copy(update={"features": "cached"})
    a = train(_job(store, backbone, tmp_path / "b")).history
    b = train(_job(store, cached, tmp_path / "c")).history
    for x, y in zip(a, b, strict=True):
        # bound set for float16 states; the fixture's cache now holds float32 ones (the default)
        assert x["loss"] == pytest.approx(y["loss"], abs=2e-3)


def test_calm_cached_features_give_the_backbone_mode_losses(store, tmp_path):
    """CALM from the cache (its hidden states, the float32 `prefix_hidden_sum` and the prompt
    length rebuilding the causal context mean and the true positions) trains like CALM on the
    backbone's own float32 states. The bounds below were set for float16 cached states; the
    fixture's cache holds float32 ones (`refpass.hidden_dtype`'s default), well inside them."""
    backbone = CALMTrainConfig(batch_size=8, max_steps=3, lr=1e-2, rank=8, eval_every=100, warmup_ratio=0.0)
    cached = backbone.model_copy(update={"features": "cached"})
    a = train(_job(store, backbone, tmp_path / "b", kind="calm")).history
    b = train(_job(store, cached, tmp_path / "c", kind="calm")).history
    assert len(a) == len(b) == 3
    # The two runs differ only in the response-position hidden states being rounded to float16
    # (relative error <= 2^-11 ~ 4.9e-4 per element; the prefix sums are float32). Through the
    # head and the context mean that moves the loss (~0.66) and the strengths (~2.3, s_max 5) by
    # ~3e-5 (measured), so the bounds are half a float16 ulp at those magnitudes: 2.5e-4 for the
    # loss (ulp 2^-11 in [0.5, 1)), 1e-3 for the strength statistics (ulp 2^-9 in [2, 4)).
    # A context built wrongly is far outside them: dropping the prefix sums moves strength/std
    # by ~0.2, counting one token too many by ~0.07.
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=2.5e-4)
        for name in ("strength/mean", "strength/std"):
            assert x[name] == pytest.approx(y[name], abs=1e-3), name


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(store, tmp_path):
    cfg = IAVTrainConfig(batch_size=8, max_steps=4, lr=1e-2, checkpoint_every=2, eval_every=100)
    job = _job(store, cfg.model_copy(update={"max_steps": 2}), tmp_path)
    train(job)
    poisoned = job.model
    with torch.no_grad():
        poisoned.model.norm.weight.fill_(float("nan"))  # the backbone now produces NaN
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3; .*step-000002"):
        train(_job(store, cfg, tmp_path, model=poisoned))
    assert (tmp_path / "ckpt" / "step-000002").is_dir()


def test_two_processes_equal_one_with_the_same_global_batch(store, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each takes 4 of the 8 pairs of a step,
    gradients are averaged, and the head ends where a single process with batch 8 ends."""
    from alignheads.models.head_io import load_head

    cfg = IAVTrainConfig(
        batch_size=8, max_steps=3, lr=1e-2, eval_every=100, lambda_kl=0, lambda_l2=0, warmup_ratio=0.0
    )
    single = _params(train(_job(store, cfg, tmp_path / "one")).trained)
    result = launched(store, cfg, tmp_path, processes=2)
    assert result["processes"] == 2 and result["steps"] == 3
    two = _params(load_head(tmp_path / "out" / "head"))
    for k in single:
        assert torch.allclose(single[k], two[k], atol=1e-5, rtol=0), k


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_bf16_model_trains_float32_heads(store, tmp_path, kind):
    """A bf16 LM (as 7B runs load it): the head keeps float32 master weights, bf16 autocast
    computes, and CALM's frozen bf16 lm_head gets hidden states of its own dtype."""
    _, model_dir, _, _ = store
    model = load_causal_lm(str(model_dir), dtype="bfloat16")
    cls = IAVTrainConfig if kind == "iav" else CALMTrainConfig
    cfg = cls(batch_size=8, max_steps=2, lr=1e-2, eval_every=2, mixed_precision="bf16")
    if kind == "iav":
        cfg = cfg.model_copy(update={"kl": "exact"})
    result = train(_job(store, cfg, tmp_path, kind=kind, model=model))
    assert result.steps == 2 and math.isfinite(result.final_metrics["loss"])
    assert all(p.dtype == torch.float32 for p in result.trained.parameters())
    assert 0.0 <= result.eval_metrics["eval/rewards/accuracies"] <= 1.0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_a_baseline_resumes_through_the_same_loop(store, tmp_path, tied):
    """The fine-tuned baselines train in the heads' loop: a DPO run stopped after step 5 resumes
    from its step-3 checkpoint (the whole LM, tied input/output embeddings saved once) and ends
    with the weights of the uninterrupted run."""
    from alignheads.config import DPOTrainConfig

    cfg = DPOTrainConfig(batch_size=8, epochs=1, lr=1e-3, checkpoint_every=3, eval_every=100)

    def lm():
        model = tiny_llama(tied=tied)
        if tied:  # (once untied here after other tests' threaded loads: see tests/test_loading.py)
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        return model

    full = train(_job(store, cfg, tmp_path / "full", kind="dpo-dera", model=lm()))

    class Stop(Exception):
        pass

    def stop_at_5(metrics, step):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(_job(store, cfg, tmp_path / "cut", kind="dpo-dera", model=lm(), log=stop_at_5))
    resumed = train(_job(store, cfg, tmp_path / "cut", kind="dpo-dera", model=lm()))
    assert resumed.resumed_from == 3 and resumed.steps == full.steps == 8
    a, b = _params(full.trained), _params(resumed.trained)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == full.history
    if tied:
        lm = resumed.trained
        assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
