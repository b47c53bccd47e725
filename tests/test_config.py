"""Run configs: YAML loading, --set overrides, errors that name the key, store resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignheads.config import (
    EMBEDDED_DEFAULT,
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    parse_override,
    read_config,
    shipped_config,
    shipped_config_names,
    with_overrides,
)


def test_default_config_is_the_tiny_world(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert EMBEDDED_DEFAULT == "tiny.yaml"
    assert cfg.name == "tiny" and cfg.needs_world and cfg.world.build
    assert cfg.store == tmp_path / "store"  # absolute, resolved against the working directory
    assert cfg.store.is_absolute()


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        None,
        [
            "tokenize.max_prompt_length=256",
            "world.pretrain_lr=1e-4",
            f"store={tmp_path}/s",
            "data.train.path=my.jsonl",
            "data.train.limit=10",
            "model.name_or_path=org/model",
        ],
    )
    assert cfg.tokenize.max_prompt_length == 256
    assert cfg.world.pretrain_lr == pytest.approx(1e-4)
    assert cfg.store == tmp_path / "s"
    assert cfg.data.train is not None and cfg.data.train.path == "my.jsonl" and cfg.data.train.limit == 10
    assert cfg.data.test is None and cfg.uses_world_data and not cfg.uses_world_model


def test_parse_override_values_are_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[0, 0.5, 1]") == (["a"], [0, 0.5, 1])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=") == (["a"], "")
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="expected key.path=value"):
            parse_override(bad)


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="name is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "tokenize.max_prompt_length=-1",
            "tokenize.max_prompt_length: Input should be greater than 0 (got -1)",
        ),
        ("tokenize.max_prompt_lenght=5", "tokenize.max_prompt_lenght: unknown key"),
        ("data.on_bad_rows=ignore", "data.on_bad_rows: Input should be 'error' or 'skip'"),
        ("world.n_train_pairs=lots", "world.n_train_pairs: Input should be a valid integer"),
        ("bogus=1", "bogus: unknown key"),
        ("name=a/b", "name: Value error, must be a non-empty name without slashes"),
        ("data.train.limit=3", "data.train.path: Field required"),
    ],
)
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    # the mistake is the --set item's, not the config file's (issue 21, item 5)
    assert str(info.value).startswith(f"invalid configuration (--set {override}):")
    assert "tiny.yaml" not in str(info.value)


def test_a_misspelt_key_names_the_closest_one_and_where_it_came_from(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("name: x\ntokenize: {max_promt_length: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, ["data.train={path: pairs.jsonl, lmit: 3}", "refpass.k=8"])
    assert str(info.value).splitlines() == [
        f"invalid configuration ({config}, --set data.train={{path: pairs.jsonl, lmit: 3}}):",
        "  data.train.lmit: unknown key; did you mean 'limit'? (from --set data.train={path: pairs.jsonl, lmit: 3})",
        "  tokenize.max_promt_length: unknown key; did you mean 'max_prompt_length'?",
    ]
    with pytest.raises(ConfigError, match=r"  stor: unknown key; did you mean 'store'\?$"):
        load_config(None, ["stor=elsewhere"])
    with pytest.raises(ConfigError, match=r"  train\.xyz: unknown key$"):  # nothing close
        load_config(None, ["train.xyz=1"])
    # the pipeline flow's `overrides` parameter is blamed the same way
    with pytest.raises(ConfigError) as info:
        with_overrides(load_config(None), ["sweep.alphaz=[1]"])
    assert str(info.value).splitlines() == [
        "invalid configuration (overrides item sweep.alphaz=[1]):",
        "  sweep.alphaz: unknown key; did you mean 'alphas'?",
    ]


def test_yaml_problems_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_validates():
    names = shipped_config_names()
    assert {"tiny.yaml", "llama7b-hh.yaml"} <= set(names)
    for name in names:
        text = shipped_config(name).read_text(encoding="utf-8")
        path = Path("configs") / name
        assert isinstance(read_config(Path(__file__).parents[1] / path), RunConfig), name
        assert text == (Path(__file__).parents[1] / path).read_text(encoding="utf-8")


def test_config_round_trips_through_json():
    cfg = load_config(None, ["data.train.path=x.parquet"])
    again = RunConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg


def test_refpass_section_defaults_and_validation():
    from alignheads.config import RefPassConfig

    cfg = load_config(None, ["runner.kind=dask", "refpass.dtype=float32"])
    assert cfg.refpass.k == 64 and cfg.refpass.dtype == "float32" and cfg.runner.kind == "dask"
    assert cfg.refpass.reference_model is None and not cfg.refpass.store_hidden
    assert all(f.description for f in RefPassConfig.model_fields.values())  # the Prefect UI form shows them
    for override, message in [
        ("refpass.k=0", "refpass.k: Input should be greater than or equal to 1"),
        ("refpass.dtype=bfloat16", "refpass.dtype: Input should be 'float16' or 'float32'"),
        ("runner.kind=ray", "runner.kind: Input should be 'threads', 'processes' or 'dask'"),
        ("refpass.task_runner=dask", "refpass.task_runner: unknown key"),
        ("refpass.kk=3", "refpass.kk: unknown key"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert message in str(info.value), override


# --- a data source given as a plain path (issue 18, item 9) -----------------------------------


def test_a_source_may_be_a_plain_path(tmp_path):
    """`--set data.train=pairs.jsonl` (and `train: pairs.jsonl` in YAML) was refused with "Input
    should be a valid dictionary": a user had to write `{path: pairs.jsonl}`."""
    from alignheads.config import DataConfig, SourceConfig

    cfg = load_config(None, ["data.train=pairs.jsonl", "data.test=org/hh-rlhf"])
    assert cfg.data.train == SourceConfig(path="pairs.jsonl")
    assert cfg.data.test == SourceConfig(path="org/hh-rlhf")
    assert not cfg.uses_world_data
    written = tmp_path / "run.yaml"
    written.write_text("data:\n  train: mine.jsonl\n  test: {path: held.jsonl, limit: 5}\n")
    from_yaml = load_config(written)
    assert from_yaml.data.train == SourceConfig(path="mine.jsonl")
    assert from_yaml.data.test == SourceConfig(path="held.jsonl", limit=5)  # the mapping still works
    assert DataConfig(train=tmp_path / "a.jsonl").train == SourceConfig(path=str(tmp_path / "a.jsonl"))
    # the dumped config holds the mapping form, and reads back equal
    assert cfg.model_dump(mode="json")["data"]["train"]["path"] == "pairs.jsonl"
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg
    for override, message in [
        ("data.train=", "data.train: Value error, empty path"),
        ("data.train=[a.jsonl]", "data.train: Value error, expected a path or a mapping"),
        ("data.test=3", "data.test: Value error, expected a path or a mapping"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert message in str(info.value), override


def test_a_plain_path_source_has_the_mapping_forms_cache_key(tmp_path):
    """The same source gives the same data key either way, and the mapping form's key is the one
    it had before paths were accepted (pinned: caches built before stay valid)."""
    from alignheads.config import DataConfig
    from alignheads.tasks.data import plan_data

    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n')
    (tmp_path / "test.jsonl").write_text('{"prompt": "q", "chosen": " c", "rejected": " d"}\n')
    train, test = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
    mapping = DataConfig.model_validate({"train": {"path": train}, "test": {"path": test, "limit": 5}})
    plain = DataConfig.model_validate({"train": train, "test": {"path": test, "limit": 5}})
    key = plan_data(mapping, None, None, "tokenizer-fp").key
    assert key == "ca1ccab9a47e1491"  # pinned (data format version 2: test pairs repeating a train prompt are dropped)
    assert plan_data(plain, None, None, "tokenizer-fp").key == key


def test_the_comparison_config_reuses_the_embedded_defaults_trained_artifacts():
    """configs/compare.yaml differs from the embedded default only in its evaluation, so running
    it after `alignheads run` reuses the world, data, reference pass and every trained method."""
    from pathlib import Path

    from alignheads.config import read_config

    compare, tiny = read_config(Path(__file__).parents[1] / "configs" / "compare.yaml"), read_config()
    for section in ("store", "world", "model", "data", "tokenize", "refpass", "train"):
        assert getattr(compare, section) == getattr(tiny, section), section
    assert compare.sweep.prompt_set == "tiny-world" and compare.sweep.n_prompts * compare.sweep.n_samples >= 4 * (
        tiny.sweep.n_prompts * tiny.sweep.n_samples
    )
