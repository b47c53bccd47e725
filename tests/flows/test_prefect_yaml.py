"""prefect.yaml cannot drift from the shipped configs: each pipeline deployment starts from the
config of its name, and every entrypoint names a flow that exists."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from alignheads.config import RunConfig, read_config, shipped_config_names

REPO = Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    return {d["name"]: d for d in spec["deployments"]}


def test_pipeline_deployments_carry_the_shipped_config_of_their_name():
    pipelines = {n: d for n, d in _deployments().items() if d["entrypoint"] == "flows/pipeline.py:pipeline"}
    assert set(pipelines) == {"tiny", "llama7b-hh"}
    for name, deployment in pipelines.items():
        assert f"{name}.yaml" in shipped_config_names()
        shipped = read_config(REPO / "configs" / f"{name}.yaml")
        assert RunConfig.model_validate(deployment["parameters"]["config"]) == shipped, name
    # the embedded default, as `alignheads run` and `pipeline()` read it, is the tiny deployment's
    assert RunConfig.model_validate(pipelines["tiny"]["parameters"]["config"]) == read_config()
    # and it is not the pydantic models' seed defaults (the tiny world needs its own settings)
    assert read_config().train.iav.lr == 5e-3 != RunConfig().train.iav.lr


def test_every_entrypoint_is_a_prefect_flow():
    for name, deployment in _deployments().items():
        path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module("alignheads." + path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert hasattr(flow, "fn") and flow.name.startswith("alignheads-"), name


def test_stage_deployments_default_to_the_embedded_default():
    """Given only the input keys, a stage deployment runs with configs/tiny.yaml's settings, so it
    finds what the tiny pipeline built instead of building it again under other keys: each
    parameter that is a section of the run config (or its name, or its store) defaults to that
    config's value, from the deployment's parameters or else the flow's own default."""
    import inspect

    tiny = read_config()
    stage_flows = {n: d for n, d in _deployments().items() if d["entrypoint"].startswith("flows/stages.py")}
    assert set(stage_flows) == {"refpass", "train", "sweep"}
    checked = set()
    for name, deployment in stage_flows.items():
        path, func = deployment["entrypoint"].split(":")
        module = importlib.import_module("alignheads." + path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        given = deployment.get("parameters") or {}
        for param in inspect.signature(flow.fn).parameters.values():
            if param.name not in RunConfig.model_fields:
                continue  # the input keys
            default = given.get(param.name, param.default)
            want = getattr(tiny, param.name)
            value = want.model_validate(default) if hasattr(want, "model_validate") else type(want)(default)
            assert value == want, f"{name}: {param.name}"
            checked.add(param.name)
    assert {"train", "refpass", "sweep", "model", "evaluate", "tracking", "name", "store"} <= checked


def test_the_tune_deployment_carries_the_shipped_search_space():
    """The `tune` deployment's form starts from the search `alignheads tune` runs without
    `--space` (configs/spaces/tiny.yaml, package data), so the two cannot drift apart."""
    from alignheads.config import SearchSpace, load_search_space

    deployment = _deployments()["tune"]
    assert deployment["entrypoint"] == "flows/tune.py:tune"
    assert SearchSpace.model_validate(deployment["parameters"]["space"]) == load_search_space()
    assert set(load_search_space().methods()) == {"iav", "calm", "genarm", "dpo"}  # every method
