"""Typed run configuration: one YAML file per run, `--set a.b=value` overrides, errors naming the key.

The pydantic models here double as Prefect flow parameters, so every field carries a
description that the Prefect UI shows in its form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignheads.sweep_config import SweepConfig
from alignheads.training.config import TrainConfig
from alignheads.world.config import WorldConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


class ConfigError(ValueError):
    """A run configuration that cannot be loaded; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The frozen causal LM the heads steer."""

    name_or_path: str | None = Field(
        None, description="Hub id or local directory; empty uses the tiny world's model"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(
        False, description="Run model code from the Hub (off unless you trust it)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype")


class SourceConfig(_Section):
    """One preference-data source: a local JSONL/JSON/Parquet file or a Hugging Face dataset id."""

    path: str = Field(..., description="Local file (.jsonl, .json, .parquet) or Hub dataset id")
    split: str | None = Field(None, description="Hub split (e.g. 'train'); ignored for local files")
    subset: str | None = Field(None, description="Hub dataset config name or data_dir")
    revision: str | None = Field(None, description="Hub dataset revision")
    limit: int | None = Field(None, gt=0, description="Keep only the first N rows")


class DataConfig(_Section):
    """Preference pairs (prompt, chosen, rejected) for training and held-out evaluation."""

    train: SourceConfig | None = Field(None, description="Training pairs; empty uses the tiny world's")
    test: SourceConfig | None = Field(None, description="Held-out pairs; empty uses the tiny world's")
    format: Literal["auto", "trl", "hh", "conversational"] = Field(
        "auto", description="Row format; 'auto' detects it from the first row"
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="'error' stops at the first bad row; 'skip' records it in the rejects table"
    )


class TokenizeConfig(_Section):
    """Token limits: prompts are cut from the left, responses from the right."""

    max_prompt_length: int = Field(128, gt=0, description="Maximum prompt tokens (left-truncated)")
    max_response_length: int = Field(
        64, gt=1, description="Maximum response tokens incl. EOS (right-truncated)"
    )


class RefPassConfig(_Section):
    """The reference pass: per response token, the reference model's log-prob of the actual token
    and its top-k distribution, cached as sharded Parquet (the `refcache` table)."""

    k: int = Field(
        64,
        ge=1,
        description="Top-k reference log-probs kept per response token (at most the vocabulary size)",
    )
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage dtype of the top-k log-probs (and of nothing else)"
    )
    store_hidden: bool = Field(
        False,
        description="Also store the float16 last hidden state predicting each response token "
        "(heads can then train without the backbone; large: hidden_size x 2 bytes per token)",
    )
    reference_model: str | None = Field(
        None,
        description="Hub id or local directory of the reference model; empty uses the run's own "
        "model with its own lm_head. Its tokenizer must be identical to the run's.",
    )
    reference_revision: str | None = Field(
        None, description="Hub revision of reference_model (pin it: the cache key records it)"
    )
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass (length-sorted batches)")
    pairs_per_shard: int = Field(
        512, gt=0, description="Preference pairs per shard (the unit of parallel work and of resume)"
    )
    device: str = Field(
        "auto", description="Torch device for the reference model: auto, cpu, cuda, cuda:1, ..."
    )


class RunnerConfig(_Section):
    """Where the mapped work runs: the reference pass's shards and the α-sweep's generations are
    Prefect tasks submitted to this task runner."""

    kind: Literal["threads", "dask"] = Field(
        "threads",
        description="Prefect task runner: threads of this process, or a Dask cluster (prefect-dask)",
    )
    max_workers: int = Field(
        1, gt=0, description="Tasks run at once (threads; or the local Dask cluster's workers)"
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of an existing Dask cluster (e.g. tcp://127.0.0.1:8786); empty starts "
        "a local cluster in this process (max_workers workers, one thread each, bound to 127.0.0.1)",
    )


class EvaluateConfig(_Section):
    """Scoring the α-sweep's generations."""

    reward: str = Field(
        "world",
        description="'world' (the tiny world's ground-truth reward) or a Hugging Face reward model "
        "id / directory (AutoModelForSequenceClassification with one label)",
    )
    reward_revision: str | None = Field(None, description="Hub revision of the reward model")
    batch_size: int = Field(16, gt=0, description="Sequences per reward-model forward")


class TrackingConfig(_Section):
    """MLflow tracking: a parent run per pipeline run, child runs per trained head."""

    enabled: bool = Field(True, description="Log runs, metrics and artifacts to MLflow")
    uri: str | None = Field(
        None,
        description="Tracking URI; empty uses $MLFLOW_TRACKING_URI, else sqlite:///<store>/mlflow.db",
    )


class RunConfig(_Section):
    """A whole pipeline run."""

    name: str = Field("tiny", description="Run name; also the MLflow experiment name")
    store: Path = Field(
        Path("store"), description="Directory holding every artifact, table and the MLflow DB"
    )
    world: WorldConfig = Field(default_factory=WorldConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    refpass: RefPassConfig = Field(default_factory=RefPassConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0"):
            raise ValueError("must be a non-empty name without slashes")
        return v

    def resolved(self) -> RunConfig:
        """A copy whose store is an absolute path (resolved once, against the working directory)."""
        return self.model_copy(update={"store": self.store.expanduser().resolve()})

    @property
    def uses_world_model(self) -> bool:
        return self.model.name_or_path is None

    @property
    def uses_world_data(self) -> bool:
        return self.data.train is None or self.data.test is None

    @property
    def needs_world(self) -> bool:
        return self.uses_world_model or self.uses_world_data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as YAML); raises ConfigError when malformed."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b=value` in a nested dict, creating intermediate dicts; returns the dict."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the dotted key, e.g. `world.hidden_size: ...`."""
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (default: configs/tiny.yaml), apply overrides, resolve the store."""
    return read_config(path, overrides).resolved()


def with_overrides(cfg: RunConfig, overrides: list[str], source: str = "overrides") -> RunConfig:
    """``cfg`` with ``key.path=value`` overrides applied (as ``--set`` does), validated again."""
    raw = apply_overrides(cfg.model_dump(mode="json"), list(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from YAML (default: configs/tiny.yaml) with overrides; the store stays as written."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc
    return cfg
