"""Loading the model and tokenizer a run names: a Hub id or a local directory (the tiny world's)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from alignheads.config import ModelConfig

WORLD_MODEL_SUBDIR = "model"

# While it builds a model, transformers' `from_pretrained` swaps process-wide functions for no-ops
# (`PreTrainedModel.tie_weights`, `init_weights` and the `torch.nn.init` functions) and puts the
# saved ones back afterwards. Two threads loading at once (the sweep's generations on the threads
# runner) can each save the other's no-op and "restore" it: every model built later in the process
# then comes out untied and uninitialised. Every model this package loads or builds holds this lock.
MODEL_LOADING = threading.RLock()


def model_location(model: ModelConfig, world_dir: Path | None) -> tuple[str, str | None]:
    """(name_or_path, revision) of the run's model: the configured one, else the world's model dir."""
    if model.name_or_path is not None:
        return model.name_or_path, model.revision
    if world_dir is None:
        raise ValueError("model.name_or_path is empty and no tiny world was built (world.build is false)")
    return str(Path(world_dir) / WORLD_MODEL_SUBDIR), None


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """AutoTokenizer from a Hub id or directory; fast tokenizers only (their ids are reproducible)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path} has no EOS token; responses cannot be terminated")
    return tok


def load_pretrained(
    auto_class: Any, name_or_path: str, revision: str | None, dtype: str, trust_remote_code: bool
):
    """``auto_class.from_pretrained`` (an AutoModel* class) in eval mode, safetensors only (no
    pickled weights are ever loaded), under the process-wide MODEL_LOADING lock."""
    import torch

    with MODEL_LOADING:
        model = auto_class.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    return model.eval()


def load_causal_lm(
    name_or_path: str, revision: str | None = None, dtype: str = "float32", trust_remote_code: bool = False
):
    """AutoModelForCausalLM in eval mode, safetensors only (no pickled weights are ever loaded)."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, name_or_path, revision, dtype, trust_remote_code)
