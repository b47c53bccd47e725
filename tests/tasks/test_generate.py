"""The generate stage (α sweep) on a tiny Llama with heads saved into train artifacts.

The store is built once per module: a tiny Llama + word-level tokenizer saved to disk, JSONL
pairs through the real data stage, and train artifacts holding fresh (Δ = 0) or randomised
IAV and CALM heads, written with `ensure_artifact` as the train stage would write them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from alignheads.config import (
    DataConfig,
    SourceConfig,
    SweepConfig,
)
from alignheads.loading import load_causal_lm, load_tokenizer
from alignheads.models import save_head
from alignheads.models.methods import method
from alignheads.models.row_sampling import row_seed
from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
from alignheads.storage.fingerprint import artifact_key, tokenizer_fingerprint
from alignheads.storage.tables import read_table
from alignheads.tasks import data as data_stage
from alignheads.tasks import generate as gen
from alignheads.tasks import prompts as sweep_prompts
from alignheads.tasks import sampling
from alignheads.tasks import train as train_stage
from tests.helpers.tiny_models import EOS, make_head, randomise, tiny_llama, tiny_tokenizer
from tests.helpers.word_pairs import word_pairs

MAX_NEW = 10


def _train_artifact(store: Path, kind: str, head, model, tag: str) -> Path:
    """A train artifact as the train stage leaves it: head/ + manifest with info['kind']."""
    key = artifact_key(train_stage.STAGE, {"kind": kind, "tag": tag}, {}, train_stage.TRAIN_VERSION)

    def build(staging: Path) -> ArtifactContent:
        save_head(head, staging / method(kind).saved_as, base_model=model)
        return ArtifactContent(info={"kind": kind})

    return ensure_artifact(store, train_stage.STAGE, key, train_stage.TRAIN_VERSION, {}, {}, build).path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model_dir = root / "model"
    lm = tiny_llama(tied=False)
    with torch.no_grad():  # make EOS as likely as an ordinary word, so some responses end early
        out = lm.get_output_embeddings().weight
        out[EOS] = out[5]
    lm.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    test = word_pairs(14, 1)
    test[5]["prompt"] = test[2]["prompt"]  # a repeated prompt: used once
    for split, rows in (("train", word_pairs(4, 0)), ("test", test)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(model_dir))
    store = root / "store"
    data_cfg = DataConfig(
        train=SourceConfig(path=str(root / "train.jsonl")), test=SourceConfig(path=str(root / "test.jsonl"))
    )
    data = data_stage.run_data(
        store, data_stage.plan_data(data_cfg, None, None, tokenizer_fingerprint(tok)), tok
    )
    model = load_causal_lm(str(model_dir))
    trains = {}
    for kind in ("iav", "calm"):
        trains[f"{kind}-fresh"] = _train_artifact(store, kind, make_head(kind, model), model, "fresh")
        trains[f"{kind}-random"] = _train_artifact(
            store, kind, randomise(make_head(kind, model)), model, "random"
        )
    source = {
        "name_or_path": str(model_dir),
        "revision": None,
        "trust_remote_code": False,
        "dtype": "float32",
    }
    return {"store": store, "data": data.path, "trains": trains, "source": source, "model_dir": model_dir}


def _sweep(**kw) -> SweepConfig:
    return SweepConfig(**({"n_prompts": 12, "max_new_tokens": MAX_NEW, "batch_size": 5} | kw))


def _saved(world, prompts) -> Path:
    """The prompt set as the artifact the generate stage reads."""
    return sweep_prompts.save_prompt_set(world["store"], prompts)


def _run(world, train: str, alpha: float, sweep: SweepConfig):
    prompts = _saved(world, sweep_prompts.prompt_set(world["data"], sweep))
    plan = gen.plan_generate(world["trains"][train], alpha, prompts, sweep, world["source"])
    (result,) = gen.run_generate(world["store"], [plan], progress=False)
    return plan, result, read_table(result.path, gen.TABLE)


# --- configuration ------------------------------------------------------------------------------


def test_sweep_config_defaults_and_validation():
    cfg = SweepConfig()
    assert cfg.alphas == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert (cfg.n_prompts, cfg.n_samples, cfg.max_new_tokens, cfg.seed, cfg.batch_size) == (64, 1, 48, 0, 128)
    assert cfg.do_sample and cfg.temperature == 1.0 and cfg.top_p == 1.0 and cfg.prompts_file is None
    assert all(f.description for f in SweepConfig.model_fields.values())
    with pytest.raises(ValidationError, match="alphas"):
        SweepConfig(alphas=[])
    with pytest.raises(ValidationError, match="more than once"):
        SweepConfig(alphas=[0, 1, 1.0])
    with pytest.raises(ValidationError, match="finite"):
        SweepConfig(alphas=[0, float("nan")])
    with pytest.raises(ValidationError, match="extra"):
        SweepConfig(alpha=[1])
    with pytest.raises(ValidationError, match="do_sample"):
        SweepConfig(n_samples=2, do_sample=False)
    with pytest.raises(ValidationError, match="top_p"):
        SweepConfig(top_p=0)
    assert SweepConfig(alphas=[-0.0, 1]).alphas == [0.0, 1.0]
    # greedy decoding does not depend on temperature / top-p: same cache key
    assert SweepConfig(do_sample=False, temperature=0.5).decoding() == SweepConfig(do_sample=False).decoding()


# --- prompts ------------------------------------------------------------------------------------


def test_prompts_file_txt_jsonl_json(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("hello there\n\n  \nsecond prompt\nhello there\nthird\n")
    assert sweep_prompts.load_prompts_file(txt) == [
        ("p00000", "hello there"),
        ("p00001", "second prompt"),
        ("p00003", "third"),
    ]
    assert sweep_prompts.load_prompts_file(txt, limit=2) == [
        ("p00000", "hello there"),
        ("p00001", "second prompt"),
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a b", "id": 7}\n\n{"prompt": "c"}\n')
    assert sweep_prompts.load_prompts_file(jsonl) == [("p00000", "a b"), ("p00001", "c")]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["x", {"prompt": "y"}]))
    assert sweep_prompts.load_prompts_file(js) == [("p00000", "x"), ("p00001", "y")]
    # through the sweep config: n_prompts is the limit
    assert sweep_prompts.prompt_set(None, SweepConfig(prompts_file=str(jsonl), n_prompts=1)) == [
        ("p00000", "a b")
    ]


def test_prompts_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        sweep_prompts.load_prompts_file(missing)
    for name, text in (("empty.txt", "\n \n"), ("empty.jsonl", ""), ("empty.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{tmp_path / name} holds no prompts"):
            sweep_prompts.load_prompts_file(tmp_path / name)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=rf"{bad}, line 2: field 'prompt' is missing"):
        sweep_prompts.load_prompts_file(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=rf"{broken}, line 2: not valid JSON"):
        sweep_prompts.load_prompts_file(broken)
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "p.csv").write_text("a\n")
        sweep_prompts.load_prompts_file(tmp_path / "p.csv")


def test_prompt_set_takes_distinct_test_prompts_in_order(world):
    pairs = read_table(world["data"], "pairs").to_pylist()
    test = [p for p in pairs if p["split"] == "test"]
    prompts = sweep_prompts.prompt_set(world["data"], SweepConfig(n_prompts=6))
    assert [p for _, p in prompts] == [t["prompt"] for t in test[:5]] + [test[6]["prompt"]]
    assert prompts[0][0] == test[0]["id"] and prompts[5][0] == test[6]["id"]
    assert len(sweep_prompts.prompt_set(world["data"], SweepConfig(n_prompts=100))) == 13


# --- the stage ----------------------------------------------------------------------------------


def test_schema_one_artifact_per_alpha_and_reuse(world):
    sweep = _sweep()
    plan0, first, table = _run(world, "calm-random", 0.0, sweep)
    assert first.computed
    assert table.schema == gen.GENERATIONS_SCHEMA
    assert table.num_rows == 12
    assert set(table.column("head").to_pylist()) == {"calm"}
    assert (
        set(table.column("head_key").to_pylist()) == {plan0.head_key} == {world["trains"]["calm-random"].name}
    )
    (again,) = gen.run_generate(world["store"], [plan0], progress=False)
    assert again.computed is False and again.path == first.path
    # another α: a new artifact; the sweep's other α keep theirs (same key, not recomputed)
    plan1, one, _ = _run(world, "calm-random", 1.0, sweep)
    assert one.computed and plan1.key != plan0.key
    replan0 = gen.plan_generate(world["trains"]["calm-random"], 0, plan0.prompts_path, sweep, world["source"])
    assert replan0.key == plan0.key
    # the plan is JSON-able and rebuilds from its __dict__ (how flows pass plans to tasks)
    rebuilt = gen.GeneratePlan(**json.loads(json.dumps(plan0.__dict__)))
    assert gen.run_generate(world["store"], [rebuilt], progress=False)[0].computed is False
    # decoding settings, prompt set and head are in the key
    assert (
        gen.plan_generate(
            world["trains"]["calm-random"], 0, plan0.prompts_path, _sweep(max_new_tokens=5), world["source"]
        ).key
        != plan0.key
    )
    assert (
        gen.plan_generate(
            world["trains"]["calm-random"], 0,
            _saved(world, sweep_prompts.read_prompt_set(plan0.prompts_path)[:3]), sweep, world["source"],
        ).key
        != plan0.key
    )
    assert (
        gen.plan_generate(world["trains"]["iav-random"], 0, plan0.prompts_path, sweep, world["source"]).key
        != plan0.key
    )


def test_common_random_numbers_across_alpha_and_heads(world):
    """Fresh heads (Δ = 0): every α and both heads sample exactly what the plain base model samples
    with the same seeds; the seeds differ between samples and batches, not between α or heads."""
    sweep = _sweep(n_samples=2)
    tables = {
        (kind, alpha): _run(world, f"{kind}-fresh", alpha, sweep)[2]
        for kind in ("iav", "calm")
        for alpha in (0.0, 1.5)
    }
    model = load_causal_lm(str(world["model_dir"]))
    tok = load_tokenizer(str(world["model_dir"]))
    base = sampling.sample_responses(model, tok, sweep_prompts.prompt_set(world["data"], sweep), sweep)
    base_text = [r["response"] for r in base]
    base_seeds = [r["seed"] for r in base]
    for table in tables.values():
        assert table.column("response").to_pylist() == base_text
        assert table.column("seed").to_pylist() == base_seeds
    calm0 = tables[("calm", 0.0)].to_pylist()
    assert all(r["kl_mean"] == pytest.approx(0.0, abs=1e-6) for r in calm0)
    # the draws are random: the two samples of a prompt, and other seeds, give other text
    assert sum(a["response"] != b["response"] for a, b in zip(calm0[::2], calm0[1::2], strict=True)) >= 6
    other = sampling.sample_responses(
        model, tok, sweep_prompts.prompt_set(world["data"], sweep), _sweep(n_samples=2, seed=1)
    )
    assert sum(a["response"] != b for a, b in zip(other, base_text, strict=True)) >= 12
    # one seed per row, from (sweep seed, prompt text, sample): not from the batch it lands in
    prompts = dict(sweep_prompts.prompt_set(world["data"], sweep))
    assert [r["seed"] for r in calm0] == [
        row_seed(sweep.seed, prompts[r["prompt_id"]], r["sample_index"]) for r in calm0
    ]
    assert len({r["seed"] for r in calm0}) == len(calm0)
    assert [r["sample_index"] for r in calm0[:4]] == [0, 1, 0, 1]


def test_rows_do_not_depend_on_the_batch_or_the_other_alphas_in_it(world):
    """Per-row seeds: a method's α decoded alone or in one pass with other α gives the same rows
    bit for bit (batches hold one α), and in other batch sizes the same tokens."""
    sweep = _sweep(n_prompts=6)
    prompts = sweep_prompts.prompt_set(world["data"], sweep)
    train = world["trains"]["calm-random"]
    with gen.method_sampler("calm", train, world["source"], sweep, progress=False) as sample:
        together = sample(prompts, [0.0, 1.0, 2.0], "x")
        alone = sample(prompts, [1.0], "x")
    with gen.method_sampler("calm", train, world["source"], _sweep(n_prompts=6, batch_size=2), progress=False) as sample:
        small_batches = sample(prompts, [1.0], "x")
    at1 = [r for r in together if r["alpha"] == 1.0]
    assert alone == at1
    for rows in (alone, small_batches):
        assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in at1]
        # the same tokens; the KL up to float roundoff of the batch shape
        assert [r["kl_mean"] for r in rows] == pytest.approx([r["kl_mean"] for r in at1], rel=1e-5, abs=1e-7)
    assert [r["alpha"] for r in together] == [0.0] * 6 + [1.0] * 6 + [2.0] * 6  # ordered by α


def test_finish_reason_and_token_counts(world):
    sweep = _sweep(n_samples=2)
    model = load_causal_lm(str(world["model_dir"]))
    tok = load_tokenizer(str(world["model_dir"]))
    rows = sampling.sample_responses(model, tok, sweep_prompts.prompt_set(world["data"], sweep), sweep)
    reasons = {r["finish_reason"] for r in rows}
    assert reasons == {"eos", "length"}
    for r in rows:
        ids = r["token_ids"]
        assert len(ids) == r["n_tokens"] <= MAX_NEW
        if r["finish_reason"] == "eos":
            assert ids[-1] == EOS and EOS not in ids[:-1]
        else:
            assert r["n_tokens"] == MAX_NEW and EOS not in ids
        assert r["response"] == tok.decode(ids, skip_special_tokens=True)
        assert "[EOS]" not in r["response"] and "[PAD]" not in r["response"]
    # the stage's table agrees with what the plain model gives for a fresh head
    table = _run(world, "iav-fresh", 0.0, sweep)[2]
    assert table.column("n_tokens").to_pylist() == [r["n_tokens"] for r in rows]
    assert table.column("finish_reason").to_pylist() == [r["finish_reason"] for r in rows]
    # greedy decoding: deterministic, also stops at EOS or max_new_tokens
    greedy = _sweep(do_sample=False, max_new_tokens=4)
    g1 = sampling.sample_responses(model, tok, sweep_prompts.prompt_set(world["data"], greedy), greedy)
    assert all(r["n_tokens"] <= 4 for r in g1)
    assert g1 == sampling.sample_responses(
        model, tok, sweep_prompts.prompt_set(world["data"], greedy), greedy
    )


def test_kl_and_head_statistics(world):
    sweep = _sweep()
    calm0 = _run(world, "calm-random", 0.0, sweep)[2].to_pylist()
    calm1 = _run(world, "calm-random", 1.0, sweep)[2].to_pylist()
    iav1 = _run(world, "iav-random", 1.0, sweep)[2].to_pylist()
    assert all(r["kl_mean"] == pytest.approx(0.0, abs=1e-6) for r in calm0)  # CALM at α = 0 is the LM
    assert all(r["kl_mean"] > 0 for r in calm1) and all(r["kl_mean"] > 0 for r in iav1)
    for r in calm1 + iav1:
        assert r["kl_sum"] == pytest.approx(r["kl_mean"] * r["n_tokens"], rel=1e-9)
    for r in calm1:
        assert r["align_norm_mean"] is None
        assert 0 <= r["strength_mean"] <= r["strength_max"] <= 5.0  # s_max
        assert 0 <= r["utilisation"] <= 1
    assert any(r["utilisation"] > 0 for r in calm1)
    for r in iav1:
        assert r["strength_mean"] is None and r["strength_max"] is None and r["utilisation"] is None
        assert r["align_norm_mean"] > 0
    # the same seeds at every α: differences come from α
    assert [r["seed"] for r in calm0] == [r["seed"] for r in calm1] == [r["seed"] for r in iav1]
    assert sum(a["response"] != b["response"] for a, b in zip(calm0, calm1, strict=True)) >= 1


def test_generations_schema_is_exact():
    expected = pa.schema(
        [
            ("head", pa.string()),
            ("head_key", pa.string()),
            ("alpha", pa.float64()),
            ("prompt_id", pa.string()),
            ("sample_index", pa.int32()),
            ("seed", pa.int64()),
            ("prompt", pa.string()),
            ("response", pa.string()),
            ("n_tokens", pa.int32()),
            ("finish_reason", pa.string()),
            ("kl_mean", pa.float64()),
            ("kl_sum", pa.float64()),
            ("strength_mean", pa.float64()),
            ("strength_max", pa.float64()),
            ("utilisation", pa.float64()),
            ("align_norm_mean", pa.float64()),
        ]
    )
    assert gen.GENERATIONS_SCHEMA.equals(expected)
    assert gen.generations_table([], "iav", "k", 1.0).schema.equals(expected)


def test_run_generate_builds_every_missing_alpha_with_one_model_load(world, monkeypatch):
    sweep = _sweep(seed=7, n_prompts=4)
    prompts = _saved(world, sweep_prompts.prompt_set(world["data"], sweep))
    loads = []
    real = train_stage.load_run_model
    monkeypatch.setattr(train_stage, "load_run_model", lambda source: loads.append(1) or real(source))
    plans = [
        gen.plan_generate(world["trains"]["iav-random"], alpha, prompts, sweep, world["source"])
        for alpha in (0.0, 0.5, 2.0)
    ]
    (done,) = gen.run_generate(world["store"], plans[:1], progress=False)  # one α first
    results = gen.run_generate(world["store"], plans, progress=True)  # then the other two together
    assert len(loads) == 2  # once per call, not once per α
    assert [r.computed for r in results] == [False, True, True] and results[0].path == done.path
    assert all(r.manifest.info["rows"] == 4 for r in results)
    # the thread count the rows were sampled with (conftest sets one), for tracing a difference
    assert [r.manifest.info["torch_threads"] for r in results] == [torch.get_num_threads()] * 3 == [1] * 3
    texts = [read_table(r.path, gen.TABLE).column("response").to_pylist() for r in results]
    assert texts[0] != texts[2]
    assert gen.run_generate(world["store"], plans, progress=False) and len(loads) == 2  # all complete
    with pytest.raises(ValueError, match="one method"):
        other = gen.plan_generate(world["trains"]["calm-random"], 1.0, prompts, sweep, world["source"])
        gen.run_generate(world["store"], [plans[0], other])
