"""A trained head as an MLflow ``pyfunc`` model ("models from code": MLflow runs this file to build
the model; nothing is pickled). Prompts (strings) in, responses (strings) out; the parameters
``alpha``, ``max_new_tokens``, ``temperature``, ``top_p`` and ``seed`` come from ``params`` (their
defaults are in the model's signature, from the run's `sweep:` settings).

::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/tiny-calm@best")
    model.predict(["What is 3 plus 4?"], params={"alpha": 1.5})

The model's artifacts (written by `alignheads.storage.model_registry.save_head_model`):

- ``head``: the head directory (``head_config.json`` + ``head_model.safetensors``);
- ``spec``: ``serving.json``, the base model (id or path, revision, dtype) and the defaults;
- ``base`` (the tiny world only): the base model and tokenizer themselves, so the model is
  self-contained. Without it the base named in ``serving.json`` is loaded (Hub id at its recorded
  revision, or a local directory) — offline when it is cached or local.

Prompts are wrapped in the tokenizer's chat template when it has one (`inference.format_prompt`;
an already formatted prompt is left as it is). ``temperature`` 0 decodes greedily. Every call is
seeded with ``seed``, so the same request gives the same responses.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

SPEC_FILE = "serving.json"
PARAMS = ("alpha", "max_new_tokens", "temperature", "top_p", "seed")


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a pyfunc input: a pandas DataFrame or Series (its first column), a list, or one
    string."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # DataFrame (MLflow turns a list into a one-column frame) / Series
        column = model_input.iloc[:, 0] if getattr(model_input, "ndim", 1) == 2 else model_input
        return [str(v) for v in column.tolist()]
    return [str(v) for v in model_input]


def decoding_settings(params: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face `generate` options from the model's params (temperature 0: greedy)."""
    settings: dict[str, Any] = {"max_new_tokens": int(params["max_new_tokens"])}
    temperature = float(params["temperature"])
    if temperature <= 0:
        return settings | {"do_sample": False}
    return settings | {
        "do_sample": True,
        "temperature": temperature,
        "top_p": float(params["top_p"]),
        "top_k": 0,
    }


class HeadModel(PythonModel):
    """The pyfunc: a trained IAV or CALM head on its base model."""

    # The signature (prompts, and the params with their defaults) is declared when the model is
    # saved; type hints on `predict` would replace it with one that has no params, so MLflow's
    # type-hint wrapping (and its warning that there are none) is switched off.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from alignheads.inference import load_for_generation

        spec = json.loads(Path(context.artifacts["spec"]).read_text(encoding="utf-8"))
        self.spec = spec
        bundled = context.artifacts.get("base")
        base = spec["base_model"]
        self.aligned, self.tokenizer = load_for_generation(
            context.artifacts["head"],
            base=bundled,  # None: the head's recorded base, at its recorded revision
            dtype=base.get("dtype", "float32"),
            ignore_base_id=bundled is not None,  # the same model, in the model's own artifacts
            trust_remote_code=bool(base.get("trust_remote_code", False)),
        )
        self.defaults = dict(spec["defaults"])
        self.lock = threading.Lock()  # one model, one α at a time (the server may run requests in threads)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from alignheads import inference

        values = self.defaults | {k: v for k, v in (params or {}).items() if k in PARAMS and v is not None}
        prompts = [inference.format_prompt(self.tokenizer, text) for text in prompts_of(model_input)]
        with self.lock:
            return inference.generate(
                self.aligned,
                self.tokenizer,
                prompts,
                float(values["alpha"]),
                seed=int(values["seed"]),
                **decoding_settings(values),
            )


mlflow.models.set_model(HeadModel())
