"""What every method owes its reference, over real reference caches built by the real stages.

* A fresh head (and DeRa's fresh DPO model) IS the reference: DPO loss ``ln 2`` and held-out
  accuracy 0.5 at α = 0, whichever features it trains on (`features: backbone | cached`) and on a
  model that soft-caps its final logits (a tiny Gemma-2, cap 3), whose training logits must also
  be the ones decoding samples from.
* IAV's base head stays the LM's own ``lm_head`` when the reference is the LM: α = 0 is the LM
  exactly after training; only against another reference model does W_b train.
* Held-out scoring has one margin for every method, and the baselines fine-tune without dropout.

Stores are built once per module: a tiny model + word-level tokenizer on disk, JSONL pairs whose
chosen responses use one block of words and rejected another, then the data, tokenize and
reference-pass stages.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from alignheads.config import (
    CALMTrainConfig,
    ConfigError,
    DPOTrainConfig,
    GenARMTrainConfig,
    IAVTrainConfig,
    RefPassConfig,
)
from alignheads.loading import load_causal_lm
from alignheads.models import AlignedLM
from alignheads.models.dera import dera_logits
from alignheads.models.features import backbone_features, gather_time
from alignheads.models.head_io import load_head
from alignheads.models.losses import exact_kl, preference_accuracy, topk_sampled_kl
from alignheads.models.method_impls import LoadedHead, LoadedLM
from alignheads.models.methods import method
from alignheads.models.objectives import IAV_TERMS, BatchNeeds, response_logps
from alignheads.storage.manifest import ArtifactError
from alignheads.tasks.train import kl_reference_model, make_job, plan_train, resolve_base_head
from alignheads.tasks.training.batches import PairStream, _cache_columns, collate
from alignheads.tasks.training.loop import TrainJob, train
from tests.helpers.tiny_models import VOCAB, randomise, tiny_gemma2, tiny_llama
from tests.helpers.word_pairs import pair_store

pytestmark = pytest.mark.slow

LN2 = math.log(2)


def _build_store(root: Path, model, reference=None, tail_draws: int = 0) -> dict:
    """The run's model saved under root/model (and a reference model under root/reference when
    given), data, tokenize and a refpass with top-k (float32), hidden states (default dtype) and
    `tail_draws` draws per token from the reference outside its top k."""
    rcfg = RefPassConfig(
        k=16, dtype="float32", store_hidden=True, pairs_per_shard=24, batch_size=16, tail_draws=tail_draws
    )
    built = pair_store(root, model, rcfg, n_train=32, reference=reference)
    return {"model_dir": built.model_dir, "tokenize": built.tokenize, "refpass": built.refpass}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build_store(tmp_path_factory.mktemp("llama"), tiny_llama(tied=False))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A tiny Gemma-2 whose forward soft-caps its final logits at 3."""
    return _build_store(tmp_path_factory.mktemp("gemma"), tiny_gemma2(cap=3.0))


@pytest.fixture(scope="module")
def other_reference(tmp_path_factory):
    """The tiny Llama trained against another tiny Llama (same tokenizer) as the reference."""
    return _build_store(
        tmp_path_factory.mktemp("other"), tiny_llama(tied=False), reference=tiny_llama(tied=False, seed=5)
    )


@pytest.fixture(scope="module")
def other_reference_drawn(tmp_path_factory):
    """As `other_reference`, with 32 tail draws per token in the cache (`kl: sampled`)."""
    return _build_store(
        tmp_path_factory.mktemp("drawn"), tiny_llama(tied=False), reference=tiny_llama(tied=False, seed=5),
        tail_draws=32,
    )  # fmt: skip


def _model(store: dict):
    return load_causal_lm(str(store["model_dir"]))


def _batches(store: dict, needs: BatchNeeds, with_sequences: bool, split: str = "test", micro: int = 8):
    stream = PairStream(store["refpass"], store["tokenize"], split, needs)
    for _, records in stream.micro_batches(micro, seed=None, drop_last=False):
        yield collate(records, needs, with_sequences, 0)


def _all_needs(store: dict, split: str = "test"):
    """Batches carrying everything (top-k, hidden states and token ids): any method can read them."""
    return list(_batches(store, BatchNeeds(topk=True, hidden=True), True, split))


def _job(store: dict, kind: str, cfg, tmp_path: Path, model=None) -> TrainJob:
    entry = method(kind)
    needs, _ = entry.batches(cfg)
    return TrainJob(
        method=entry,
        cfg=cfg,
        model=model if model is not None else _model(store),
        train=PairStream(store["refpass"], store["tokenize"], "train", needs),
        eval=PairStream(store["refpass"], store["tokenize"], "test", needs),
        checkpoint_dir=tmp_path / "ckpt",
        pad_id=0,
        progress=False,
    )


def _head_cfg(kind: str, **overrides):
    if kind == "calm":
        return CALMTrainConfig(rank=8, **overrides)
    return IAVTrainConfig(**overrides)


def _fresh_head_at_the_reference(store: dict, kind: str, cfg) -> None:
    """A fresh head: the loss's DPO term (and IAV's total) and the held-out DPO loss (α = 1) are
    ln 2 to 1e-6; held-out accuracy 0.5 at α = 0 and 1."""
    model = _model(store)
    entry = method(kind)
    trainee = entry.trainee(model, cfg, "cpu")
    loaded = LoadedHead(trainee.module, model)
    margins: dict[float, list] = {0.0: [], 1.0: []}
    batches = _all_needs(store)
    assert len(batches) == 2
    with torch.no_grad():
        for batch in batches:
            loss = trainee.objective(trainee.module, trainee.tokens(batch), batch).loss
            assert loss.pref.item() == pytest.approx(LN2, abs=1e-6)  # the loss's DPO term
            if kind == "iav":  # KL (to the reference itself) and L2 (of W_a = 0) add nothing
                step = trainee.loss(trainee.step_module, batch)
                assert step.loss.item() == pytest.approx(LN2, abs=1e-6)
            assert trainee.eval_dpo(trainee.module, batch).losses.mean().item() == pytest.approx(
                LN2, abs=1e-6
            )
            for alpha, m in entry.score(loaded, batch, [0.0, 1.0], cfg).items():
                margins[alpha].append(m)
    for alpha, m in margins.items():
        assert preference_accuracy(torch.cat(m)) == 0.5, alpha


# --- (2) final-logit soft-capping ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "kl", "features"),
    [
        ("iav", "topk", "backbone"),
        ("iav", "exact", "backbone"),
        ("iav", "topk", "cached"),
        ("calm", None, "backbone"),
        ("calm", None, "cached"),
    ],
)
def test_a_fresh_head_on_a_softcapped_gemma2_is_the_reference(gemma, kind, kl, features):
    """Gemma-2 caps its final logits (cap · tanh(z / cap)) in the reference pass and in decoding;
    the heads' training logits once were not capped, so a fresh IAV head's DPO loss was 0.525,
    not ln 2, and the held-out scoring compared capped with uncapped log-probs."""
    extra = {"kl": kl} if kl else {}
    _fresh_head_at_the_reference(gemma, kind, _head_cfg(kind, features=features, **extra))


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_training_logits_on_a_softcapped_gemma2_are_what_decoding_samples_from(gemma, kind):
    """A non-trivial head's log-probs as training sees them (the held-out DPO rewards at α, the
    policy inside the loss, the trainee's logits) are those of the model's own forward with the
    head installed (what `generate` samples from: transformers caps what the replaced lm_head
    returns)."""
    model = _model(gemma)
    cfg = _head_cfg(kind, lambda_nll=0.0)
    trainee = method(kind).trainee(model, cfg, "cpu")
    randomise(trainee.module)
    batch = _all_needs(gemma, "train")[0]
    b, mask = batch.n_pairs, batch.mask
    with torch.no_grad():
        for alpha in (0.0, 1.0, 2.5):
            aligned = AlignedLM(model, trainee.module, alpha=alpha)
            try:
                full = aligned(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            finally:
                aligned.remove()
            decoded = gather_time(full, batch.gather_index)
            assert decoded.abs().max() <= 3.0  # the forward capped them
            rewards = cfg.beta * (response_logps(decoded, batch) - batch.ref_logps)
            held_out = trainee.eval_dpo(trainee.module, batch, alpha)
            torch.testing.assert_close(held_out.chosen_rewards, rewards[:b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(held_out.rejected_rewards, rewards[b:], atol=1e-5, rtol=1e-5)
            if alpha == 1.0:  # the loss's policy is the decoded one too
                dpo = trainee.objective(trainee.module, trainee.tokens(batch), batch).loss.dpo
                torch.testing.assert_close(dpo.chosen_rewards, rewards[:b], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(dpo.rejected_rewards, rewards[b:], atol=1e-5, rtol=1e-5)
            trained = trainee.logits(trainee.module, batch, alpha)
            torch.testing.assert_close(trained[mask], decoded[mask], atol=1e-5, rtol=1e-5)


def test_a_fresh_dpo_baseline_on_a_softcapped_gemma2_is_the_reference(gemma):
    """`response_logits` (the baselines' training and scoring logits) applies the model's cap: a
    fresh DPO model (a copy of the reference) starts at ln 2, and DeRa scores 0.5 at α = 0 and 1."""
    cfg = DPOTrainConfig()
    trainee = method("dpo-dera").trainee(_model(gemma), cfg, "cpu")
    loaded = LoadedLM(_model(gemma), _model(gemma), dera_logits)
    margins: dict[float, list] = {0.0: [], 1.0: []}
    with torch.no_grad():
        for batch in _batches(gemma, trainee.needs, True):
            assert trainee.eval_dpo(trainee.module, batch).losses.mean().item() == pytest.approx(
                LN2, abs=1e-6
            )
            for alpha, m in method("dpo-dera").score(loaded, batch, [0.0, 1.0], cfg).items():
                margins[alpha].append(m)
    for alpha, m in margins.items():
        assert preference_accuracy(torch.cat(m)) == 0.5, alpha


# --- (3) cached features are the backbone's ---------------------------------------------------------


@pytest.mark.parametrize("features", ["backbone", "cached"])
@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_a_fresh_head_is_the_reference_with_either_features(llama, kind, features):
    """The cache once held float16 hidden states while its reference log-probs came from the float32
    ones: with `features: cached` a fresh IAV head's DPO loss was 5.9e-5 off ln 2, and a fresh CALM
    head (the reference itself at α = 0) scored a held-out accuracy of 0.41."""
    _fresh_head_at_the_reference(llama, kind, _head_cfg(kind, features=features))


def test_cached_features_are_the_backbone_states(llama):
    """The hidden states a batch reads from the cache equal the ones the backbone computes for it
    (float32, up to the kernels' rounding of differently padded batches)."""
    from alignheads.models.features import cached_features

    model = _model(llama)
    for batch in _all_needs(llama):
        fresh, _ = backbone_features(model.base_model, batch, False)
        cached, _ = cached_features(batch, False)
        torch.testing.assert_close(cached[batch.mask], fresh[batch.mask], atol=1e-5, rtol=1e-5)
        assert batch.hidden.dtype == torch.float32


# --- (4) IAV's base head ----------------------------------------------------------------------------


def test_iav_at_alpha_zero_is_still_the_lm_after_training(llama, tmp_path):
    """With the run's own model as the reference, W_b's only gradient (the KL to the same lm_head)
    is rounding noise, which AdamW once turned into full learning-rate steps: α = 0 drifted off
    the reference. Now W_b stays the lm_head, frozen, with no optimizer state, and after training
    IAV at α = 0 gives the LM's own logits exactly on the held-out batches."""
    cfg = IAVTrainConfig(
        batch_size=8, epochs=3, lr=3e-2, warmup_ratio=0.0, eval_every=100, checkpoint_every=4
    )
    job = _job(llama, "iav", cfg, tmp_path)
    result = train(job)
    assert result.eval_metrics["eval/rewards/accuracies"] >= 0.9  # the head did learn
    assert result.trained.align.weight.abs().max() > 0
    # the saved head loads as before (head_io), and at α = 0 it is the LM
    job.method.save(result.trainee, tmp_path / "head", job.model, {})
    loaded = load_head(tmp_path / "head", job.model)
    with torch.no_grad():
        for batch in _batches(llama, BatchNeeds(topk=False, hidden=False), True):
            ids, mask = batch.input_ids, batch.attention_mask
            own = job.model(input_ids=ids, attention_mask=mask).logits
            aligned = AlignedLM(job.model, loaded, alpha=0.0)
            try:
                at_zero = aligned(input_ids=ids, attention_mask=mask).logits
            finally:
                aligned.remove()
            assert torch.equal(at_zero, own)
    lm_head = job.model.get_output_embeddings()
    assert torch.equal(loaded.base.weight, lm_head.weight)
    assert torch.equal(result.trained.base.weight, lm_head.weight)
    assert not result.trained.base.weight.requires_grad
    # AdamW's state in the last checkpoint covers W_a alone
    last = sorted((tmp_path / "ckpt").glob("step-*"))[-1]
    with safe_open(str(last / "state.safetensors"), framework="pt") as fh:
        optimizer_params = {key.split(".")[1] for key in fh.keys() if key.startswith("optimizer.")}  # noqa: SIM118
    assert optimizer_params == {"0"}


def test_the_plan_freezes_w_b_for_the_own_model_and_trains_it_for_another(llama, other_reference):
    """`base_head: auto` is resolved from the reference cache's config and enters the train key."""
    source = {"name_or_path": str(llama["model_dir"])}
    own = plan_train("iav", IAVTrainConfig(), llama["refpass"], source)
    assert own.train["base_head"] == own.config["base_head"] == "frozen"
    assert plan_train("iav", IAVTrainConfig(base_head="frozen"), llama["refpass"], source).key == own.key
    assert plan_train("iav", IAVTrainConfig(base_head="trained"), llama["refpass"], source).key != own.key

    manifest = json.loads((other_reference["refpass"] / "manifest.json").read_text())
    reference = manifest["config"]["model"]
    assert reference["own"] is False and reference["run_model"]["kind"] == "dir"
    own_reference = json.loads((llama["refpass"] / "manifest.json").read_text())["config"]["model"]
    assert own_reference["own"] is True and own_reference["run_model"] is None
    other_source = {"name_or_path": str(other_reference["model_dir"])}
    other = plan_train("iav", IAVTrainConfig(), other_reference["refpass"], other_source)
    assert other.train["base_head"] == "trained"
    assert other.settings.base_head == "trained"  # what the (launched) trainee is built from
    # the exact KL to another reference reads its hidden states, which this cache holds
    exact = plan_train("iav", IAVTrainConfig(kl="exact"), other_reference["refpass"], other_source)
    assert exact.kl_reference == {
        "name_or_path": str(other_reference["refpass"].parent.parent.parent / "reference"),
        "revision": None,
        "dtype": "float32",
        "trust_remote_code": False,
    }
    assert exact.key != other.key and exact.settings.base_head == "trained"
    assert other.kl_reference is None and own.kl_reference is None
    assert plan_train("iav", IAVTrainConfig(kl="exact"), llama["refpass"], source).kl_reference is None
    # that cache holds the reference's hidden states, not the run model's: no head trains on them
    for kind, settings in (("iav", IAVTrainConfig(features="cached")), ("calm", CALMTrainConfig(features="cached"))):
        with pytest.raises(ConfigError, match=r"features is 'cached' .* another reference model"):
            plan_train(kind, settings, other_reference["refpass"], other_source)
    assert plan_train("iav", IAVTrainConfig(features="cached"), llama["refpass"], source).settings.features == "cached"
    # CALM has no W_b: its settings are not touched
    assert "base_head" not in plan_train("calm", CALMTrainConfig(), llama["refpass"], source).train


def test_exact_kl_against_another_reference_needs_its_hidden_states(llama):
    """A cache of another reference model without hidden states cannot give the exact KL to it:
    one line that says what to set (the manifest is all `kl_reference_model` reads of the cache)."""
    source = {"name_or_path": str(llama["model_dir"])}
    cache = SimpleNamespace(config={"model": {"own": False}, "store_hidden": False},
                            info={"model": "ref", "vocab_size": VOCAB})  # fmt: skip
    # a ConfigError: the command line and the Prefect UI show it as one line (flows.failures)
    with pytest.raises(ConfigError, match=r"kl is 'exact' .* set refpass.store_hidden: true, or use kl: topk"):
        kl_reference_model(IAVTrainConfig(kl="exact"), cache, "store/refpass/k", source, "iav")
    assert kl_reference_model(IAVTrainConfig(kl="topk"), cache, "store/refpass/k", source, "iav") is None
    assert resolve_base_head(IAVTrainConfig(kl="topk"), cache.config).base_head == "trained"
    hidden = SimpleNamespace(config=cache.config | {"store_hidden": True}, info=cache.info)
    assert kl_reference_model(IAVTrainConfig(kl="exact"), hidden, "store/refpass/k", source, "iav")["name_or_path"] == "ref"
    # the cache's reader says the same, should a cache without the column reach it
    schema = pa.schema([("pair_index", pa.int64())])
    with pytest.raises(ArtifactError, match="kl: exact against another reference model needs hidden states"):
        _cache_columns(BatchNeeds(topk=False, hidden=False, reference_hidden=True), schema)


def test_exact_kl_against_another_reference_needs_the_same_vocabulary(llama):
    """The two output layers must score the same tokens: a reference with more rows is refused in
    one line (the manifest is all `kl_reference_model` reads of the cache)."""
    source = {"name_or_path": str(llama["model_dir"])}
    cache = SimpleNamespace(config={"model": {"own": False}, "store_hidden": True},
                            info={"model": "ref", "vocab_size": VOCAB + 8})  # fmt: skip
    with pytest.raises(ConfigError, match=rf"{VOCAB + 8} rows against the run model's {VOCAB}"):
        kl_reference_model(IAVTrainConfig(kl="exact"), cache, "store/refpass/k", source, "iav")
    same = SimpleNamespace(config={"model": {"own": False}, "store_hidden": True, "model_dtype": "float32"},
                           info={"model": "ref", "revision": "r1", "vocab_size": VOCAB})  # fmt: skip
    assert kl_reference_model(IAVTrainConfig(kl="exact"), same, "store/refpass/k", source, "iav") == {
        "name_or_path": "ref", "revision": "r1", "dtype": "float32", "trust_remote_code": False,
    }  # fmt: skip
    assert kl_reference_model(IAVTrainConfig(kl="topk"), same, "store/refpass/k", source, "iav") is None


def test_exact_kl_to_another_reference_is_that_models_kl(other_reference, tmp_path):
    """`kl: exact` against another reference model: the train job loads the reference's output
    layer (`loading.load_output_layer_only`), and the KL each scored token adds is
    KL(p_ref ‖ softmax(W_b h)) with p_ref from the reference model's own full forward, to float
    rounding; training W_b on it lowers that KL."""
    other_source = {"name_or_path": str(other_reference["model_dir"])}
    plan = plan_train(
        "iav", IAVTrainConfig(kl="exact", batch_size=8, epochs=2, max_steps=6, lr=1e-2, eval_every=100),
        other_reference["refpass"], other_source,
    )  # fmt: skip
    job = make_job(plan, tmp_path / "ckpt", progress=False)
    assert job.kl_reference is not None and job.kl_reference.cap is None
    reference_model = load_causal_lm(plan.kl_reference["name_or_path"])
    assert torch.equal(job.kl_reference.layer.weight, reference_model.get_output_embeddings().weight)
    trainee = job.method.trainee(job.model, plan.settings, "cpu", kl_reference=job.kl_reference)
    assert trainee.needs == BatchNeeds(topk=False, hidden=False, reference_hidden=True)
    _, records = next(iter(job.train.micro_batches(8, seed=None, drop_last=False)))
    batch = collate(records, trainee.needs, trainee.with_sequences, 0)
    with torch.no_grad():
        result = trainee.objective(trainee.module, trainee.tokens(batch), batch)
        kl = result.terms[..., IAV_TERMS.index("kl")][batch.mask]
        ids, mask = batch.input_ids, batch.attention_mask
        ref_logits = gather_time(reference_model(input_ids=ids, attention_mask=mask).logits, batch.gather_index)
        run_logits = gather_time(job.model(input_ids=ids, attention_mask=mask).logits, batch.gather_index)
        expected = exact_kl(ref_logits, run_logits)[batch.mask]  # W_b starts at the run model's lm_head
    assert kl.shape == expected.shape and expected.min() > 0
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=1e-5)
    trained = train(job)
    assert trained.steps == 6 and trained.trained.base.weight.requires_grad
    with torch.no_grad():  # the same batch's KL, after W_b trained on the KL to the reference
        after = trained.trainee.objective(trained.trained, trained.trainee.tokens(batch), batch)
        kl_after = after.terms[..., IAV_TERMS.index("kl")][batch.mask]
    assert kl_after.mean() < 0.95 * kl.mean()


def test_sampled_kl_reads_the_caches_tail_draws_and_is_the_exact_kl_on_average(
    llama, other_reference_drawn, tmp_path
):
    """`kl: sampled` against another reference: each token's KL is `losses.topk_sampled_kl` of the
    cache's top k and tail draws; averaged over a batch's tokens it is the exact KL (the reference
    model's own forward) within the draws' noise (4 standard errors of the mean); W_b trained on it
    comes closer to the reference. Without tail draws in the cache the plan refuses it in one line."""
    with pytest.raises(ConfigError, match=r"kl is 'sampled' .* no tail draws: set refpass.tail_draws"):
        plan_train("iav", IAVTrainConfig(kl="sampled"), llama["refpass"], {"name_or_path": str(llama["model_dir"])})
    store = other_reference_drawn
    plan = plan_train(
        "iav", IAVTrainConfig(kl="sampled", batch_size=8, epochs=2, max_steps=6, lr=1e-2, eval_every=100),
        store["refpass"], {"name_or_path": str(store["model_dir"])},
    )  # fmt: skip
    assert plan.kl_reference is None and plan.settings.base_head == "trained"
    job = make_job(plan, tmp_path / "ckpt", progress=False)
    trainee = job.method.trainee(job.model, plan.settings, "cpu")
    assert trainee.needs == BatchNeeds(topk=True, hidden=False, tail=True)
    _, records = next(iter(job.train.micro_batches(8, seed=None, drop_last=False)))
    batch = collate(records, trainee.needs, trainee.with_sequences, 0)
    assert batch.ref_tail_ids.shape == (*batch.mask.shape, 32)
    reference_model = load_causal_lm(str(store["refpass"].parent.parent.parent / "reference"))
    with torch.no_grad():
        result = trainee.objective(trainee.module, trainee.tokens(batch), batch)
        kl = result.terms[..., IAV_TERMS.index("kl")][batch.mask]
        ids, mask = batch.input_ids, batch.attention_mask
        run_logits = gather_time(job.model(input_ids=ids, attention_mask=mask).logits, batch.gather_index)
        m = batch.mask
        want = topk_sampled_kl(
            batch.ref_topk_ids[m], batch.ref_topk_logprobs[m], batch.ref_tail_ids[m], batch.ref_tail_logprobs[m],
            run_logits[m],
        )  # fmt: skip
        ref_logits = gather_time(reference_model(input_ids=ids, attention_mask=mask).logits, batch.gather_index)
        exact = exact_kl(ref_logits, run_logits)[m]
    torch.testing.assert_close(kl, want, atol=1e-5, rtol=1e-5)
    diff = (kl - exact).double()
    assert exact.mean() > 0.1 and abs(diff.mean()) <= 4 * diff.std() / len(diff) ** 0.5
    trained = train(job)
    with torch.no_grad():
        after = trained.trainee.objective(trained.trained, trained.trainee.tokens(batch), batch)
    assert after.terms[..., IAV_TERMS.index("kl")][m].mean() < 0.95 * kl.mean()


def test_w_b_trains_against_another_reference_model(other_reference, tmp_path):
    other_source = {"name_or_path": str(other_reference["model_dir"])}
    cfg = plan_train(
        "iav", IAVTrainConfig(batch_size=8, max_steps=4, lr=1e-2, eval_every=100), other_reference["refpass"],
        other_source,
    ).settings  # fmt: skip
    job = _job(other_reference, "iav", cfg, tmp_path)
    result = train(job)
    head = result.trained
    assert head.base.weight.requires_grad
    assert not torch.equal(head.base.weight, job.model.get_output_embeddings().weight)
    assert math.isfinite(result.final_metrics["kl"]) and result.final_metrics["kl"] > 0


# --- (7a) one held-out margin for every method --------------------------------------------------------


def test_a_head_and_a_baseline_decoding_the_same_distribution_get_the_same_margins(llama):
    """IAV with W_a = D and a DPO model whose lm_head is the base's + D decode the same π at α = 1
    (and both are the base at α = 0), so held-out scoring must give them the same margins: the
    heads once scored β-scaled margins (10x smaller at β = 0.1, so more ties under the 1e-4
    threshold) and the baselines unscaled ones."""
    model = _model(llama)
    cfg = IAVTrainConfig()
    head = method("iav").trainee(model, cfg, "cpu").module
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(head.align.weight.shape, generator=gen) * 0.05
    with torch.no_grad():
        head.align.weight.copy_(delta)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.get_output_embeddings().weight.add_(delta)
    head_loaded = LoadedHead(head, model)
    lm_loaded = LoadedLM(model, tuned, dera_logits)
    for batch in _all_needs(llama):
        head_m = method("iav").score(head_loaded, batch, [0.0, 1.0], cfg)
        lm_m = method("dpo-dera").score(lm_loaded, batch, [0.0, 1.0], DPOTrainConfig())
        assert head_m[1.0].abs().min() > 1e-3  # non-trivial margins
        for alpha in (0.0, 1.0):
            torch.testing.assert_close(head_m[alpha], lm_m[alpha], atol=2e-5, rtol=1e-4)
        # the definition: unscaled log-ratio margins (log π_α − log π_ref), chosen minus rejected
        with torch.no_grad():
            hidden, _ = backbone_features(model.base_model, batch, False)
            rewards = response_logps(head.logits(hidden, 1.0), batch) - batch.ref_logps
        b = batch.n_pairs
        torch.testing.assert_close(head_m[1.0], (rewards[:b] - rewards[b:]).double(), atol=2e-5, rtol=1e-4)


# --- (7b) baselines fine-tune without dropout ------------------------------------------------------


def _dropout_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=0.5,  # applied functionally by the attention in training mode
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def _dropout_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5,  # nn.Dropout modules
    )  # fmt: skip
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    "build", [_dropout_llama, _dropout_gpt2], ids=["llama-attention-dropout", "gpt2-dropout"]
)
@pytest.mark.parametrize("kind", ["dpo-dera", "genarm"])
def test_baselines_fine_tune_with_dropout_off(llama, build, kind):
    """TRL's trainers turn dropout off by default; the baselines once trained with it on
    (LMTrainee put the model in training mode), so the same batch gave a different loss each time.
    Now training mode computes what evaluation mode does, for a model whose config has dropout."""
    model = build()
    config_before = model.config.to_dict()
    settings = DPOTrainConfig() if kind == "dpo-dera" else GenARMTrainConfig()
    trainee = method(kind).trainee(model, settings, "cpu")
    assert trainee.module.training  # the loop's mode
    batch = next(_batches(llama, trainee.needs, True, "train"))
    first = trainee.loss(trainee.module, batch).loss
    second = trainee.loss(trainee.module, batch).loss
    assert torch.equal(first, second)
    with torch.no_grad():
        trainee.module.eval()
        evaluated = trainee.loss(trainee.module, batch).loss
        trainee.module.train()
    torch.testing.assert_close(first.detach(), evaluated, atol=1e-6, rtol=0)
    assert trainee.module.config.to_dict() == config_before  # a saved checkpoint keeps its settings


@pytest.mark.parametrize("kind", ["iav", "calm"])
def test_recorded_kl_on_a_softcapped_model_is_between_the_capped_distributions(kind):
    """Decoding records KL(π_α ‖ π_base) per generated token: on a soft-capped Gemma-2 both
    distributions are the capped ones the model samples from, not the raw head outputs."""
    from alignheads.models import AlignedLM
    from alignheads.models.head_base import soft_cap
    from alignheads.models.losses import exact_kl
    from tests.helpers.tiny_models import make_head, randomise, tiny_gemma2

    model = tiny_gemma2(cap=3.0)
    head = randomise(make_head(kind, model), seed=3)
    aligned = AlignedLM(model, head, alpha=1.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), aligned.recording() as recorder:
        out = aligned.model(input_ids=ids)
    recorded = recorder.stacked()["kl_to_base"][:, 0]
    with torch.no_grad(), aligned.original_lm() as lm:
        base = lm(input_ids=ids).logits  # the model's own forward: capped
    want = exact_kl(out.logits[:, -1], base[:, -1])  # both capped by the model's forward
    assert torch.allclose(recorded, want, atol=1e-6, rtol=0)
    from alignheads.models.context import token_context

    with torch.no_grad():  # what was recorded before: the raw (uncapped) head and lm_head outputs
        hidden = aligned.backbone(input_ids=ids).last_hidden_state
        ctx = token_context(hidden, torch.ones_like(ids)) if head.needs_token_context else None
        raw_logits = head(hidden, frozen_head=aligned.frozen_head, context=ctx).logits(1.5)
        raw = exact_kl(raw_logits[:, -1], aligned.frozen_head(hidden)[:, -1])
    assert not torch.allclose(raw, want, atol=1e-3)  # the cap matters at these logits
    assert torch.allclose(soft_cap(raw_logits, 3.0)[:, -1], out.logits[:, -1], atol=1e-5)
