"""MLflow models and the MLflow model registry: a trained head as a ``pyfunc`` model (models from
code, weights as safetensors artifacts), a merged IAV checkpoint as an ``mlflow.transformers``
model, each registered as a new version with aliases.

Everything goes through `MlflowClient` with explicit run ids, as in `storage.tracking`: a model is
saved to a temporary directory (`mlflow.pyfunc.save_model` / `mlflow.transformers.save_model`),
logged as the run's ``model/`` artifacts, and registered from ``runs:/<run>/model``. No fluent
"active run" is touched, so this is safe in Prefect's worker threads.

Aliases: ``newest`` always points at the version just registered (``latest`` is reserved by
MLflow: ``models:/NAME/latest`` is its own name for the highest version); ``best`` at the version
with the highest held-out preference accuracy (version tag ``alignheads.eval_accuracy``; a later
version takes it only when strictly better). A search (`flows.tune`) moves ``best`` to its best
trial's version instead (`move_alias`): there the best is the validation-reward best. Each
version of a head names the train artifact it came from (version tag ``alignheads.train_key``),
so `version_with_tag` finds the version of a training.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignheads.storage.tracking import Tracker

NEWEST, BEST = "newest", "best"
ACCURACY_TAG = "alignheads.eval_accuracy"
TRAIN_KEY_TAG = "alignheads.train_key"  # the train artifact a registered head came from
MODEL_PATH = "model"
SPEC_FILE = "serving.json"  # as alignheads/serving.py reads it

# the pyfunc's parameters, their MLflow types, and the fallback default of each
PARAM_TYPES = {
    "alpha": ("double", float),
    "max_new_tokens": ("long", int),
    "temperature": ("double", float),
    "top_p": ("double", float),
    "seed": ("long", int),
}


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    aliases: tuple[str, ...]


def _requirements(*names: str) -> list[str]:
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def head_signature(defaults: dict[str, Any]):
    """Prompts (strings) → responses (strings), with `PARAM_TYPES` as a ParamSchema carrying
    `defaults`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    missing = set(PARAM_TYPES) - set(defaults)
    if missing:
        raise ValueError(f"no default for the model parameters {sorted(missing)}")
    params = [ParamSpec(name, kind, cast(defaults[name])) for name, (kind, cast) in PARAM_TYPES.items()]
    return ModelSignature(
        inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=ParamSchema(params)
    )


def save_head_model(
    path: Path,
    *,
    code: Path,
    head_dir: Path,
    base: dict[str, Any],
    defaults: dict[str, Any],
    bundled_base: Path | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the pyfunc model of the head in `head_dir` to `path` (must not exist).

    code: the models-from-code file (`alignheads/serving.py`); base: the base model as the head
    records it (name_or_path, revision, dtype, trust_remote_code); bundled_base: a model
    directory copied into the model (self-contained; the tiny world's); info: more of the
    training's identity for `serving.json` (train key, method, accuracy).
    """
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / SPEC_FILE
        record = {"base_model": base | {"bundled": bundled_base is not None}, "defaults": defaults}
        spec.write_text(json.dumps(record | {"info": info or {}}, indent=2, sort_keys=True) + "\n")
        artifacts = {"head": str(head_dir), "spec": str(spec)}
        if bundled_base is not None:
            artifacts["base"] = str(bundled_base)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(type hints|input example|input_example).*")
            mlflow.pyfunc.save_model(
                str(path),
                python_model=str(code),
                artifacts=artifacts,
                signature=head_signature(defaults),
                pip_requirements=_requirements(
                    "alignheads", "torch", "transformers", "safetensors", "mlflow"
                ),
            )
    return path


def save_transformers_model(path: Path, checkpoint: Path) -> Path:
    """Write the plain transformers checkpoint `checkpoint` (model + tokenizer, e.g. a merged IAV
    head) to `path` as an `mlflow.transformers` text-generation model."""
    import mlflow.transformers

    from alignheads.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(checkpoint))
    tokenizer = load_tokenizer(str(checkpoint))
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(path),
        task="text-generation",
        pip_requirements=_requirements("transformers", "torch", "safetensors", "mlflow"),
    )
    return path


def _accuracy(version) -> float | None:
    value = (version.tags or {}).get(ACCURACY_TAG)
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def register(
    tracker: Tracker,
    run_id: str,
    name: str,
    *,
    accuracy: float | None = None,
    tags: dict[str, str] | None = None,
    description: str = "",
    aliases_best: bool = True,
) -> Registered:
    """Register the run's ``model/`` artifacts as a new version of `name` (created if needed);
    point ``newest`` at it, and ``best`` when its `accuracy` beats the current best's (or there is
    none yet). `aliases_best` False: no ``best`` alias (a model without a held-out accuracy)."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as exc:
        if (
            "already exists" not in str(exc).lower()
            and getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS"
        ):
            raise
    version_tags = dict(tags or {})
    if accuracy is not None:
        version_tags[ACCURACY_TAG] = repr(float(accuracy))
    version = client.create_model_version(
        name, f"runs:/{run_id}/{MODEL_PATH}", run_id=run_id, tags=version_tags
    )
    aliases = [NEWEST]
    client.set_registered_model_alias(name, NEWEST, version.version)
    if not aliases_best:
        return Registered(name, str(version.version), tuple(aliases))
    try:
        best = client.get_model_version_by_alias(name, BEST)
    except MlflowException:
        best = None
    best_accuracy = _accuracy(best) if best is not None else None
    if best is None or (accuracy is not None and (best_accuracy is None or accuracy > best_accuracy)):
        client.set_registered_model_alias(name, BEST, version.version)
        aliases.append(BEST)
    return Registered(name, str(version.version), tuple(aliases))


def version_with_tag(tracker: Tracker, name: str, tag: str, value: str) -> str | None:
    """The highest version of registered model `name` whose tag `tag` is `value`; None when there
    is none (or no model `name`)."""
    # filtered here, not in the search string: every MLflow registry filters on the name
    versions = tracker.client.search_model_versions(f"name = '{name}'")
    found = [int(v.version) for v in versions if (v.tags or {}).get(tag) == value]
    return str(max(found)) if found else None


def move_alias(tracker: Tracker, name: str, alias: str, version: str) -> str | None:
    """Point `alias` of registered model `name` at `version`, wherever it pointed before; returns
    the version it pointed at (None: it was not set)."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        before: str | None = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        before = None
    client.set_registered_model_alias(name, alias, version)
    return before
