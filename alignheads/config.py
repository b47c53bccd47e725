"""Typed run configuration: one YAML file per run, `--set a.b=value` overrides, errors naming the key.

The pydantic models here double as Prefect flow parameters, so every field carries a
description that the Prefect UI shows in its form.

Why one module of about 500 lines: it is the one schema of a run, every section and its defaults
in one place (a second config module is how defaults drifted apart before). Most of its lines
are field descriptions the UI shows.
"""

from __future__ import annotations

import copy
import math
from importlib import resources
from os import PathLike, fspath
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The embedded default ships inside the package (alignheads.configs, package data), so it is found
# from a wheel or a non-editable install as well as from a checkout; it is read when asked for,
# never at import time.
CONFIG_PACKAGE = "alignheads.configs"
EMBEDDED_DEFAULT = "tiny.yaml"


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

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, value: Any) -> Any:
        """A plain path is a source: `data.train: pairs.jsonl` (or `--set data.train=pairs.jsonl`)
        means `{path: pairs.jsonl}`, with the same fingerprint and so the same cache keys."""
        if isinstance(value, str | PathLike):
            path = fspath(value)
            if not path.strip():
                raise ValueError("empty path: give a file or a Hub dataset id (null uses the tiny world's)")
            return {"path": path}
        if value is not None and not isinstance(value, dict | BaseModel):
            raise ValueError(
                f"expected a path or a mapping such as {{path: pairs.jsonl, limit: 100}}, "
                f"got {type(value).__name__}"
            )
        return value


class DataConfig(_Section):
    """Preference pairs (prompt, chosen, rejected) for training and held-out evaluation."""

    train: SourceConfig | None = Field(
        None, description="Training pairs: a path, or a source mapping; empty uses the tiny world's"
    )
    test: SourceConfig | None = Field(
        None, description="Held-out pairs: a path, or a source mapping; empty uses the tiny world's"
    )
    format: Literal["auto", "trl", "hh", "conversational"] = Field(
        "auto", description="Row format; 'auto' detects it from the first row"
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="'error' stops at the first bad row; 'skip' records it in the rejects table"
    )
    train_overlap: Literal["drop", "keep"] = Field(
        "drop",
        description="Held-out pairs and sweep prompts whose prompt is word for word a training "
        "prompt: 'drop' leaves them out (held-out means unseen), 'keep' keeps them; either way "
        "the count is reported",
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
        description="Also store the last hidden state predicting each response token, in "
        "hidden_dtype (heads can then train without the backbone, features: cached; large: "
        "hidden_size x 4 bytes per token in float32, x 2 in float16)",
    )
    hidden_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Storage dtype of the cached hidden states (with store_hidden). float32 keeps "
        "exactly the states the cached reference log-probs and top-k come from, so features: cached "
        "is the same training as features: backbone; float16 halves the size, and heads trained "
        "from it see rounded states (a fresh head then starts ~1e-4 off the reference; the cached "
        "reference values stay the full-precision model's, which every other method reads)",
    )
    tail_draws: int = Field(
        0,
        ge=0,
        description="Token ids drawn per response token from the reference's distribution outside "
        "its top k (with replacement), stored with their log-probs: IAV's kl: sampled then "
        "estimates the KL without bias from the top k plus these draws (0: none; 6 bytes per draw "
        "and token in float16)",
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


# --- the tiny world ---------------------------------------------------------------------------


class WorldConfig(_Section):
    """The embedded default: a tiny stand-in for 'Llama-7B SFT + HH-RLHF', built on the CPU."""

    build: bool = Field(True, description="Build (or reuse) the tiny world when model or data come from it")
    seed: int = Field(0, description="Seed for the corpus, tokenizer and pretraining")
    n_train_pairs: int = Field(2000, gt=0, description="Training preference pairs")
    n_test_pairs: int = Field(400, gt=0, description="Held-out preference pairs (each with its own prompt, none a training prompt)")
    vocab_size: int = Field(512, ge=64, description="BPE vocabulary size")
    hidden_size: int = Field(128, gt=0, description="Model width")
    num_layers: int = Field(3, gt=0, description="Transformer layers")
    num_heads: int = Field(4, gt=0, description="Attention heads")
    intermediate_size: int = Field(384, gt=0, description="MLP width")
    max_position_embeddings: int = Field(256, gt=0, description="Longest sequence the model handles")
    pretrain_steps: int = Field(1000, gt=0, description="Pretraining optimizer steps")
    pretrain_batch_size: int = Field(32, gt=0, description="Pretraining sequences per step")
    pretrain_lr: float = Field(2e-3, gt=0, description="Pretraining peak learning rate")
    pretrain_warmup_frac: float = Field(
        0.05, ge=0, lt=1, description="Share of pretraining steps spent warming the learning rate up"
    )
    n_pretrain_dialogues: int = Field(20000, gt=0, description="Dialogues in the pretraining corpus")
    good_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of pretraining responses in a good style (the rest are bad)"
    )
    multi_turn_prob: float = Field(
        0.15, ge=0, le=1, description="Chance that a dialogue starts with one earlier exchange"
    )
    held_out_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of questions kept out of the training pairs (test-only)"
    )
    report_samples: int = Field(
        128, gt=0, description="Test prompts sampled from the base model for the report"
    )
    report_max_new_tokens: int = Field(96, gt=0, description="Longest base-model sample in the report")
    n_objective_train_pairs: int = Field(
        1000, gt=0, description="Training pairs per objective (helpful, polite, concise) for the dials"
    )
    n_objective_test_pairs: int = Field(
        200, gt=0, description="Held-out pairs per objective (each prompt unseen in training)"
    )


# --- training (heads and baselines) -------------------------------------------------------------


class PreferenceTrainConfig(_Section):
    """What every method trained on the preference pairs shares: batching, optimizer, schedule,
    evaluation and the preference loss's β and NLL anchor."""

    batch_size: int = Field(
        8, gt=0, description="Pairs per optimizer step, over all processes and accumulation"
    )
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step")
    epochs: int = Field(1, gt=0, description="Passes over the training pairs")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm)")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout")
    eval_every: int = Field(50, gt=0, description="Evaluate on the held-out pairs every N steps")
    beta: float = Field(0.1, gt=0, description="DPO temperature β (the preference loss's β)")
    lambda_nll: float = Field(
        0.0,
        ge=0,
        description="Weight of the chosen responses' per-token NLL (an RPO-style anchor against DPO "
        "lowering the chosen likelihood too); 0 is the plain objective of docs/architecture.md",
    )
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast (CPU or GPU)")
    num_processes: int = Field(
        1,
        gt=0,
        description="Processes for `accelerate launch` (GPUs, or CPU processes with gloo); 1 trains in-process",
    )
    checkpoint_every: int = Field(50, gt=0, description="Save a resumable checkpoint every N steps")
    resume: bool = Field(True, description="Continue from the latest checkpoint of the same run key")


class HeadTrainConfig(PreferenceTrainConfig):
    """What both heads' training loops share."""

    enabled: bool = Field(True, description="Train this head")
    features: Literal["backbone", "cached"] = Field(
        "backbone",
        description="'backbone' runs the frozen LM each step; 'cached' reads the reference pass's "
        "hidden states (needs refpass.store_hidden) and never runs the LM",
    )


class IAVTrainConfig(HeadTrainConfig):
    """IAV: base head (from lm_head) + zero-initialised alignment head."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW)")
    kl: Literal["topk", "sampled", "exact"] = Field(
        "topk",
        description="KL of the base head to the reference: 'topk' from the cache's top-k (the tail "
        "extrapolated), 'sampled' from the top-k and the cache's tail draws (refpass.tail_draws > 0; "
        "unbiased), 'exact' over the whole vocabulary: to the run model's own head, or to another "
        "reference model's (refpass.reference_model) over the hidden states the cache holds for it "
        "(refpass.store_hidden: true)",
    )
    lambda_kl: float = Field(0.1, ge=0, description="Weight of the KL to the reference")
    lambda_l2: float = Field(0.01, ge=0, description="Weight of mean ‖W_a h‖²")
    base_head: Literal["auto", "frozen", "trained"] = Field(
        "auto",
        description="The base head W_b: 'frozen' keeps it the LM's own lm_head (no optimizer state; "
        "α = 0 is the LM exactly); 'trained' learns it against the reference through the KL term; "
        "'auto' decides from the reference cache: frozen when the reference is the run's own model "
        "(refpass.reference_model empty), trained when refpass.reference_model names another",
    )


class CALMTrainConfig(HeadTrainConfig):
    """CALM: frozen lm_head + gated low-rank modulation."""

    rank: int = Field(32, gt=0, description="Rank R of the modulation")
    s_max: float = Field(5.0, gt=0, description="Largest gate strength")
    max_positions: int = Field(2048, gt=0, description="Rows of the position embedding")
    lambda_l2: float = Field(0.001, ge=0, description="Weight of mean ‖v‖²")
    lambda_var: float = Field(0.01, ge=0, description="Reward for strength variance (subtracted)")
    lambda_ent: float = Field(0.01, ge=0, description="Reward for policy entropy (subtracted)")


class BaselineTrainConfig(PreferenceTrainConfig):
    """A baseline that fine-tunes a whole copy of the LM (GenARM's reward LM, DPO for DeRa)."""

    enabled: bool = Field(False, description="Train this baseline and add it to the α sweep")
    batch_size: int = Field(16, gt=0, description="Pairs per optimizer step (over accumulation)")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW, every weight of the LM)")
    lora_rank: int | None = Field(
        None,
        gt=0,
        description="LoRA rank (peft) for large models: train adapters on lora_targets, merged into "
        "the weights after training; empty fine-tunes every weight",
    )
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is alpha/r · BA)")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear layers that get LoRA adapters (Llama's attention projections)",
    )


class GenARMTrainConfig(BaselineTrainConfig):
    """GenARM-style: an autoregressive reward LM trained with −log σ(β(log π_r(y_w) − log π_r(y_l)))."""


class DPOTrainConfig(BaselineTrainConfig):
    """DPO + DeRa: the whole LM fine-tuned with DPO against the cached reference log-probs."""


class TrainConfig(_Section):
    """The heads' and the baselines' training settings."""

    iav: IAVTrainConfig = Field(default_factory=IAVTrainConfig)
    calm: CALMTrainConfig = Field(default_factory=CALMTrainConfig)
    genarm: GenARMTrainConfig = Field(default_factory=GenARMTrainConfig)
    dpo: DPOTrainConfig = Field(default_factory=DPOTrainConfig)


# --- the alpha sweep ----------------------------------------------------------------------------


class SweepConfig(_Section):
    """α-sweep generation: for every trained head and every α, responses to the evaluation prompts."""

    alphas: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0],
        min_length=1,
        description="Values of the dial α to generate at (one cached artifact per head and α)",
    )
    n_prompts: int = Field(
        64, gt=0, description="Use the first N distinct prompts (test split, or the prompts file)"
    )
    prompts_file: str | None = Field(
        None,
        description=(
            "Prompts for real runs instead of the test split: .txt (one prompt per line), "
            ".jsonl (objects with a 'prompt' field) or .json (a list of strings or of such objects)"
        ),
    )
    prompt_set: Literal["hh-rlhf", "alpacaeval", "arena-hard", "tiny-world"] | None = Field(
        None,
        description=(
            "A named evaluation prompt set instead of the test split: HH-RLHF's test split, "
            "AlpacaEval or Arena-Hard from the Hub (its first n_prompts distinct prompts), or "
            "'tiny-world': as many distinct prompts of the tiny world's templates as asked for"
        ),
    )
    prompt_set_source: str | None = Field(
        None,
        description="Local file or directory (or another Hub id) of the same shape as the named "
        "prompt set; empty reads the set from the Hub",
    )
    prompt_set_revision: str | None = Field(None, description="Hub revision of the prompt set (pin it)")
    n_samples: int = Field(1, gt=0, description="Responses per prompt (sampling only when > 1)")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false)")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off)")
    max_new_tokens: int = Field(48, gt=0, description="Maximum generated tokens per response (EOS included)")
    max_prompt_length: int | None = Field(
        None,
        gt=0,
        description="Keep only the last N prompt tokens (the first BOS is kept); empty keeps whole prompts",
    )
    seed: int = Field(
        0,
        ge=0,
        description=(
            "Base seed; a row's seed depends only on it, the prompt's text and the sample index, "
            "so every method and α sees the same random numbers"
        ),
    )
    batch_size: int = Field(
        128,
        gt=0,
        description="Rows (prompt × α × sample) per generate() call; each row samples from its own "
        "seed, so this changes results only through float roundoff (it stays in the cache key)",
    )

    @field_validator("alphas")
    @classmethod
    def _finite_distinct(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"every α must be a finite number, got {bad}")
        seen: set[float] = set()
        dupes = sorted({v for v in values if v in seen or seen.add(v)})
        if dupes:
            raise ValueError(f"α listed more than once: {dupes}")
        return [float(v) + 0.0 for v in values]  # + 0.0 turns -0.0 into 0.0

    @model_validator(mode="after")
    def _one_prompt_source(self) -> SweepConfig:
        if self.prompt_set is not None and self.prompts_file:
            raise ValueError(
                f"give either prompts_file or prompt_set, not both (prompt_set is {self.prompt_set!r}: "
                "to use a prompts file, also set sweep.prompt_set=null)"
            )
        if self.prompt_set in (None, "tiny-world") and (self.prompt_set_source or self.prompt_set_revision):
            raise ValueError("prompt_set_source / prompt_set_revision need a prompt_set from the Hub")
        return self

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> SweepConfig:
        if self.n_samples > 1 and not self.do_sample:
            raise ValueError(
                f"n_samples is {self.n_samples} but do_sample is false: greedy decoding gives the same "
                "response every time; set do_sample: true or n_samples: 1"
            )
        return self

    def decoding(self) -> dict:
        """The settings the generated text depends on (besides model, head, α and prompts).

        Greedy decoding ignores temperature and top-p, so they are left out then.
        """
        out = {
            "do_sample": self.do_sample,
            "n_samples": self.n_samples,
            "max_new_tokens": self.max_new_tokens,
            "max_prompt_length": self.max_prompt_length,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }
        if self.do_sample:
            out |= {"temperature": self.temperature, "top_p": self.top_p}
        return out


class RunnerConfig(_Section):
    """Where the mapped work runs: the reference pass's shards and the α-sweep's generations are
    Prefect tasks submitted to this task runner."""

    kind: Literal["threads", "processes", "dask"] = Field(
        "threads",
        description="Prefect task runner: threads of this process, worker processes for the methods' "
        "sweeps and the dial families (one Python interpreter each: no lock shared between them; "
        "the reference pass's shards stay on threads, sharing one loaded model), or a Dask "
        "cluster (prefect-dask)",
    )
    max_workers: int = Field(
        1, gt=0, description="Tasks run at once (threads, processes, or the local Dask cluster's workers)"
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of an existing Dask cluster (e.g. tcp://127.0.0.1:8786); empty starts "
        "a local cluster in this process (max_workers workers, one thread each, bound to 127.0.0.1)",
    )
    torch_threads: int | None = Field(
        None,
        gt=0,
        description="torch's CPU threads for the whole run (empty: torch's own choice, OMP_NUM_THREADS "
        "or the cores). Float sums split over threads add in another order, so sampled tokens depend "
        "on the count: pin it where samples must reproduce on another machine. Not part of any key",
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
    target_kls: list[float] = Field(
        default_factory=lambda: [0.05, 0.10, 0.15],
        description="KL levels (nats per token to the base) at which methods are compared: each "
        "method's α is calibrated to each level on the calibration prompts, then generated on "
        "the evaluation prompts like any sweep point; empty skips the calibration",
    )
    calibration_prompts: int = Field(
        64, ge=0, description="Prompts for the α calibration, disjoint from the evaluation prompts"
    )
    calibration_tolerance: float = Field(
        0.05, gt=0, lt=1, description="Calibration stops within this relative distance of a target KL"
    )
    calibration_steps: int = Field(8, ge=0, description="Most search steps per method beyond the sweep's α grid")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of every bootstrap interval")
    bootstrap_resamples: int = Field(2000, ge=100, description="Bootstrap resamples per interval")

    @field_validator("target_kls")
    @classmethod
    def _positive_targets(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"every target KL must be a positive number, got {bad}")
        return sorted(set(values))


# --- dials: several heads on one backbone -----------------------------------------------------


WORLD_OBJECTIVES = ("helpful", "polite", "concise")  # the tiny world's objectives (its reward terms)


class DialConfig(_Section):
    """One dial: a head of either family trained on one objective's preference pairs, with its own
    data, reference pass and training artifact (cached and keyed like the run's own heads)."""

    method: Literal["iav", "calm"] = Field("iav", description="Head family of this dial")
    objective: str | None = Field(
        None,
        description="The tiny world's objective this dial learns and is scored on (helpful, polite, "
        "concise); empty: the dial's name",
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="This dial's preference pairs; empty train/test: the tiny world's pairs of its objective",
    )
    reward: str | None = Field(
        None,
        description="How the dial's objective is scored: empty for the tiny world's objective term, "
        "or a reward model id / directory (one label) for the objective",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="train.<method> settings changed for this dial (e.g. {lr: 1e-3, epochs: 3})",
    )


class DialsConfig(_Section):
    """Several dials on one backbone: `z = z_base + Σ_i α_i Δ_i(h)`, one forward pass of the LM, swept
    over a grid of α vectors and scored per objective (the dial_summary table, Pareto plots)."""

    enabled: bool = Field(False, description="Train the dials and sweep their α vectors")
    heads: dict[str, DialConfig] = Field(
        default_factory=dict, description="The dials by name (the α vector's keys)"
    )
    strengths: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0],
        min_length=1,
        description="Default grid: each dial alone at these α (the others at 0)",
    )
    together: float = Field(
        1.0, description="Default grid: every pair of dials, and all of them, at this α each"
    )
    grid: list[dict[str, float]] | None = Field(
        None,
        description="α vectors to sweep instead of the default grid ({dial: α}; missing dials are 0); "
        "the all-zero vector is always added",
    )
    n_prompts: int = Field(
        256, gt=0, description="Evaluation prompts of the dial sweep (the sweep's first N prompts)"
    )
    n_samples: int = Field(2, gt=0, description="Responses per prompt and α vector")
    genarm: bool = Field(
        False,
        description="Also run multi-objective GenARM on the same grid, prompts and seeds: one reward LM "
        "per dial (train.genarm settings) and log π_base + Σ α_i log π_r_i (K + 1 forwards per token)",
    )

    @field_validator("heads")
    @classmethod
    def _simple_names(cls, heads: dict[str, DialConfig]) -> dict[str, DialConfig]:
        for name in heads:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"dial name {name!r}: use letters, digits, '-' and '_' only")
        return heads

    @model_validator(mode="after")
    def _grid_names_known(self) -> DialsConfig:
        if self.enabled and not self.heads:
            raise ValueError("dials.enabled is true but dials.heads names no dial")
        for vector in self.grid or []:
            unknown = sorted(set(vector) - set(self.heads))
            if unknown:
                raise ValueError(
                    f"dials.grid names {', '.join(unknown)}, which dials.heads does not define"
                    + did_you_mean(unknown[0], self.heads)
                )
            bad = [a for a in vector.values() if not math.isfinite(a)]
            if bad:
                raise ValueError(f"every α of dials.grid must be a finite number, got {bad}")
        return self

    def objective_of(self, name: str) -> str:
        """The objective dial `name` learns (its own name unless `objective` says otherwise)."""
        return self.heads[name].objective or name


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
    dials: DialsConfig = Field(default_factory=DialsConfig)

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
        """Whether the run's own pairs (not the dials') come from the tiny world."""
        return self.data.train is None or self.data.test is None

    @property
    def dials_use_world_data(self) -> bool:
        """Whether an enabled dial trains on the tiny world's pairs of its objective."""
        dials = self.dials.heads.values() if self.dials.enabled else ()
        return any(d.data.train is None or d.data.test is None for d in dials)

    @property
    def needs_world(self) -> bool:
        return self.uses_world_model or self.uses_world_data or self.dials_use_world_data

    def dial_settings(self, name: str) -> HeadTrainConfig:
        """Dial `name`'s training settings: `train.<method>` with the dial's `settings` applied."""
        dial = self.dials.heads[name]
        base = getattr(self.train, dial.method)
        return type(base).model_validate({**base.model_dump(), **dial.settings, "enabled": True})

    @model_validator(mode="after")
    def _dials_resolve(self) -> RunConfig:
        if not self.dials.enabled:
            return self
        for name, dial in self.dials.heads.items():
            objective = self.dials.objective_of(name)
            world_data = dial.data.train is None or dial.data.test is None
            if objective not in WORLD_OBJECTIVES and (world_data or dial.reward is None):
                raise ValueError(
                    f"dials.heads.{name}: objective {objective!r} is not one of the tiny world's "
                    f"({', '.join(WORLD_OBJECTIVES)}){did_you_mean(objective, WORLD_OBJECTIVES)}; a dial "
                    "of another objective needs its own data.train, data.test and reward"
                )
            unknown = sorted(set(dial.settings) - set(type(getattr(self.train, dial.method)).model_fields))
            if unknown:
                raise ValueError(
                    f"dials.heads.{name}.settings: {unknown[0]!r} is not a train.{dial.method} setting"
                    + did_you_mean(unknown[0], type(getattr(self.train, dial.method)).model_fields)
                )
            try:
                self.dial_settings(name)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"dials.heads.{name}.settings.{where}: {first['msg']}") from None
        return self


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


def did_you_mean(word: str, choices: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a misspelt ``word`` (difflib),
    or ``""`` when none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The setting names of the config section at `loc` (a pydantic error location), or []."""
    import typing

    model: Any = RunConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        found = [
            t
            for t in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)


def _blamed(loc: tuple[Any, ...], overrides: list[str]) -> list[str]:
    """The overrides an error at `loc` comes from: the one sharing the longest leading part of
    its key with `loc` (the last given among equals), or all of them when none shares any."""

    def shared(item: str) -> int:
        parts = item.partition("=")[0].strip().split(".")
        same = [a == b for a, b in zip(parts, map(str, loc), strict=False)]
        return same.index(False) if False in same else len(same)

    best = max((shared(item) for item in overrides), default=0)
    return [item for item in overrides if shared(item) == best][-1:] if best else list(overrides)


def format_validation_error(
    exc: ValidationError,
    source: str,
    overrides: list[str] | None = None,
    before: dict[str, Any] | None = None,
    flag: str = "--set",
) -> str:
    """One line per problem, each naming the dotted key, e.g. `world.hidden_size: ...`; an
    unknown key says which known one is closest.

    With `overrides` and `before` (the settings as `source` gave them, before the overrides):
    a problem `source` alone does not have is blamed on the override it comes from
    (``invalid configuration (--set tokenize.max_promt_length=3):``), not on `source`.
    """
    own: set[tuple[tuple[Any, ...], str]] = set()
    if overrides and before is not None:
        try:
            RunConfig.model_validate(before)
        except ValidationError as alone:
            own = {(tuple(e["loc"]), e["type"]) for e in alone.errors()}
    problems: list[tuple[str, list[str]]] = []  # (line, the overrides it comes from)
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + did_you_mean(loc[-1], _section_fields(loc[:-1]))
        got = err.get("input")
        shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        from_overrides = bool(overrides) and before is not None and (loc, err["type"]) not in own
        problems.append((f"  {key}: {msg}{shown}", _blamed(loc, overrides or []) if from_overrides else []))
    sources = [source] if any(not items for _, items in problems) else []
    for _, items in problems:
        sources += [f"{flag} {item}" for item in items if f"{flag} {item}" not in sources]
    lines = [f"invalid configuration ({', '.join(sources)}):"]
    for line, items in problems:
        tail = f" (from {', '.join(f'{flag} {i}' for i in items)})" if items and len(sources) > 1 else ""
        lines.append(line + tail)
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (default: configs/tiny.yaml), apply overrides, resolve the store."""
    return read_config(path, overrides).resolved()


def with_overrides(cfg: RunConfig, overrides: list[str], source: str = "config") -> RunConfig:
    """``cfg`` with ``key.path=value`` overrides applied (as ``--set`` does), validated again;
    a problem is blamed on the override it comes from (``overrides item …``)."""
    before = cfg.model_dump(mode="json")
    raw = apply_overrides(copy.deepcopy(before), list(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        message = format_validation_error(exc, source, list(overrides), before, flag="overrides item")
        raise ConfigError(message) from exc


def shipped_config(name: str = EMBEDDED_DEFAULT) -> Any:
    """A run config shipped with the package (``configs/<name>`` in a checkout), as an
    importlib.resources Traversable."""
    return resources.files(CONFIG_PACKAGE).joinpath(name)


def shipped_config_names() -> list[str]:
    """The YAML run configs shipped with the package, sorted."""
    return sorted(f.name for f in resources.files(CONFIG_PACKAGE).iterdir() if f.name.endswith(".yaml"))


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from YAML (default: the shipped embedded default, configs/tiny.yaml) with
    overrides; the store stays as written."""
    source = Path(path) if path is not None else shipped_config()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    before = copy.deepcopy(raw)
    overrides = list(overrides or [])
    raw = apply_overrides(raw, overrides)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(source), overrides, before)) from exc
    return cfg


# --- the search space of `alignheads tune` ------------------------------------------------------

_SPACE_METHODS = ("iav", "calm", "genarm", "dpo")  # the sections of TrainConfig


class SearchSpace(_Section):
    """A search over training settings (`alignheads tune --space space.yaml`): for each method,
    the values to try of some of its `train.<method>` settings, e.g.
    ``{kind: random, trials: 4, iav: {lr: [1e-3, 2e-3]}, calm: {rank: [16, 32]}}``."""

    kind: Literal["grid", "random"] = Field(
        "grid", description="'grid': every combination; 'random': `trials` draws per method"
    )
    trials: int | None = Field(
        None, gt=0, description="Trials per method (random search; a grid's size when empty)"
    )
    seed: int = Field(0, description="Seed of the random search's draws")
    incumbent: bool = Field(
        False,
        description="Trial 0 of every method is the run config's own `train.<method>` settings (no "
        "values changed), so a search is never scored below them on validation; it counts in `trials`",
    )
    target_kl: float = Field(
        0.1, gt=0, description="A trial's score is its validation reward at the α calibrated to this KL"
    )
    validation_prompts: int = Field(
        32, gt=0, description="Validation prompts: the prompt source's next ones after the sweep's "
        "evaluation and calibration prompts (so disjoint from both)",
    )
    iav: dict[str, list[Any]] | None = Field(None, description="IAV settings to search")
    calm: dict[str, list[Any]] | None = Field(None, description="CALM settings to search")
    genarm: dict[str, list[Any]] | None = Field(None, description="GenARM settings to search")
    dpo: dict[str, list[Any]] | None = Field(None, description="DPO settings to search")

    @model_validator(mode="after")
    def _known_settings(self) -> SearchSpace:
        if not self.methods():
            raise ValueError(f"name at least one method to search ({', '.join(_SPACE_METHODS)})")
        for name, settings in self.methods().items():
            section = TrainConfig.model_fields[name].annotation
            known = [k for k in section.model_fields if k != "enabled"]
            for key, values in settings.items():
                if key not in known:
                    raise ValueError(f"{name}.{key}: unknown setting" + did_you_mean(key, known))
                if not values:
                    raise ValueError(f"{name}.{key}: give at least one value")
                for i, value in enumerate(values):  # each as the setting's type (YAML reads 1e-3 as text)
                    try:
                        values[i] = getattr(section.model_validate({key: value}), key)
                    except ValidationError as exc:
                        raise ValueError(f"{name}.{key}[{i}]: {exc.errors()[0]['msg']} (got {value!r})") from None
        return self

    def methods(self) -> dict[str, dict[str, list[Any]]]:
        """``{method: {setting: values}}`` of the methods searched, in registry order."""
        return {m: getattr(self, m) for m in _SPACE_METHODS if getattr(self, m) is not None}


def space_trials(space: SearchSpace) -> dict[str, list[dict[str, Any]]]:
    """``{method: [trial settings]}``: every method gets the same number of trials. A grid is
    every combination (in the order the values are listed); a random search draws `trials`
    distinct combinations per method (with repeats only when it has fewer), seeded by
    (`seed`, method), so the same space gives the same trials. With `incumbent` the first trial
    of each method is ``{}`` (the run config's settings) and the draws fill the rest."""
    import itertools
    import random

    out: dict[str, list[dict[str, Any]]] = {}
    for name, settings in space.methods().items():
        keys = list(settings)
        grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*settings.values())]
        first = [{}] if space.incumbent else []  # the run config's settings, as they are
        if space.kind == "grid":
            out[name] = (first + grid)[: space.trials] if space.trials else first + grid
            continue
        rng = random.Random(f"{space.seed}-{name}")
        n = (space.trials or len(grid)) - len(first)
        out[name] = first + (rng.sample(grid, n) if n <= len(grid) else [rng.choice(grid) for _ in range(n)])
    sizes = {name: len(trials) for name, trials in out.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(
            "every method gets the same number of trials, but the grid gives "
            + ", ".join(f"{name} {n}" for name, n in sizes.items())
            + ": set `trials` (at most the smallest grid) or use kind: random"
        )
    return out


EMBEDDED_SPACE = "spaces/tiny.yaml"  # the embedded default's search space (package data)


def load_search_space(path: str | Path | None = None) -> SearchSpace:
    """A search space from YAML (default: the shipped `configs/spaces/tiny.yaml`, the embedded
    default's); raises ConfigError with one line per problem naming the key."""
    source = Path(path) if path is not None else shipped_config(EMBEDDED_SPACE)
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read search space {source}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return parse_search_space(raw, str(source))


def parse_search_space(raw: Any, source: str = "search space") -> SearchSpace:
    """`raw` (a mapping) as a SearchSpace; raises ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of methods and search settings")
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key" + did_you_mean(loc[-1], SearchSpace.model_fields))
            elif not loc:
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid search space ({source}):\n" + "\n".join(lines)) from exc
