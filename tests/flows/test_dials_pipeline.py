"""Dials through the pipeline on the test-size tiny world: per-objective data, reference pass and
training per dial (an IAV and a CALM head, and a GenARM reward LM each), the dial set, the sweep
over α vectors for both families on the same prompts and seeds, the dial evaluation, the report
and MLflow; then what a changed grid recomputes."""

from __future__ import annotations

import pytest

from alignheads.config import RunConfig
from alignheads.flows.pipeline import pipeline
from alignheads.storage.query import run_query
from alignheads.storage.tables import read_table
from alignheads.tasks.dial_set import read_dial_set
from alignheads.tasks.report import report_files
from alignheads.world.build import tiny_test_config
from tests.helpers.small_runs import subflow_names

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADS = {"helpful": {"method": "iav"}, "polite": {"method": "calm", "settings": {"rank": 4}}}


def _config(store) -> RunConfig:
    return RunConfig.model_validate({
        "name": "dials-test",
        "store": str(store),
        "world": tiny_test_config(n_objective_train_pairs=64, n_objective_test_pairs=32).model_dump(mode="json"),
        "tokenize": {"max_prompt_length": 64, "max_response_length": 32},
        "refpass": {"k": 16, "pairs_per_shard": 256},
        "train": {
            "iav": {"enabled": False, "lr": 1e-2, "batch_size": 16, "epochs": 1, "eval_every": 4},
            "calm": {"enabled": False, "lr": 1e-2, "batch_size": 16, "epochs": 1, "eval_every": 4},
            "genarm": {"lr": 1e-3, "batch_size": 16, "epochs": 1, "eval_every": 4},
        },
        "sweep": {"n_prompts": 8, "max_new_tokens": 12, "batch_size": 16},
        "evaluate": {"target_kls": [], "bootstrap_resamples": 200},
        "dials": {"enabled": True, "heads": HEADS, "strengths": [1.0], "n_prompts": 6, "n_samples": 2, "genarm": True},
    }).resolved()  # fmt: skip


@pytest.fixture(scope="module")
def dial_run(prefect_harness, tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("dials") / "store")
    return cfg, pipeline(config=cfg)


def test_each_dial_has_its_own_data_refpass_and_training(dial_run):
    cfg, outcome = dial_run
    assert outcome.train == {}  # the run's own heads are off: only the dials train
    assert set(outcome.dial_train) == {"helpful", "polite", "helpful (genarm)", "polite (genarm)"}
    keys = {name: r.key for name, r in outcome.dial_data.items()}
    assert len(set(keys.values())) == 2
    world = outcome.world.directory
    for name in HEADS:
        pairs = read_table(outcome.dial_data[name].directory, "pairs")
        expected = (world / "objectives" / name / "train.jsonl").read_text().count("\n")
        assert sum(s == "train" for s in pairs.column("split").to_pylist()) == expected
    rows = read_dial_set(outcome.dial_set)
    assert [(r["name"], r["method"], r["objective"]) for r in rows] == [("helpful", "iav", "helpful"), ("polite", "calm", "polite")]
    assert all(r["reward_lm_path"] for r in rows)


def test_both_families_sweep_the_grid_on_the_same_prompts_and_seeds(dial_run):
    cfg, outcome = dial_run
    labels = ["base", "helpful=1", "polite=1", "helpful=1,polite=1"]
    got = [(g.info["family"], g.info["alpha_vector"]) for g in outcome.dial_generate]
    assert got == [(f, label) for f in ("heads", "genarm") for label in labels]
    gens = {key: read_table(g.directory, "dial_generations").to_pylist() for key, g in zip(got, outcome.dial_generate, strict=True)}
    assert all(len(rows) == 12 for rows in gens.values())  # 6 prompts × 2 samples
    # the all-zero vector is the base model in both families: the same text, row for row
    heads_base, genarm_base = gens[("heads", "base")], gens[("genarm", "base")]
    assert [r["response"] for r in heads_base] == [r["response"] for r in genarm_base]
    assert [r["seed"] for r in heads_base] == [r["seed"] for r in gens[("heads", "helpful=1,polite=1")]]
    assert all(r["kl_mean"] == 0.0 for r in heads_base)
    # GenARM runs the base and the reward LM of each dial whose α is not 0
    forwards = {key: g.info["lm_forwards_per_token"] for key, g in zip(got, outcome.dial_generate, strict=True)}
    assert forwards == {("heads", label): 1 for label in labels} | {
        ("genarm", "base"): 1, ("genarm", "helpful=1"): 2, ("genarm", "polite=1"): 2, ("genarm", "helpful=1,polite=1"): 3
    }


def test_dial_summary_view_has_every_objective_with_intervals(dial_run):
    cfg, outcome = dial_run
    out = run_query(
        cfg.store,
        "SELECT method, alpha_vector, alpha_helpful, alpha_polite, helpful, helpful_lo, helpful_hi, polite, "
        "reward, kl, n_prompts, n_samples, lm_forwards_per_token FROM dial_summary ORDER BY method, alpha_vector",
    ).to_pylist()
    assert len(out) == 8
    for row in out:
        assert row["helpful_lo"] <= row["helpful"] <= row["helpful_hi"]
        assert (row["n_prompts"], row["n_samples"]) == (6, 2)
    base = [r for r in out if r["alpha_vector"] == "base"]
    kl = {r["method"]: r["kl"] for r in base}
    # heads at α = 0 are the base layer itself; GenARM's log-softmax of the base logits is the
    # same distribution up to float roundoff
    assert kl["heads"] == 0.0 and 0.0 <= kl["genarm"] < 1e-6
    assert base[0]["helpful"] == base[1]["helpful"]  # same text, same scores
    effects = run_query(cfg.store, "SELECT DISTINCT metric FROM dial_effects ORDER BY metric").to_pylist()
    assert [r["metric"] for r in effects] == ["helpful", "kl", "polite", "reward"]


def test_report_and_mlflow(dial_run):
    cfg, outcome = dial_run
    files = report_files(outcome.dial_report)
    assert set(files) == {"pareto_helpful_polite", "dials"}
    assert files["pareto_helpful_polite"].stat().st_size > 10_000
    assert "## Each dial alone against α = 0" in files["dials"].read_text()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{cfg.store}/mlflow.db")
    exp = client.get_experiment_by_name("dials-test")
    names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
    assert {"train-dial-helpful", "train-dial-polite", "train-dial-helpful-genarm", "dial-heads-base",
            "dial-genarm-helpful=1,polite=1"} <= names  # fmt: skip
    assert {m.name for m in client.search_registered_models()} >= {"dials-test-dial-helpful", "dials-test-dial-polite"}


def test_a_new_vector_builds_only_itself(dial_run):
    cfg, _ = dial_run
    grid = [{"helpful": 1.0}, {"polite": 1.0}, {"helpful": 1.0, "polite": 1.0}, {"helpful": 2.0}]
    again = pipeline(config=cfg.model_copy(update={"dials": cfg.dials.model_copy(update={"grid": grid})}))
    computed = [(g.info["family"], g.info["alpha_vector"]) for g in again.dial_generate if g.status == "computed"]
    assert computed == [("heads", "helpful=2"), ("genarm", "helpful=2")]
    assert all(r.status != "computed" for r in again.dial_train.values())
    assert again.dial_evaluate.status == "computed"


# --- the dials as a user generates with them ----------------------------------------------------

PROMPT = "\n\nHuman: What is 2 plus 3?\n\nAssistant:"


def test_python_api_all_zero_is_the_base_and_a_vector_steers(dial_run):
    from alignheads import inference

    cfg, outcome = dial_run
    aligned, tok = inference.load_dials(cfg.store)  # the store's newest dial set
    assert aligned.dial_names == ("helpful", "polite")
    info = inference.head_info(aligned)
    assert info["dials"] == {"helpful": "iav", "polite": "calm"} and info["lm_forwards_per_token"] == 1
    opts = {"do_sample": True, "max_new_tokens": 16, "seed": 3}
    prompts = [PROMPT, "\n\nHuman: Name two fruits.\n\nAssistant:"]
    base = inference.generate_base(aligned, tok, prompts, **opts)
    assert inference.generate(aligned, tok, prompts, alpha={}, **opts) == base
    rows = inference.compare_with_base(aligned, tok, prompts, alpha={"polite": 2.0}, seed=3, do_sample=True, max_new_tokens=16)
    assert rows[0]["alpha"] == {"helpful": 0.0, "polite": 2.0} and [r["base"] for r in rows] == base
    stats = inference.analyze_modulation_patterns(aligned, tok, prompts, alpha={"helpful": 1.0, "polite": 1.0}, max_new_tokens=8)
    assert stats["head_type"] == "dials" and stats["kl_mean"] > 0
    assert {"align_norm_mean/helpful", "strength_mean/polite", "utilisation/polite"} <= set(stats)
    with pytest.raises(ValueError, match=r"unknown dial\(s\) \['kind'\]; the dials are \['helpful', 'polite'\]"):
        inference.generate(aligned, tok, prompts, alpha={"kind": 1.0})


def test_cli_generate_with_dials(dial_run, capsys, tmp_path):
    import json

    from alignheads import inference
    from alignheads.cli import main

    cfg, outcome = dial_run
    store = ["--set", f"store={cfg.store}"]
    assert main(["generate", *store, "--dial", "helpful=1", "--dial", "polite=0.5", "--raw", "--seed", "5", PROMPT]) == 0
    printed = capsys.readouterr().out.strip()
    aligned, tok = inference.load_dials(outcome.dial_set)
    settings = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": cfg.sweep.max_new_tokens}
    expected = inference.generate(aligned, tok, [PROMPT], {"helpful": 1.0, "polite": 0.5},
                                  seeds=inference.prompt_seeds(5, [PROMPT]), **settings)  # fmt: skip
    assert printed == expected[0]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT.replace("\n", "\\n") + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", *store, "--dials", outcome.dial_set, "--dial", "polite=2", "--prompts-file", str(prompts), "-o", str(out)]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["head"] == "dials" and row["alpha"] == {"helpful": 0.0, "polite": 2.0}

    assert main(["generate", *store, "--dial", "kind=1", PROMPT]) == 2
    assert "no dial named 'kind'" in capsys.readouterr().err
    assert main(["generate", *store, "--dial", "helpful", PROMPT]) == 2
    assert "name=α" in capsys.readouterr().err


def test_chat_alpha_takes_a_vector(dial_run, capsys, monkeypatch):
    import io

    from alignheads.cli import main

    cfg, _ = dial_run
    lines = ":alpha helpful=1 polite=2\n:alpha\n:alpha polite=0\n:alpha 0.5\n:alpha kind=1\n:q\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["generate", "--set", f"store={cfg.store}", "--dial", "helpful=0", "-i"]) == 0
    out = capsys.readouterr().out
    assert "alignheads generate: dials, alpha=base." in out
    assert out.count("alpha = helpful=1,polite=2") == 2  # set, then shown
    assert "alpha = helpful=1\n" in out  # polite back to 0, helpful kept
    assert "alpha = helpful=0.5,polite=0.5" in out
    assert "no dial named 'kind'" in out


def test_cli_merge_folds_iav_dials_into_one_checkpoint(dial_run, capsys, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from alignheads import inference
    from alignheads.cli import main

    cfg, outcome = dial_run
    out = tmp_path / "merged"
    store = ["--set", f"store={cfg.store}"]
    assert main(["merge", *store, "--dial", "helpful=1.5", "--out", str(out)]) == 0
    assert "merged IAV dials helpful, polite at helpful=1.5" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    aligned, tok = inference.load_dials(outcome.dial_set)
    ids = tok([PROMPT], return_tensors="pt").input_ids
    with torch.no_grad():
        want = aligned(input_ids=ids, alpha={"helpful": 1.5}).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a CALM dial has no fixed lm_head to fold into
    assert main(["merge", *store, "--dial", "polite=1", "--out", str(tmp_path / "calm")]) == 1
    assert "only IAV dials merge into a checkpoint, not polite (calm)" in capsys.readouterr().err
    assert not (tmp_path / "calm").exists()


def test_dials_run_beside_the_methods_and_equal_dials_run_alone(dial_run, tmp_path):
    """With a method of the run's own to train, the dials part runs beside the methods' training
    and sweep, as the sub-flow `alignheads-dials` in a thread of the flow run; its artifacts are
    those of the dials run alone (the module's run, which trains no method of its own): the same
    keys and the same generations, row for row. A re-run, with nothing to train, starts no such
    sub-flow and recomputes nothing."""
    cfg, alone = dial_run
    train = cfg.train.model_copy(update={"iav": cfg.train.iav.model_copy(update={"enabled": True})})
    both_cfg = cfg.model_copy(update={"store": tmp_path / "store", "train": train})
    state = pipeline(config=both_cfg, return_state=True)
    both = state.result()
    assert "alignheads-dials" in subflow_names(state)
    assert set(both.train) == {"iav"} and both.train["iav"].status == "computed"
    assert {n: r.key for n, r in both.dial_train.items()} == {n: r.key for n, r in alone.dial_train.items()}
    assert [g.key for g in both.dial_generate] == [g.key for g in alone.dial_generate]
    for ours, theirs in zip(both.dial_generate, alone.dial_generate, strict=True):
        assert read_table(ours.directory, "dial_generations").to_pylist() == read_table(
            theirs.directory, "dial_generations"
        ).to_pylist()
    again = pipeline(config=both_cfg, return_state=True)
    assert "alignheads-dials" not in subflow_names(again)
    assert {r.status for _, r in again.result().stages()} == {"cached"}
