"""Loading models from several threads at once leaves transformers' process-wide functions intact."""

from __future__ import annotations

import subprocess
import sys
import threading

import torch
from transformers import PreTrainedModel

from alignheads.loading import load_causal_lm
from tests.helpers.tiny_models import tiny_llama


def test_concurrent_loads_leave_tying_and_init_in_place(tmp_path):
    """from_pretrained swaps `PreTrainedModel.tie_weights`, `init_weights` and `torch.nn.init`'s
    functions for no-ops while it builds a model. Eight threads loading at once (as the sweep's
    generations do on the threads runner) used to restore each other's no-ops, and every model
    built afterwards came out untied and uninitialised."""
    tiny_llama(tied=False).save_pretrained(tmp_path / "lm")
    originals = (PreTrainedModel.tie_weights, PreTrainedModel.init_weights, torch.nn.init.normal_)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            for _ in range(3):
                load_causal_lm(str(tmp_path / "lm"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (PreTrainedModel.tie_weights, PreTrainedModel.init_weights, torch.nn.init.normal_) == originals
    tied = tiny_llama(tied=True)  # built after the loads: tied and initialised as configured
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert tied.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


def test_library_progress_bars_are_off_only_inside_the_pipelines_block(tmp_path, capsys):
    """The pipeline (flows) and the CLI verbs run inside `library_progress_bars_off`: no
    "Writing model shards" / "Loading weights" bars from transformers there; outside (a notebook
    importing the package) the library's bars are as they were (issue 21, item 4)."""
    from transformers.utils import logging as hf_logging

    from alignheads.loading import library_progress_bars_off

    assert hf_logging.is_progress_bar_enabled()
    model = tiny_llama(tied=False)
    with library_progress_bars_off():
        with library_progress_bars_off():  # nested (flows inside the CLI, threads)
            model.save_pretrained(tmp_path / "quiet")
        assert not hf_logging.is_progress_bar_enabled()
        load_causal_lm(str(tmp_path / "quiet"))
    quiet = capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    model.save_pretrained(tmp_path / "loud")
    load_causal_lm(str(tmp_path / "loud"))
    loud = capsys.readouterr().err
    assert "Writing model shards" in loud and "Loading weights" in loud
    assert "Writing model shards" not in quiet and "Loading weights" not in quiet


def test_progress_bars_stay_off_for_transformers_imported_inside_the_block():
    """The block does not import transformers itself; a transformers imported inside it (a stage
    that loads a model) starts with its bars off, and they are on again after the block."""
    script = """
import sys
from alignheads.loading import library_progress_bars_off
with library_progress_bars_off():
    assert "transformers" not in sys.modules
    from transformers.utils import logging as hf_logging
    assert not hf_logging.is_progress_bar_enabled()
assert hf_logging.is_progress_bar_enabled()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
