"""Loading the model and tokenizer a run names: a Hub id or a local directory (the tiny world's)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
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


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_bars_were_on = True


@contextlib.contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """transformers' and the Hub's own progress bars ("Loading weights", "Writing model shards",
    downloads) off for the duration, as they were again afterwards.

    The pipeline's flows and the command line run inside it, so their terminal shows the stages'
    own bars (pretraining, reference pass, training, generation); importing or calling the
    package from a notebook leaves the libraries' bars alone. Nested and concurrent uses (flows
    in threads) restore the setting when the last one ends. transformers is not imported for it
    (0.7 s, which a run that loads no model would pay for nothing): until it is, the Hub's switch,
    which transformers reads when it is imported, is the one turned off.
    """
    global _quiet_depth, _bars_were_on

    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _bars_were_on = _bars_enabled()
            _set_bars(False)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _bars_were_on:
                _set_bars(True)


def _bars_enabled() -> bool:
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        return hf_logging.is_progress_bar_enabled()
    from huggingface_hub.utils import are_progress_bars_disabled

    return not are_progress_bars_disabled()


def _set_bars(on: bool) -> None:
    """transformers' switch (which sets the Hub's too) once it is imported, else the Hub's."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar() if on else hf_logging.disable_progress_bar()
        return
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    enable_progress_bars() if on else disable_progress_bars()


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
    if tok.pad_token_id is None:
        _warn_pad_is_eos(str(name_or_path), tok)
    return tok


_PAD_WARNED: set[str] = set()


def _warn_pad_is_eos(name_or_path: str, tok: Any) -> None:
    """Say once per tokenizer and process that batches are padded with EOS: the tokenizer has no pad
    token (Llama-2's has none either). The tokenizer itself is left as it is (its fingerprint, and
    so every key, stays the same); padded positions are masked, so the id does not change results."""
    if name_or_path in _PAD_WARNED:
        return
    _PAD_WARNED.add(name_or_path)
    logging.getLogger(__name__).warning(
        "tokenizer of %s has no pad token: batches are padded with its EOS token %r (id %d), "
        "as transformers users do (tokenizer.pad_token = tokenizer.eos_token)",
        name_or_path,
        tok.eos_token,
        tok.eos_token_id,
    )


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


# safetensors' dtype names -> torch's (what checkpoints of causal LMs hold)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_safetensors_tensor(path: str | Path, name: str):
    """One tensor of a safetensors file, read straight into its own storage.

    safetensors' own loaders memory-map the file: the pages they touch count in the process's
    resident set until it is unmapped, a second copy of every tensor read. This reads the header,
    then the tensor's bytes into a fresh tensor. Raises KeyError when the file has no ``name``.
    """
    import json

    import torch

    source = Path(path)
    with source.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        if name not in header:
            raise KeyError(name)
        entry = header[name]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{source}: {name} is stored as {entry['dtype']}, not a float type")
        start, stop = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]]))
        f.seek(8 + header_len + start)
        if f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != stop - start:
            raise ValueError(f"{source}: {name} is truncated")
    return out


def _checkpoint_file(name_or_path: str, revision: str | None, tensor: str) -> Path | None:
    """The safetensors file of a checkpoint (Hub id or directory) that holds ``tensor``, from its
    shard index when it has one; None when neither index nor single file names it."""
    import json

    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        return cached_file(
            name_or_path, filename, revision=revision,
            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
        )  # fmt: skip

    index = fetch("model.safetensors.index.json")
    if index is not None:
        shard = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].get(tensor)
        return None if shard is None else Path(fetch(shard))
    single = fetch("model.safetensors")
    return None if single is None else Path(single)


def model_shape(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> tuple[int, int]:
    """(vocabulary size, hidden size) of a causal LM's text model, without loading its weights.

    A local directory whose ``config.json`` states both as plain integers, with no nested
    sub-config (``text_config``, ``vision_config``: a multimodal model's text sizes live there)
    is read as JSON, without importing transformers (2 s, which a cached re-run would pay only
    for this); anything else goes through ``AutoConfig`` and its text config.
    """
    config_file = Path(name_or_path).expanduser() / "config.json"
    if not trust_remote_code and config_file.is_file():
        import json

        raw = json.loads(config_file.read_text(encoding="utf-8"))
        nested = any(isinstance(v, dict) and k.endswith("_config") for k, v in raw.items())
        sizes = raw.get("vocab_size"), raw.get("hidden_size")
        if not nested and all(type(n) is int for n in sizes):
            return sizes
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text.vocab_size), int(text.hidden_size)


def load_output_layer_only(
    name_or_path: str, revision: str | None = None, dtype: str = "float32", trust_remote_code: bool = False
):
    """The causal LM with only its output layer's weights in memory: the architecture built on the
    "meta" device from its config (no storage), then ``lm_head``'s weight (and bias) read from the
    checkpoint's safetensors (the input embedding's, when the two are tied and the checkpoint
    stores only that). What training a head on cached hidden states reads (`features: cached`):
    for a 7B model about 0.5 GB instead of 13. Every other parameter stays on "meta".
    """
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    with MODEL_LOADING, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    layer = model.get_output_embeddings()
    names = {}  # parameter -> every name it has (a tied lm_head also answers to the embedding's)
    for full, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(full)
    for attr in ("weight", "bias"):
        param = getattr(layer, attr, None)
        if param is None:
            continue
        for candidate in names[id(param)]:
            file = _checkpoint_file(name_or_path, revision, candidate)
            if file is None:
                continue
            try:
                value = read_safetensors_tensor(file, candidate)
            except KeyError:
                continue
            break
        else:
            raise ValueError(
                f"{name_or_path}: no safetensors file holds the output layer's {attr} "
                f"(looked for {', '.join(names[id(param)])})"
            )
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{file}: {candidate} has shape {tuple(value.shape)}, the config gives {tuple(param.shape)}"
            )
        setattr(layer, attr, nn.Parameter(value.to(getattr(torch, dtype)), requires_grad=False))
    return model.eval()
