"""`alignheads generate` serves every method of the registry, and seeds each prompt and chat turn
on its own (issue 21, items 1 and 6).

One store built by the real data, tokenize and reference-pass stages from word pairs, with a
CALM head and both fine-tuned-LM baselines trained on it for a few steps (they need not learn:
the tests compare the command line with the methods' own decoding).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignheads.cli import METHOD_NAMES, SAVED_AS, main
from alignheads.config import CALMTrainConfig, DPOTrainConfig, GenARMTrainConfig, RefPassConfig
from alignheads.inference import (
    TwoModelLM,
    compare_with_base,
    generate,
    generate_base,
    load_trained,
    prompt_seeds,
)
from alignheads.models.methods import METHODS
from alignheads.tasks import train as train_stage
from tests.helpers.tiny_models import tiny_llama
from tests.helpers.word_pairs import pair_store

pytestmark = pytest.mark.slow

PROMPTS = ["w30 w31 w32", "w40 w41", "w50 w51 w52 w53"]
SAMPLED = {"do_sample": True, "top_k": 0, "max_new_tokens": 6}
GREEDY = {"do_sample": False, "max_new_tokens": 6}
SAMPLED_FLAGS = ["--max-new-tokens", "6", "--temperature", "1", "--top-p", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    built = pair_store(tmp_path_factory.mktemp("methods"), tiny_llama(tied=False), RefPassConfig(k=8))
    source = {"name_or_path": str(built.model_dir), "revision": None, "dtype": "float32"}
    quick = {"batch_size": 8, "max_steps": 3, "lr": 3e-2, "eval_every": 100, "warmup_ratio": 0.0}
    for kind, cfg in (
        ("calm", CALMTrainConfig(rank=4, **quick)),
        ("genarm", GenARMTrainConfig(enabled=True, **quick)),
        ("dpo-dera", DPOTrainConfig(enabled=True, **quick)),
    ):
        train_stage.run_train(
            built.store, train_stage.plan_train(kind, cfg, built.refpass, source), progress=False
        )
    return built.store


def _artifact(store: Path, kind: str) -> Path:
    from alignheads.cli import _newest_head

    return _newest_head(store, kind).parent


def test_the_command_line_knows_every_method_of_the_registry():
    from alignheads.cli import build_parser
    from alignheads.tasks.cached import StageResult

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    (head,) = [a for a in generate._actions if "--head" in a.option_strings]
    assert tuple(head.choices) == tuple(METHODS) == METHOD_NAMES
    # what the run prints and logs for a trained method is where it lives, not the artifact
    for kind, saved in SAVED_AS.items():
        result = StageResult(stage="train", key="k", path="/s/train/k", computed=True, info={"kind": kind})
        assert result.location == Path("/s/train/k") / saved
    assert StageResult(stage="data", key="k", path="/s/data/k", computed=True).location == Path("/s/data/k")


@pytest.mark.parametrize("kind", ["genarm", "dpo-dera"])
def test_generate_serves_a_fine_tuned_lm_method(store, kind, capsys):
    """`--head genarm|dpo-dera` decodes base and tuned LM side by side through the registry."""
    lm, tok = load_trained(_artifact(store, kind))
    assert isinstance(lm, TwoModelLM) and lm.head_type == kind
    args = ["generate", "--head", kind, "--set", f"store={store}", "--greedy", "--max-new-tokens", "6"]
    assert main([*args, "--compare", "--alpha", "0", PROMPTS[0]]) == 0
    out = capsys.readouterr()
    assert f"{kind}: {store / 'train'}" in out.err and out.err.strip().endswith(f"/{SAVED_AS[kind]}")
    lines = out.out.splitlines()
    base, aligned = lines.index("--- base (plain LM) ---"), lines.index(f"--- aligned ({kind}, alpha=0) ---")
    assert lines[base + 1] == lines[aligned + 1] == generate_base(lm, tok, PROMPTS[:1], **GREEDY)[0]
    assert main([*args, "--alpha", "1", PROMPTS[0]]) == 0
    assert capsys.readouterr().out.strip() == generate(lm, tok, PROMPTS[:1], 1.0, **GREEDY)[0]
    if kind == "dpo-dera":  # DeRa at α = 1 is the DPO model itself
        from alignheads.inference import _new_tokens

        tuned = _new_tokens(lm.loaded.tuned, tok, PROMPTS, None, dict(GREEDY))
        assert generate(lm, tok, PROMPTS, 1.0, **GREEDY) == [
            t.strip() for t in tok.batch_decode(tuned, skip_special_tokens=True)
        ]


@pytest.mark.parametrize("kind", ["calm", "genarm"])
def test_each_prompt_samples_from_its_own_seed_in_any_batch(store, kind, tmp_path, capsys):
    """Different prompts draw different random numbers from one --seed (the same seed for every
    prompt gave every prompt the same start); a prompt draws the same alone or in a batch, and
    --compare gives the base the same draws (at α = 0 the method is the base)."""
    lm, tok = load_trained(_artifact(store, kind))
    seeds = prompt_seeds(3, PROMPTS)
    assert len(set(seeds)) == len(PROMPTS)
    alone = [generate(lm, tok, [p], 1.0, seed=3, **SAMPLED)[0] for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS)
    assert generate(lm, tok, PROMPTS, 1.0, seed=3, **SAMPLED) == alone  # batch-independent
    assert generate(lm, tok, PROMPTS, 1.0, seeds=seeds, **SAMPLED) == alone
    pairs = compare_with_base(lm, tok, PROMPTS, 0.0, seed=3, **SAMPLED)
    assert [p["base"] for p in pairs] == [p["aligned"] for p in pairs]
    # the command line: one prompt, and a prompts file in batches of 2, give those same texts
    args = ["generate", "--head", kind, "--set", f"store={store}", "--alpha", "1", *SAMPLED_FLAGS]
    assert main([*args, PROMPTS[1]]) == 0
    assert capsys.readouterr().out.strip() == alone[1]
    src, out = tmp_path / "p.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(PROMPTS) + "\n")
    assert main([*args, "--prompts-file", str(src), "--output", str(out), "--batch-size", "2"]) == 0
    import json

    assert [json.loads(line)["response"] for line in out.read_text().splitlines()] == alone


def test_chat_turns_sample_from_new_seeds_through_the_console_script(store):
    """The same line typed twice in the chat loop is two turns: two different seeds, each the
    (seed, prompt, turn) seed the API gives."""
    lm, tok = load_trained(_artifact(store, "calm"))
    want = [generate(lm, tok, [PROMPTS[0]], 1.0, seeds=prompt_seeds(3, PROMPTS[:1], turn), **SAMPLED)[0]
            for turn in (0, 1)]  # fmt: skip
    exe = Path(sys.executable).parent / "alignheads"
    done = subprocess.run(
        [str(exe), "generate", "-i", "--head", "calm", "--set", f"store={store}", *SAMPLED_FLAGS],
        input=f"{PROMPTS[0]}\n{PROMPTS[0]}\n:q\n",
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    replies = [line.split("> ")[-1] for line in done.stdout.splitlines() if line.startswith("[alpha=1]> ")]
    assert replies[:2] == want and want[0] != want[1], done.stdout
    assert prompt_seeds(3, PROMPTS[:1], 0) != prompt_seeds(3, PROMPTS[:1], 1)
