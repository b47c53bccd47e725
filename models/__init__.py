"""nn.Modules and tensor maths: the logit heads (IAV, CALM), the aligned-LM wrapper, head files and
merging; the losses and every method's objective, reference scoring, decoding (KV-cached context,
two-model guided decoding), and the method registry (`alignheads.models.methods`).

Build an aligned model from a base model and a head::

    from alignheads.models import AlignedLM, IAVHead, load_aligned
    aligned = AlignedLM(model, IAVHead.from_base_model(model))   # fresh head
    aligned = load_aligned("heads/iav", model)                     # trained head
    out = aligned.generate(input_ids, attention_mask=mask, alpha=1.5, max_new_tokens=32)
"""

from alignheads.models.aligned import AlignedLM, SteeredLMHead
from alignheads.models.calm import CALMConfig, CALMHead, CALMOutput
from alignheads.models.context import RunningContext, TokenContext, continue_context, token_context
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
from alignheads.models.merge import merge_iav
from alignheads.models.recording import StepRecorder
from alignheads.models.registry import HEAD_TYPES, head_class, new_head

__all__ = [
    "HEAD_TYPES",
    "AlignedLM",
    "BaseModelInfo",
    "CALMConfig",
    "CALMHead",
    "CALMOutput",
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
    "head_class",
    "load_aligned",
    "load_head",
    "merge_iav",
    "new_head",
    "read_head_file",
    "save_head",
    "token_context",
]
