"""nn.Modules and tensor maths: the logit heads (IAV, CALM), the aligned-LM wrapper, head files and
merging; the losses and every method's objective, reference scoring, decoding (KV-cached context,
two-model guided decoding), and the method registry (`alignheads.models.methods`).

Build an aligned model from a base model and a head::

    from alignheads.models import AlignedLM, IAVHead, load_aligned
    aligned = AlignedLM(model, IAVHead.from_base_model(model))   # fresh head
    aligned = load_aligned("heads/iav", model)                     # trained head
    out = aligned.generate(input_ids, attention_mask=mask, alpha=1.5, max_new_tokens=32)

Several dials on one LM (``z = z_LM + Σ_i α_i Δ_i``; `alignheads.models.dials`)::

    aligned = AlignedLM(model, {"helpful": iav_head, "polite": calm_head})
    out = aligned.generate(input_ids, attention_mask=mask, alpha={"helpful": 1.0, "polite": 0.5})
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it. Imported on first use (PEP 562): a module of the
# package (`alignheads.models.intervals`, say) can then be imported without torch, which every
# head module needs and which a fully cached pipeline run never has to load.
_EXPORTS: dict[str, str] = {
    "AlignedLM": "aligned",
    "SteeredLMHead": "aligned",
    "CALMConfig": "calm",
    "CALMHead": "calm",
    "CALMOutput": "calm",
    "RunningContext": "context",
    "TokenContext": "context",
    "continue_context": "context",
    "token_context": "context",
    "DialLMHead": "dials",
    "dial_alpha": "dials",
    "dial_head_decoder": "dials",
    "multi_genarm_decoder": "dials",
    "multi_genarm_generate": "genarm",
    "multi_genarm_logits": "genarm",
    "multi_guided_decode": "guided",
    "LogitHead": "head_base",
    "SteeringOutput": "head_base",
    "BaseModelInfo": "head_io",
    "HeadFile": "head_io",
    "HeadFormatError": "head_errors",
    "HeadMismatchError": "head_errors",
    "load_aligned": "head_io",
    "load_head": "head_io",
    "read_head_file": "head_io",
    "save_head": "head_io",
    "IAVConfig": "iav",
    "IAVHead": "iav",
    "IAVOutput": "iav",
    "merge_iav": "merge",
    "merge_iav_dials": "merge",
    "StepRecorder": "recording",
    "HEAD_TYPES": "registry",
    "head_class": "registry",
    "new_head": "registry",
}

__all__ = [
    "HEAD_TYPES",
    "AlignedLM",
    "BaseModelInfo",
    "CALMConfig",
    "CALMHead",
    "CALMOutput",
    "DialLMHead",
    "HeadFile",
    "HeadFormatError",
    "HeadMismatchError",
    "IAVConfig",
    "IAVHead",
    "IAVOutput",
    "LogitHead",
    "RunningContext",
    "SteeredLMHead",
    "SteeringOutput",
    "StepRecorder",
    "TokenContext",
    "continue_context",
    "dial_alpha",
    "dial_head_decoder",
    "head_class",
    "load_aligned",
    "load_head",
    "merge_iav",
    "merge_iav_dials",
    "multi_genarm_decoder",
    "multi_genarm_generate",
    "multi_genarm_logits",
    "multi_guided_decode",
    "new_head",
    "read_head_file",
    "save_head",
    "token_context",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

