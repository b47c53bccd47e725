"""The reference pass on a tiny Llama built on the fly: cached numbers equal a fresh forward's,
summed log-probs equal `sequence_logprobs`, top-k + tail KL is exact at k = V, a killed run
resumes with only the missing shards, and a cache built under other settings is never reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignheads.config import DataConfig, ModelConfig, RefPassConfig, SourceConfig, TokenizeConfig
from alignheads.models.losses import exact_kl, sequence_logprobs, topk_tail_kl
from alignheads.models.reference import load_reference, pack_batch
from alignheads.storage.fingerprint import tokenizer_fingerprint
from alignheads.storage.manifest import ArtifactError, verify_artifact
from alignheads.storage.query import run_query
from alignheads.storage.refcache import token_matrix, token_vector
from alignheads.storage.sharded_artifact import shard_path
from alignheads.storage.tables import read_table
from alignheads.tasks.data import plan_data, run_data
from alignheads.tasks.refpass import (
    RefPassPlan,
    check_refcache,
    finalize_refpass,
    plan_refpass,
    run_refpass,
    run_refpass_shard,
)
from alignheads.tasks.tokenize import plan_tokenize, run_tokenize

pytestmark = pytest.mark.slow

N_PAIRS = 20
PAIRS_PER_SHARD = 6  # 4 shards, the last one short


def _save_model(directory: Path, tokenizer, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than the default init, so the top-k holds real mass
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bos_tokenizer):
    """A tiny model dir, a store with data + tokenize artifacts, and the tokenizer's fingerprint."""
    root = tmp_path_factory.mktemp("refpass")
    model_dir = _save_model(root / "model", bos_tokenizer, seed=0)
    rows = [
        {
            "prompt": f"\n\nHuman: What is {i} plus {i % 7}?\n\nAssistant:",
            "chosen": f" It is {i + i % 7}.",
            "rejected": " Maybe 6, who cares." + " Stop asking me." * (i % 3),
        }
        for i in range(N_PAIRS)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = root / "store"
    fp = tokenizer_fingerprint(bos_tokenizer)
    train = SourceConfig(path=str(root / "pairs.jsonl"), limit=N_PAIRS // 2)
    # the same file as both splits: keep the held-out pairs that repeat training prompts
    both = DataConfig(train=train, test=train, train_overlap="keep")
    data = run_data(store, plan_data(both, None, None, fp), bos_tokenizer)
    tok = run_tokenize(
        store,
        plan_tokenize(TokenizeConfig(max_prompt_length=40, max_response_length=24), data.key, data.path, fp),
        bos_tokenizer,
    )
    return {"root": root, "store": store, "model_dir": model_dir, "tokenize": tok, "fp": fp}


def make_plan(setup, **overrides) -> RefPassPlan:
    fields = {
        "k": 16,
        "dtype": "float32",
        "batch_size": 5,
        "pairs_per_shard": PAIRS_PER_SHARD,
        "device": "cpu",
    }
    cfg = RefPassConfig(**{**fields, **overrides})
    model = ModelConfig(name_or_path=str(setup["model_dir"]))
    return plan_refpass(cfg, model, str(setup["model_dir"]), setup["tokenize"].path, setup["fp"])


def fresh(setup, prompt: list[int], response: list[int]):
    """One unpadded forward of prompt + response: (logits, last hidden) at the scoring positions."""
    ref = load_reference(str(setup["model_dir"]), device="cpu")
    ids = torch.tensor([prompt + response])
    with torch.inference_mode():
        out = ref.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    sl = slice(len(prompt) - 1, len(prompt) + len(response) - 1)
    return out.logits[0, sl].float(), out.hidden_states[-1][0, sl]


def fresh_prefix_sum(setup, prompt: list[int]) -> torch.Tensor:
    """float32 Σ of the last hidden states at positions 0 .. P-2 of the prompt run alone."""
    ref = load_reference(str(setup["model_dir"]), device="cpu")
    with torch.inference_mode():
        hidden = ref.backbone(input_ids=torch.tensor([prompt]), use_cache=False).last_hidden_state
    return hidden[0, : max(len(prompt) - 1, 0)].float().sum(0)


def tokenized(setup):
    return read_table(setup["tokenize"].path, "tokenized").to_pylist()


@pytest.fixture(scope="module")
def cache32(setup):
    plan = make_plan(setup)
    return plan, run_refpass(setup["store"], plan)


def test_cache_equals_a_fresh_forward(setup, cache32):
    plan, result = cache32
    assert result.computed and plan.n_shards == 4
    table = read_table(result.path, "refcache")
    assert table.num_rows == 2 * N_PAIRS
    assert result.manifest.info["pairs"] == N_PAIRS and result.manifest.info["shards"] == 4
    pairs = tokenized(setup)
    for row in table.to_pylist():
        pair = pairs[row["pair_index"]]
        assert (row["id"], row["split"]) == (pair["id"], pair["split"])
        response = pair[f"{row['side']}_ids"]
        assert row["response_len"] == len(response) == len(row["token_logprobs"])
        logits, _ = fresh(setup, pair["prompt_ids"], response)
        lp = torch.log_softmax(logits, -1)
        want = lp.gather(-1, torch.tensor(response)[:, None])[:, 0]
        np.testing.assert_allclose(row["token_logprobs"], want.numpy(), atol=2e-5)
        top = lp.topk(plan.k, -1)
        np.testing.assert_allclose(np.array(row["topk_logprobs"]), top.values.numpy(), atol=2e-5)
        assert np.array(row["topk_ids"]).tolist() == top.indices.tolist()
        assert row["seq_logprob"] == pytest.approx(float(want.double().sum()), abs=1e-4)


def test_float16_cache_is_the_float32_one_rounded(setup, cache32):
    _, result32 = cache32
    plan16 = make_plan(setup, dtype="float16", batch_size=3)  # other batching: same numbers
    assert plan16.key != cache32[0].key
    t16 = read_table(run_refpass(setup["store"], plan16).path, "refcache")
    t32 = read_table(result32.path, "refcache")
    lp16 = token_matrix(t16.column("topk_logprobs"))
    lp32 = token_matrix(t32.column("topk_logprobs"))
    assert lp16.dtype == np.float16
    # round to nearest: at most half a float16 ulp (2^-11 relative) apart, plus batching noise
    assert np.all(np.abs(lp16.astype(np.float32) - lp32) <= np.abs(lp32) * 2.0**-11 + 1e-5)
    np.testing.assert_allclose(
        token_vector(t16.column("token_logprobs")), token_vector(t32.column("token_logprobs")), atol=1e-5
    )
    assert t16.column("topk_ids").equals(t32.column("topk_ids"))


def test_summed_logprobs_equal_sequence_logprobs_on_the_same_batch(setup, cache32):
    _, result = cache32
    table = read_table(result.path, "refcache").slice(0, 8).to_pylist()
    pairs = tokenized(setup)
    prompts = [pairs[r["pair_index"]]["prompt_ids"] for r in table]
    responses = [pairs[r["pair_index"]][f"{r['side']}_ids"] for r in table]
    batch = pack_batch(prompts, responses, pad_id=0)
    response_mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        response_mask[b, len(p) : len(p) + len(r)] = True
    ref = load_reference(str(setup["model_dir"]), device="cpu")
    with torch.inference_mode():
        logits = ref.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = sequence_logprobs(logits, batch.input_ids, response_mask)
    np.testing.assert_allclose([r["seq_logprob"] for r in table], want.numpy(), atol=1e-4)
    np.testing.assert_allclose([sum(r["token_logprobs"]) for r in table], want.numpy(), atol=1e-4)


def test_topk_tail_kl_from_the_cache_is_exact_at_full_vocabulary(setup):
    vocab = make_plan(setup).vocab_size
    plan = make_plan(setup, k=vocab, store_hidden=True, hidden_dtype="float16")
    table = read_table(run_refpass(setup["store"], plan).path, "refcache")
    ids = torch.from_numpy(token_matrix(table.column("topk_ids")))
    lps = torch.from_numpy(token_matrix(table.column("topk_logprobs")))
    hidden = torch.from_numpy(token_matrix(table.column("hidden")))
    assert hidden.dtype == torch.float16 and hidden.shape == (ids.shape[0], plan.hidden_size)
    pairs = tokenized(setup)
    fresh_logits, fresh_hidden = [], []
    for row in table.select(["pair_index", "side"]).to_pylist():
        pair = pairs[row["pair_index"]]
        logits, h = fresh(setup, pair["prompt_ids"], pair[f"{row['side']}_ids"])
        fresh_logits.append(logits)
        fresh_hidden.append(h)
    ref_logits = torch.cat(fresh_logits)
    # the cached hidden state is the one before each response token (it predicts it)
    torch.testing.assert_close(hidden.float(), torch.cat(fresh_hidden), atol=2e-2, rtol=2e-3)
    # per row, CALM's context prefix: float32, from the same forward as the rest of the row
    prefix = table.column("prefix_hidden_sum")
    assert prefix.type == pa.list_(pa.float32(), plan.hidden_size)
    prefix = torch.tensor(prefix.to_pylist(), dtype=torch.float32)
    want = torch.stack(
        [fresh_prefix_sum(setup, pairs[i]["prompt_ids"]) for i in table.column("pair_index").to_pylist()]
    )
    assert want.abs().max() > 1.0  # real prompts: a non-trivial sum
    # both float32, same weights; a causal model never sees the right padding, so only kernel
    # rounding on sums of O(10) values of O(1) separates them
    torch.testing.assert_close(prefix, want, atol=1e-4, rtol=1e-5)
    # a non-trivial policy head: the LM head, perturbed
    gen = torch.Generator().manual_seed(1)
    weight = load_reference(str(setup["model_dir"]), device="cpu").output_layer.weight
    policy = hidden.float() @ (weight + 0.5 * torch.randn(weight.shape, generator=gen)).T
    exact = exact_kl(ref_logits, policy)
    assert exact.mean() > 0.05
    torch.testing.assert_close(topk_tail_kl(ids, lps, policy), exact, atol=2e-5, rtol=1e-4)
    # fewer ids: a lower bound of the exact KL
    small = read_table(run_refpass(setup["store"], make_plan(setup, k=8)).path, "refcache")
    estimate = topk_tail_kl(
        torch.from_numpy(token_matrix(small.column("topk_ids"))),
        torch.from_numpy(token_matrix(small.column("topk_logprobs"))),
        policy,
    )
    assert torch.all(estimate <= exact + 1e-5)


def test_float32_hidden_states_are_the_states_the_reference_values_come_from(setup):
    """The cache once stored float16 hidden states next to reference values computed from the
    float32 ones, so a head trained from the cache (`features: cached`) started off its reference.
    By default (`hidden_dtype: float32`) the cached states are the model's own: the reference's
    output layer on them gives back the cached log-probs, and they equal a fresh forward's."""
    plan = make_plan(setup, store_hidden=True)
    table = read_table(run_refpass(setup["store"], plan).path, "refcache")
    hidden = torch.from_numpy(token_matrix(table.column("hidden")))
    assert hidden.shape[1] == plan.hidden_size
    pairs = tokenized(setup)
    targets = torch.tensor(
        [t for row in table.select(["pair_index", "side"]).to_pylist()
         for t in pairs[row["pair_index"]][f"{row['side']}_ids"]]
    )  # fmt: skip
    reference = load_reference(str(setup["model_dir"]), device="cpu")
    with torch.inference_mode():
        logits = reference.output_logits(hidden.float()).float()
    again = logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)
    cached = torch.from_numpy(token_vector(table.column("token_logprobs")))
    # same states, same output layer: only the matmul's blocking over a longer batch differs
    torch.testing.assert_close(again, cached, atol=2e-5, rtol=0)
    fresh_hidden = torch.cat(
        [fresh(setup, pairs[r["pair_index"]]["prompt_ids"], pairs[r["pair_index"]][f"{r['side']}_ids"])[1]
         for r in table.select(["pair_index", "side"]).to_pylist()]
    )  # fmt: skip
    torch.testing.assert_close(hidden.float(), fresh_hidden, atol=1e-5, rtol=1e-5)
    assert plan.hidden_dtype == "float32" and hidden.dtype == torch.float32
    assert table.schema.field("hidden").type == pa.list_(pa.list_(pa.float32(), plan.hidden_size))


def test_hidden_dtype_is_in_the_key_only_with_hidden_states(setup):
    assert (
        make_plan(setup, store_hidden=True, hidden_dtype="float16").key
        != make_plan(setup, store_hidden=True).key
    )
    assert make_plan(setup, hidden_dtype="float16").key == make_plan(setup).key  # nothing stored
    # the run's own model as the reference: recorded with the reference's identity
    plan = make_plan(setup)
    assert plan.config["model"]["own"] is True and plan.config["model"]["run_model"] is None
    assert make_plan(setup, reference_model=str(setup["model_dir"])).key == plan.key  # the same weights


def test_tail_draws_come_from_the_reference_outside_its_top_k_whatever_the_batching(setup, tmp_path):
    """`refpass.tail_draws`: per scored token, M ids outside its top k with their log-probs as a
    fresh forward gives them; in the key only when asked for; the same draws from another batch
    size (which is not in the key), each token's draws being seeded by the token itself."""
    plain = make_plan(setup)
    plan = make_plan(setup, tail_draws=8)
    assert "tail_draws" not in plain.config and plan.config["tail_draws"] == 8 and plan.key != plain.key
    result = run_refpass(setup["store"], plan)
    assert result.manifest.info["tail_draws"] == 8
    table = read_table(result.path, "refcache")
    top = torch.from_numpy(token_matrix(table.column("topk_ids"))).long()
    tail = torch.from_numpy(token_matrix(table.column("tail_ids"))).long()
    tail_lp = torch.from_numpy(token_matrix(table.column("tail_logprobs")))
    assert tail.shape == (top.shape[0], 8) and tail_lp.dtype == torch.float32
    assert not (tail.unsqueeze(-1) == top.unsqueeze(1)).any()  # never one of the token's top k
    pairs = tokenized(setup)
    fresh_lp = torch.cat(
        [
            torch.log_softmax(fresh(setup, pairs[row["pair_index"]]["prompt_ids"],
                                    pairs[row["pair_index"]][f"{row['side']}_ids"])[0], -1)
            for row in table.select(["pair_index", "side"]).to_pylist()
        ]
    )  # fmt: skip
    torch.testing.assert_close(tail_lp, fresh_lp.gather(-1, tail), atol=1e-5, rtol=1e-5)
    assert len(tail.unique()) > 3 * plan.k  # draws spread over the tail, not a few ids
    other = make_plan(setup, tail_draws=8, batch_size=3)
    assert other.key == plan.key
    again = read_table(run_refpass(tmp_path / "store", other).path, "refcache")
    assert np.array_equal(token_matrix(again.column("tail_ids")), tail.numpy().astype(np.int32))


CHILD = textwrap.dedent(
    """
    import json, os, signal
    from pathlib import Path
    from alignheads.tasks.refpass import RefPassPlan, run_refpass_shard
    plan = RefPassPlan(**json.loads(Path({plan!r}).read_text()))
    for index in (0, 1):
        run_refpass_shard(Path({store!r}), plan, index)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after two shards, before the rest
    """
)


def test_sigkilled_run_resumes_with_only_the_missing_shards(setup, cache32, tmp_path):
    plan, clean = cache32
    store = tmp_path / "store"
    (tmp_path / "plan.json").write_text(json.dumps(plan.__dict__))
    script = CHILD.format(plan=str(tmp_path / "plan.json"), store=str(store))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (store / "refpass" / plan.key).exists()
    with pytest.raises(ArtifactError, match=r"2 of 4 shards not done \(2, 3\)"):
        finalize_refpass(store, plan)
    computed = [run_refpass_shard(store, plan, i).computed for i in range(plan.n_shards)]
    assert computed == [False, False, True, True]
    result = finalize_refpass(store, plan)
    assert result.computed and result.key == clean.key
    assert read_table(result.path, "refcache").equals(read_table(clean.path, "refcache"))


def test_truncated_shard_is_detected_and_only_it_rebuilt(setup, cache32, tmp_path):
    plan, clean = cache32
    store = tmp_path / "store"
    first = run_refpass(store, plan)
    paths = [first.path / shard_path("refcache", i) for i in range(plan.n_shards)]
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    with open(paths[2], "r+b") as fh:
        fh.truncate(paths[2].stat().st_size - 100)
    with pytest.raises(ArtifactError, match="part-00002"):
        verify_artifact(first.path)
    again = run_refpass(store, plan)
    assert again.computed  # reopened, shard 2 recomputed, finalized again
    verify_artifact(again.path, "refpass")
    after = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    assert [a == b for a, b in zip(stamps, after, strict=True)] == [True, True, False, True]
    assert read_table(again.path, "refcache").equals(read_table(clean.path, "refcache"))


def test_other_settings_give_other_keys_and_are_refused(setup, cache32, bos_tokenizer, plain_tokenizer):
    plan, clean = cache32
    keys = {
        plan.key,
        make_plan(setup, k=8).key,
        make_plan(setup, dtype="float16").key,
        make_plan(setup, store_hidden=True).key,
        make_plan(setup, pairs_per_shard=5).key,
    }
    assert len(keys) == 5
    # batch size and device change nothing but speed: same key
    assert make_plan(setup, batch_size=2, device="auto").key == plan.key
    # another tokenizer fingerprint (same model) -> another key
    cfg = RefPassConfig(k=16, dtype="float32", pairs_per_shard=PAIRS_PER_SHARD)
    model = ModelConfig(name_or_path=str(setup["model_dir"]))
    assert plan_refpass(cfg, model, str(setup["model_dir"]), setup["tokenize"].path, "0" * 64).key != plan.key
    # another model with the same tokenizer: accepted as reference, other key
    other_dir = _save_model(setup["root"] / "other-model", bos_tokenizer, seed=1)
    other = make_plan(setup, reference_model=str(other_dir))
    assert other.key != plan.key and other.model_path == str(other_dir)
    with pytest.raises(ArtifactError, match=r"other settings \(differs in config\.model\)"):
        check_refcache(clean.path, other)
    assert check_refcache(clean.path, plan).key == plan.key
    # a reference model whose tokenizer differs is refused at plan time
    mismatched = _save_model(setup["root"] / "plain-model", plain_tokenizer, seed=0)
    with pytest.raises(ValueError, match="its tokenizer differs from the run's"):
        make_plan(setup, reference_model=str(mismatched))
    with pytest.raises(ValueError, match=r"refpass.k = 301 exceeds the vocabulary .* \(300 tokens\)"):
        make_plan(setup, k=301)


def test_refcache_view_answers_queries(setup, cache32):
    plan, _ = cache32
    rows = run_query(
        setup["store"],
        "SELECT side, count(*) AS n, sum(len(token_logprobs)) AS tokens FROM refcache "
        f"WHERE artifact = '{plan.key}' GROUP BY side ORDER BY side",
    ).to_pylist()
    assert [r["n"] for r in rows] == [N_PAIRS, N_PAIRS]
    margin = run_query(
        setup["store"],
        "SELECT count(*) AS n, avg(m) AS margin FROM (SELECT pair_index, "
        "sum(CASE side WHEN 'chosen' THEN seq_logprob ELSE -seq_logprob END) AS m "
        f"FROM refcache WHERE artifact = '{plan.key}' GROUP BY pair_index)",
    ).to_pylist()[0]
    assert margin["n"] == N_PAIRS and np.isfinite(margin["margin"])
    tail = run_query(
        setup["store"],
        "SELECT pos, avg(1 - list_sum(list_transform(lp, lambda x: exp(x)))) AS tail FROM ("
        "SELECT unnest(topk_logprobs) AS lp, generate_subscripts(topk_logprobs, 1) AS pos "
        f"FROM refcache WHERE artifact = '{plan.key}') GROUP BY pos ORDER BY pos",
    ).to_pylist()
    assert tail[0]["pos"] == 1 and all(0 <= r["tail"] < 1 for r in tail)


def test_a_model_whose_logits_are_not_its_lm_head_is_refused():
    from alignheads.models.reference import ReferenceModel

    cfg = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    ReferenceModel(LlamaForCausalLM(cfg))  # the plain model passes the probe
    cfg.final_logit_softcapping = 0.5  # the split path would cap logits the forward does not
    with pytest.raises(ValueError, match=r"not lm_head\(last hidden state\)"):
        ReferenceModel(LlamaForCausalLM(cfg))


def test_a_shard_shows_a_progress_bar_over_its_sequences(setup, cache32, capsys):
    from alignheads.storage.tables import read_table_rows
    from alignheads.tasks.refpass import compute_refpass_shard

    plan, result = cache32
    reference = load_reference(str(setup["model_dir"]), device="cpu")
    data = compute_refpass_shard(plan, 1, reference, progress=True)
    err = capsys.readouterr().err
    start, stop = plan.shard_rows(1)
    n = 2 * (stop - start)  # sequences: each pair's chosen and rejected
    assert f"reference pass, shard 2/{plan.n_shards}:   0%|          | 0/{n} " in err
    # the bar only watches: the rows are the cached shard's
    cached = read_table_rows(result.path, "refcache", 2 * start, 2 * stop)
    assert data.tables["refcache"].column("seq_logprob").to_pylist() == pytest.approx(
        cached.column("seq_logprob").to_pylist(), abs=1e-6
    )
    compute_refpass_shard(plan, 1, reference, progress=False)
    assert "reference pass" not in capsys.readouterr().err
