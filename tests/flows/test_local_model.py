"""The pipeline end to end on a local Hugging Face model that is not the tiny world's: a random small
Llama with a Unigram tokenizer trained here (its own special tokens, no pad token, no chat
template, right padding), a local one-label sequence-classification reward model, and
Anthropic-HH-format data files; run from a directory outside the repository.

One pipeline run (module fixture) in which every model load is counted (transformers'
`from_pretrained`, the real one, called through) and the pad-token warning is collected; the
exports and the MLflow model of the trained heads are then checked on its store.
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

from alignheads.cli import main
from alignheads.config import RunConfig
from alignheads.flows.pipeline import pipeline
from alignheads.storage.query import run_query
from alignheads.storage.tables import read_table
from tests.helpers.local_model import BOS, EOS, build_local_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGE_MODULES = {"refpass", "train", "method_sweep", "generate", "accuracy", "evaluate", "calibrate"}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _stage_of_caller() -> str:
    """The pipeline stage (module of `alignheads.tasks`) that asked for a model, from the stack."""
    for frame in traceback.extract_stack():
        path = Path(frame.filename)
        if path.parent.name == "tasks" and path.stem in STAGE_MODULES:
            return path.stem
    return "other"


@pytest.fixture(scope="module")
def local_run(prefect_harness, tmp_path_factory):
    from transformers import PreTrainedModel

    root = tmp_path_factory.mktemp("local-model")
    local = build_local_model(root / "inputs")
    cfg = RunConfig.model_validate(
        {
            "name": "local",
            "store": str(root / "store"),
            "model": {"name_or_path": str(local.model_dir)},
            "data": {"train": {"path": str(local.train)}, "test": {"path": str(local.test)}, "format": "hh"},
            "tokenize": {"max_prompt_length": 48, "max_response_length": 24},
            "refpass": {"k": 8, "pairs_per_shard": 64},
            "train": {
                "iav": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "eval_every": 2},
                "calm": {"lr": 1e-2, "batch_size": 16, "epochs": 1, "rank": 4, "eval_every": 2},
            },
            "sweep": {"alphas": [0, 1], "n_prompts": 4, "max_new_tokens": 8, "batch_size": 4},
            "evaluate": {"reward": str(local.reward_dir), "target_kls": []},
        }
    ).resolved()
    loads: Counter = Counter()
    real = PreTrainedModel.from_pretrained.__func__

    def counted(cls, name_or_path, *args, **kwargs):
        loads[(_stage_of_caller(), cls.__name__, Path(name_or_path).name)] += 1
        return real(cls, name_or_path, *args, **kwargs)

    warnings = _Collect()
    logging.getLogger("alignheads.loading").addHandler(warnings)
    away = root / "elsewhere"
    away.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(away)  # nothing may depend on the repository being the working directory
        mp.setattr(PreTrainedModel, "from_pretrained", classmethod(counted))
        try:
            outcome = pipeline(config=cfg)
        finally:
            logging.getLogger("alignheads.loading").removeHandler(warnings)
    return cfg, local, outcome, loads, warnings.messages


def test_every_stage_runs_on_a_local_model_with_its_own_tokenizer(local_run):
    cfg, local, outcome, _, _ = local_run
    assert {name: r.status for name, r in outcome.stages()} == {
        "data": "computed",
        "tokenize": "computed",
        "refpass": "computed",
        "train iav": "computed",
        "train calm": "computed",
        "generate iav α=0": "computed",
        "generate iav α=1": "computed",
        "generate calm α=0": "computed",
        "generate calm α=1": "computed",
        "accuracy iav": "computed",
        "accuracy calm": "computed",
        "evaluate": "computed",
        "report": "computed",
    }
    assert outcome.world is None  # nothing of the tiny world was built or used
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(local.model_dir)
    assert tok.pad_token is None and not tok.chat_template and tok.padding_side == "right"
    tokenized = read_table(outcome.tokenize.directory, "tokenized").to_pylist()
    bos, eos = tok.convert_tokens_to_ids([BOS, EOS])
    assert all(r["prompt_ids"][0] == bos and r["prompt_ids"].count(bos) == 1 for r in tokenized)
    for side in ("chosen", "rejected"):  # EOS appended once, except to a response the limit cut
        assert all((r[f"{side}_ids"][-1] == eos) != r[f"{side}_truncated"] for r in tokenized)
        assert all(r[f"{side}_ids"].count(eos) <= 1 for r in tokenized)
    assert sum(not r["chosen_truncated"] for r in tokenized) > len(tokenized) // 2
    # raw HH prompts: the text up to and including the last "\n\nAssistant:", no template around it
    prompts = run_query(cfg.store, "SELECT DISTINCT prompt FROM generations").column("prompt").to_pylist()
    assert prompts and all(p.startswith("\n\nHuman: what do you know of ") for p in prompts)
    assert all(p.endswith("\n\nAssistant:") for p in prompts)
    summary = read_table(outcome.evaluate.directory, "summary").to_pylist()
    assert {r["reward_source"] for r in summary} == {str(local.reward_dir)}
    assert all(r["reward"] == r["reward"] for r in summary)  # scored by the reward model: no NaN


def test_pad_is_eos_with_a_warning(local_run):
    _, local, _, _, warnings = local_run
    said = [m for m in warnings if "has no pad token" in m]
    assert len(said) == 1, warnings  # once per tokenizer, not once per stage
    assert str(local.model_dir) in said[0] and repr(EOS) in said[0]


def test_each_model_is_loaded_once_per_stage_task_that_needs_it(local_run):
    """Reference pass: one load per shard (1 shard); training: one per method (2 methods); the
    generations and the held-out accuracy share one load per method (the method's sweep task);
    the reward model once."""
    *_, loads, _ = local_run
    assert dict(loads) == {
        ("refpass", "LlamaForCausalLM", "llama"): 1,
        ("train", "LlamaForCausalLM", "llama"): 2,
        ("method_sweep", "LlamaForCausalLM", "llama"): 2,
        ("evaluate", "LlamaForSequenceClassification", "reward"): 1,
    }
    assert sum(loads.values()) == 6
    _, _, outcome, _, _ = local_run
    assert outcome.model_loads == {"iav": 1, "calm": 1}


def test_the_local_models_heads_export_and_load_through_mlflow(local_run, tmp_path, capsys):
    """PEFT (the newest IAV head, via the command line), TRL pairs, and the registered pyfunc,
    which records the local base's path instead of carrying a copy."""
    import mlflow
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignheads.inference import load_for_generation

    cfg, local, outcome, _, _ = local_run
    store = ["--set", f"store={cfg.store}"]
    assert main(["export", "--format", "peft", "--out", str(tmp_path / "adapter"), *store]) == 0
    assert main(["export", "--format", "trl", "--out", str(tmp_path / "trl"), *store]) == 0
    capsys.readouterr()
    aligned, tok = load_for_generation(outcome.train["iav"].directory / "head")
    ids = tok(["\n\nHuman: what do you know of tea\n\nAssistant:"], return_tensors="pt").input_ids
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(local.model_dir), tmp_path / "adapter"
    )
    with torch.no_grad():
        want = aligned(input_ids=ids).logits
        assert (peft_model(input_ids=ids).logits - want).abs().max().item() <= 1e-4
    trl = load_dataset(
        "parquet", data_files=str(tmp_path / "trl" / "train.parquet"), cache_dir=str(tmp_path / "c")
    )
    assert trl["train"].num_rows == 48

    mlflow.set_tracking_uri(f"sqlite:///{cfg.store / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/local-iav@best")
    finally:
        mlflow.set_tracking_uri(None)
    spec = model.unwrap_python_model().spec["base_model"]
    assert spec["bundled"] is False and spec["name_or_path"] == str(local.model_dir)
    (answer,) = model.predict(
        ["\n\nHuman: what do you know of tea\n\nAssistant:"], params={"max_new_tokens": 4}
    )
    assert isinstance(answer, str)
