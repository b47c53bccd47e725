"""`features: cached` needs only the LM's output layer: the backbone is neither moved to the
training device nor needed at all.

The trainee moves what its features read: the whole LM for `features: backbone`, the output layer
alone for `features: cached` (checked on the "meta" device, which any CPU has). And a head trains
from the cache exactly as before when the backbone's weights were never loaded (left on "meta").
"""

from __future__ import annotations

import pytest
import torch

from alignheads.config import CALMTrainConfig, IAVTrainConfig, RefPassConfig
from alignheads.loading import load_causal_lm
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
    """The backbone's weights on "meta" (no storage: what a loader that reads only the output
    layer gives) train the same head, step for step, as the fully loaded LM."""
    loaded = load_causal_lm(str(store.model_dir))
    unloaded = load_causal_lm(str(store.model_dir))
    unloaded.model.to("meta")
    assert _devices(unloaded.model) == {"meta"} and _devices(unloaded.lm_head) == {"cpu"}
    want = _history(store, kind, loaded, tmp_path / "loaded")
    got = _history(store, kind, unloaded, tmp_path / "unloaded")
    assert len(got) == 4 and got == want
    assert _devices(unloaded.model) == {"meta"}
