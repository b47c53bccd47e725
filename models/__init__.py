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

from alignheads.models.aligned import AlignedLM, SteeredLMHead
from alignheads.models.calm import CALMConfig, CALMHead, CALMOutput
from alignheads.models.context import RunningContext, TokenContext, continue_context, token_context
from alignheads.models.dials import DialLMHead, dial_alpha, dial_head_decoder, multi_genarm_decoder
from alignheads.models.genarm import multi_genarm_generate, multi_genarm_logits
from alignheads.models.guided import multi_guided_decode
from alignheads.models.head_base import LogitHead, SteeringOutput
from alignheads.models.head_io import (
    BaseModelInfo,
    HeadFile,
    HeadFormatError,
    HeadMismatchError,
    load_aligned,
    load_head,
    read_head_file,
    save_head,
)
from alignheads.models.iav import IAVConfig, IAVHead, IAVOutput
from alignheads.models.merge import merge_iav, merge_iav_dials
from alignheads.models.recording import StepRecorder
from alignheads.models.registry import HEAD_TYPES, head_class, new_head

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
