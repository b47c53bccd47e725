"""Stage-only flows on a store the pipeline filled: same keys, same cached tasks, clear errors.

One pipeline run on a small test world (module fixture), then each stage flow is given the
store keys of its inputs and must find the pipeline's artifacts (Prefect cache hits), build
only what is new, and refuse keys that name nothing in the store.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alignheads.config import EvaluateConfig, RunConfig
from alignheads.flows.pipeline import pipeline
from alignheads.flows.stages import MissingArtifactError, refpass_flow, sweep_flow, train_flow
from alignheads.storage.manifest import verify_artifact
from alignheads.storage.query import run_query
from alignheads.world.build import tiny_test_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def small_config(store: Path) -> RunConfig:
    """A run that builds every stage in seconds (the model need not learn much)."""
    return RunConfig.model_validate(
        {
            "name": "stages-test",
            "store": str(store),
            "world": tiny_test_config(
                n_train_pairs=64,
                n_test_pairs=32,
                pretrain_steps=30,
                n_pretrain_dialogues=400,
                report_samples=4,
                report_max_new_tokens=16,
            ).model_dump(),
            "tokenize": {"max_prompt_length": 48, "max_response_length": 32},
            "refpass": {"k": 16, "pairs_per_shard": 64},
            "train": {
                "iav": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "eval_every": 4},
                "calm": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "rank": 4, "eval_every": 4},
            },
            "sweep": {"alphas": [0, 1], "n_prompts": 4, "max_new_tokens": 8, "batch_size": 4},
            "evaluate": {"target_kls": []},  # no α calibration here (tested on its own)
        }
    ).resolved()


@pytest.fixture(scope="module")
def filled(prefect_harness, tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("stages") / "store")
    return cfg, pipeline(config=cfg)


def test_refpass_flow_reuses_the_pipelines_cache(filled):
    cfg, outcomes = filled
    out = refpass_flow(
        tokenize_key=outcomes.tokenize.key, store=cfg.store, model=cfg.model, refpass=cfg.refpass
    )
    assert out.refpass.key == outcomes.refpass.key
    assert out.refpass.status == "cached"


def test_refpass_flow_builds_a_new_cache_from_the_tokenize_key(filled):
    cfg, outcomes = filled
    other = cfg.refpass.model_copy(update={"k": 8})
    out = refpass_flow(tokenize_key=outcomes.tokenize.key, store=cfg.store, model=cfg.model, refpass=other)
    assert out.refpass.status == "computed" and out.refpass.key != outcomes.refpass.key
    manifest = verify_artifact(Path(out.refpass.path), "refpass")
    assert manifest.config["k"] == 8 and manifest.inputs["tokenize"] == outcomes.tokenize.key


def test_train_flow_reuses_heads_and_tracks_a_parent_run(filled):
    from mlflow.tracking import MlflowClient

    cfg, outcomes = filled
    out = train_flow(
        refpass_key=outcomes.refpass.key,
        store=cfg.store,
        name=cfg.name,
        model=cfg.model,
        train=cfg.train,
        tracking=cfg.tracking,
    )
    assert {k: (v.key, v.status) for k, v in out.stages()} == {
        "train iav": (outcomes.train["iav"].key, "cached"),
        "train calm": (outcomes.train["calm"].key, "cached"),
    }
    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.store / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.name).experiment_id],
        filter_string=f"params.refpass_key = '{outcomes.refpass.key}'",
    )
    assert len(runs) == 1  # this flow run's parent run
    children = client.search_runs(
        [runs[0].info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'"
    )
    # both heads were cached: no child-run copies; the parent says so and names the runs that trained them
    assert sorted(r.info.run_name for r in children) == []
    assert runs[0].data.tags["alignheads.cached"] == "true"
    assert {"alignheads.reused.train-calm", "alignheads.reused.train-iav"} <= set(runs[0].data.tags)


def test_a_baseline_trained_and_swept_by_the_stage_flows(filled):
    """train_flow trains an enabled baseline (DPO + DeRa) over the cache as a train artifact like
    the heads'; sweep_flow sweeps it from its train key alone, with the heads' prompts, seeds and
    evaluation."""
    cfg, outcomes = filled
    dpo = cfg.train.dpo.model_copy(update={"enabled": True, "batch_size": 16, "lr": 1e-3})
    off = {kind: getattr(cfg.train, kind).model_copy(update={"enabled": False}) for kind in ("iav", "calm")}
    train = cfg.train.model_copy(update={"dpo": dpo, **off})
    trained = train_flow(
        refpass_key=outcomes.refpass.key, store=cfg.store, name=cfg.name, model=cfg.model, train=train
    )
    assert list(trained.train) == ["dpo-dera"] and trained.train["dpo-dera"].status == "computed"
    key = trained.train["dpo-dera"].key
    assert Path(trained.train["dpo-dera"].path) == cfg.store / "train" / key
    assert (Path(trained.train["dpo-dera"].path) / "model" / "model.safetensors").is_file()
    out = sweep_flow(
        train_keys=[key],
        data_key=outcomes.data.key,
        store=cfg.store,
        name=cfg.name,
        model=cfg.model,
        sweep=cfg.sweep,
        # α calibrated to a target KL on 4 calibration prompts disjoint from the 4 evaluation ones
        evaluate=EvaluateConfig(target_kls=[0.05], calibration_prompts=4),
    )
    assert out.model_loads == {"dpo-dera": 1}  # calibration, generations and accuracy share one load
    (found,) = out.calibrate["dpo-dera"].info["targets"]
    alpha = found["alpha"]
    assert alpha > 0 and found["target"] == 0.05
    assert {k: v.status for k, v in out.stages()} == {
        "train dpo-dera": "reused",
        "calibrate dpo-dera": "computed",
        "generate dpo-dera α=0": "computed",
        "generate dpo-dera α=1": "computed",
        f"generate dpo-dera α={alpha:.4g}": "computed",
        "accuracy dpo-dera": "computed",
        "evaluate": "computed",
        "report": "computed",
    }
    rows = run_query(
        cfg.store,
        f"SELECT head, alpha, kl, reward, reward_lo, reward_hi, n_prompts FROM summary "
        f"WHERE artifact = '{out.evaluate.key}' ORDER BY alpha",
    ).to_pylist()
    assert [(r["head"], r["alpha"]) for r in rows] == sorted([("dpo-dera", 0.0), ("dpo-dera", 1.0), ("dpo-dera", alpha)])
    assert all(r["reward_lo"] <= r["reward"] <= r["reward_hi"] and r["n_prompts"] == 4 for r in rows)
    # the calibrated point, measured on the evaluation prompts; and its paired comparison with α = 0
    (point,) = run_query(cfg.store, f"SELECT * FROM calibrated WHERE artifact = '{out.evaluate.key}'").to_pylist()
    assert (point["head"], point["alpha"], point["calibration_kl"]) == ("dpo-dera", alpha, found["kl"])
    (pair,) = run_query(cfg.store, f"SELECT * FROM comparisons WHERE artifact = '{out.evaluate.key}'").to_pylist()
    at = {r["alpha"]: r["reward"] for r in rows}
    assert (pair["head_a"], pair["head_b"], pair["alpha_b"]) == ("dpo-dera", "α=0", 0.0)
    assert pair["reward_diff"] == pytest.approx(at[alpha] - at[0.0])
    assert pair["diff_lo"] <= pair["reward_diff"] <= pair["diff_hi"]
    by_alpha = {
        a: {r["prompt_id"] for r in run_query(
            cfg.store, f"SELECT prompt_id FROM generations WHERE head = 'dpo-dera' AND alpha = {a}").to_pylist()}
        for a in (0.0, alpha)
    }  # fmt: skip
    assert by_alpha[0.0] == by_alpha[alpha] and len(by_alpha[alpha]) == 4  # the evaluation prompts
    rows = [r for r in rows if r["alpha"] in (0.0, 1.0)]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # DeRa at α = 0 is the reference
    # the same prompts and seeds as the heads' generations
    seeds = run_query(
        cfg.store,
        "SELECT count(DISTINCT seed) AS n FROM generations WHERE alpha = 0 GROUP BY prompt_id, sample_index",
    ).column("n")
    assert set(seeds.to_pylist()) == {1}
    with pytest.raises(MissingArtifactError, match=r"train_keys\[1\]='nope'"):
        sweep_flow(train_keys=[key, "nope"], data_key=outcomes.data.key, store=cfg.store)


def test_sweep_flow_generates_only_new_alphas(filled):
    cfg, outcomes = filled
    sweep = cfg.sweep.model_copy(update={"alphas": [0.0, 0.5]})
    out = sweep_flow(
        train_keys=[outcomes.train["iav"].key, outcomes.train["calm"].key],
        data_key=outcomes.data.key,
        store=cfg.store,
        name=cfg.name,
        model=cfg.model,
        sweep=sweep,
        evaluate=cfg.evaluate,
        tracking=cfg.tracking,
    )
    assert {k: v.status for k, v in out.stages()} == {
        "train iav": "reused",
        "train calm": "reused",
        "generate iav α=0": "reused",  # one task per method: it ran for α = 0.5 and found α = 0 built
        "generate iav α=0.5": "computed",
        "generate calm α=0": "reused",
        "generate calm α=0.5": "computed",
        "accuracy iav": "computed",  # at the new α too
        "accuracy calm": "computed",
        "evaluate": "computed",
        "report": "computed",
    }
    assert out.generate[0].key == outcomes.generate[0].key and out.generate[0].info["alpha"] == 0.0
    rows = run_query(
        cfg.store,
        f"SELECT head, alpha FROM summary WHERE artifact = '{out.evaluate.key}' ORDER BY head, alpha",
    ).to_pylist()
    assert [(r["head"], r["alpha"]) for r in rows] == [
        ("calm", 0.0),
        ("calm", 0.5),
        ("iav", 0.0),
        ("iav", 0.5),
    ]


def test_stage_flows_name_the_missing_key(filled):
    cfg, outcomes = filled
    with pytest.raises(MissingArtifactError, match=r"refpass_key='0123abc': no complete refpass artifact"):
        train_flow(
            refpass_key="0123abc", store=cfg.store, model=cfg.model, train=cfg.train, tracking=cfg.tracking
        )
    with pytest.raises(MissingArtifactError, match=r"train_keys\[1\]='nope': no complete train artifact"):
        sweep_flow(
            train_keys=[outcomes.train["iav"].key, "nope"],
            data_key=outcomes.data.key,
            store=cfg.store,
            model=cfg.model,
            sweep=cfg.sweep,
        )
    # a key of another stage is not accepted in its place
    with pytest.raises(MissingArtifactError, match="tokenize_key="):
        refpass_flow(tokenize_key=outcomes.data.key, store=cfg.store, model=cfg.model)


def test_task_runs_are_named_after_their_method(filled):
    """Prefect's task runs say what they did: `train-iav`, `train-calm`, `refpass-shard-0`, … (the
    names the UI lists), not the task's name with a counter (issue 21, item 9)."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def names() -> set[str]:
        async with get_client() as client:
            return {run.name for run in await client.read_task_runs(limit=200)}

    seen = asyncio.run(names())
    assert {"train-iav", "train-calm", "refpass-shard-0", "data", "tokenize"} <= seen, sorted(seen)
    # the name of a task over one method's plans, with their α (the generate stage's)
    from alignheads.tasks.cached import method_run_name

    name = method_run_name("generate")
    assert name(parameters={"plans": [{"head": "calm", "alpha": 1.0}]}) == "generate-calm-a1.0"
    assert name(parameters={"plans": [{"head": "iav", "alpha": 0}, {"head": "iav", "alpha": 2}]}) == (
        "generate-iav-a0.0,2.0"
    )
    assert method_run_name("calibrate")(parameters={"plan": {"head": "genarm"}}) == "calibrate-genarm"
