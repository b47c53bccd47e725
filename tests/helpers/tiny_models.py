"""Test helpers: tiny Llama models, a word-level tokenizer and randomised heads, built on the fly."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from alignheads.models import CALMHead, IAVHead, LogitHead

VOCAB = 100
PAD, BOS, EOS = 0, 1, 2


def tiny_llama(*, tied: bool, seed: int = 0, vocab: int = VOCAB, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger output weights: peaked next-token distributions, clear argmaxes
        model.get_output_embeddings().weight.normal_(0, 0.3)
    return model


def tiny_gemma2(
    *, cap: float = 3.0, seed: int = 0, vocab: int = VOCAB, hidden: int = 32
) -> Gemma2ForCausalLM:
    """A tiny Gemma-2 whose final logits transformers soft-caps at ``cap`` (``cap · tanh(z / cap)``,
    `config.final_logit_softcapping`), with output weights large enough that the cap bends them."""
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=128,
        sliding_window=64,
        final_logit_softcapping=cap,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # raw logits of several units: well past the cap's linear range
        model.get_output_embeddings().weight.normal_(0, 0.6)
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: [PAD]=0, [BOS]=1, [EOS]=2, then w0..w96 (ids 3..99)."""
    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", padding_side="left"
    )


def randomise(head: LogitHead, seed: int = 1) -> LogitHead:
    """Non-zero, O(1)-effect weights, as a trained head would have."""
    gen = torch.Generator().manual_seed(seed)

    def noise(param: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(param.shape, generator=gen) * std

    with torch.no_grad():
        if isinstance(head, IAVHead):
            head.align.weight.copy_(noise(head.align.weight, 0.15))
            head.base.weight.add_(noise(head.base.weight, 0.05))
        elif isinstance(head, CALMHead):
            head.up.weight.copy_(noise(head.up.weight, 0.15))
            head.position.weight.copy_(noise(head.position.weight, 0.5))
            head.gate.weight.copy_(noise(head.gate.weight, 1.0))
            head.gate.bias.fill_(-0.5)
        else:  # pragma: no cover
            raise TypeError(type(head))
    return head


def make_head(kind: str, model: torch.nn.Module) -> LogitHead:
    return IAVHead.from_base_model(model) if kind == "iav" else CALMHead.from_base_model(model, rank=8)


def left_padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random word ids (3..99), left-padded with PAD to the longest length."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask
