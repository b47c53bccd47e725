"""`features: cached` needs only the LM's output layer: the backbone is neither moved to the
training device nor needed at all.

The trainee moves what its features read: the whole LM for `features: backbone`, the output layer
alone for `features: cached` (checked on the "meta" device, which any CPU has). And a head trains
from the cache exactly as before when the backbone's weights were never loaded
(`loading.load_output_layer_only`, what the train stage loads for `features: cached`).
"""

from __future__ import annotations

import pytest
import torch

from alignheads.config import CALMTrainConfig, IAVTrainConfig, RefPassConfig
from alignheads.loading import load_causal_lm, load_output_layer_only
from alignheads.models.methods import method
from alignheads.tasks.training.batches import PairStream
from alignheads.tasks.training.loop import TrainJob, train
from tests.helpers.tiny_models import tiny_llama
from tests.helpers.word_pairs import pair_store


def _devices(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_cached_features_move_only_the_output_layer(kind):
    cfg = (IAVTrainConfig if kind == "iav" else CALMTrainConfig)(features="cached")
    model = tiny_llama(tied=False)
    trainee = method(kind).trainee(model, cfg, "meta")
    assert _devices(model.lm_head) == {"meta"} and _devices(trainee.module) == {"meta"}
    assert _devices(model.model) == {"cpu"}  # the backbone stayed where it was

    backbone = (IAVTrainConfig if kind == "iav" else CALMTrainConfig)(features="backbone")
    model = tiny_llama(tied=False)
    method(kind).trainee(model, backbone, "meta")
    assert _devices(model) == {"meta"}  # it runs every step: all of it is moved


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rcfg = RefPassConfig(k=16, store_hidden=True, pairs_per_shard=24, batch_size=16)
    return pair_store(tmp_path_factory.mktemp("cached"), tiny_llama(tied=False), rcfg, n_train=32)


def _history(store, kind: str, model, tmp_path) -> list[dict]:
    cfg = (IAVTrainConfig if kind == "iav" else CALMTrainConfig)(
        features="cached", batch_size=8, max_steps=3, lr=1e-2, eval_every=3, warmup_ratio=0.0
    )
    entry = method(kind)
    needs, _ = entry.batches(cfg)
    job = TrainJob(
        method=entry,
        cfg=cfg,
        model=model,
        train=PairStream(store.refpass, store.tokenize, "train", needs),
        eval=PairStream(store.refpass, store.tokenize, "test", needs),
        checkpoint_dir=tmp_path / "ckpt",
        pad_id=0,
        progress=False,
    )
    result = train(job)
    return result.history + [result.eval_metrics]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_a_head_trains_from_the_cache_with_its_backbone_never_loaded(store, tmp_path, kind):
    """The LM as the train stage loads it for `features: cached` (only the output layer read from
    the checkpoint, the backbone on "meta" with no storage) trains the same head, step for step,
    as the fully loaded LM."""
    loaded = load_causal_lm(str(store.model_dir))
    unloaded = load_output_layer_only(str(store.model_dir))
    assert _devices(unloaded.model) == {"meta"} and _devices(unloaded.lm_head) == {"cpu"}
    want = _history(store, kind, loaded, tmp_path / "loaded")
    got = _history(store, kind, unloaded, tmp_path / "unloaded")
    assert len(got) == 4 and got == want
    assert _devices(unloaded.model) == {"meta"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_the_train_stage_reads_only_the_output_layer_for_cached_features(store, tmp_path, kind):
    """The train stage's job for `features: cached` holds the LM with its backbone on "meta"
    (only `lm_head` read from the safetensors), and its artifact's head is the one the fully
    loaded LM trains, tensor for tensor; `features: backbone` still loads the whole LM."""
    from safetensors.torch import load_file

    from alignheads.tasks.train import make_job, plan_train, run_train

    settings = {"batch_size": 8, "max_steps": 3, "lr": 1e-2, "eval_every": 3, "warmup_ratio": 0.0}
    cls = IAVTrainConfig if kind == "iav" else CALMTrainConfig
    source = {"name_or_path": str(store.model_dir)}
    plan = plan_train(kind, cls(features="cached", **settings), store.refpass, source)
    job = make_job(plan, tmp_path / "ckpt", progress=False)
    assert _devices(job.model.model) == {"meta"} and _devices(job.model.lm_head) == {"cpu"}
    backbone = make_job(
        plan_train(kind, cls(**settings), store.refpass, source), tmp_path / "b", progress=False
    )
    assert _devices(backbone.model) == {"cpu"}

    built = run_train(store.store, plan, progress=False)
    saved = load_file(built.path / "head" / "head_model.safetensors")
    whole = TrainJob(  # the same plan's training with the LM loaded whole
        method=plan.method, cfg=plan.settings, model=load_causal_lm(str(store.model_dir)),
        train=job.train, eval=job.eval, checkpoint_dir=tmp_path / "whole", pad_id=0, progress=False,
    )  # fmt: skip
    want = train(whole).trained.state_dict()
    assert set(saved) == set(want)
    for name, value in want.items():
        assert torch.equal(saved[name], value), name
