"""A KV cache that writes each step into room reserved ahead instead of re-concatenating.

transformers' `DynamicCache` grows every layer's keys and values with ``torch.cat`` at each
step, which copies the whole cache: O(T²) memory traffic per sequence. On the tiny world's
model at 128 rows that copy is about a quarter of a sampling step. :class:`PrefixBufferLayer`
allocates ``(B, H, T + reserve, D)`` once, writes the new positions in place and hands attention
a view of the filled prefix ``[..., :T, :]``. Attention then sees the same shapes and values as
with `DynamicCache`, so the logits are bit-identical (a test checks sampled and greedy decoding);
only the copies are gone. Unlike transformers' `StaticCache`, whose masks span the whole
reserved length, nothing about the computation changes.

Anything that replaces a layer's tensors (beam search's reorder, a crop) leaves a tensor that is
not the layer's view; the next update then copies it into a fresh buffer, so every `DynamicCache`
operation keeps working. Batch selection (the guided decoder's finished rows leaving) selects the
buffers' rows instead, room included.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["PrefixBufferLayer", "prefix_cache", "with_prefix_cache"]


class PrefixBufferLayer(DynamicLayer):
    """One layer's keys and values ``(B, H, T, D)``, stored in a buffer with `reserve` free
    positions beyond the first update's length (doubled when they run out)."""

    def __init__(self, reserve: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reserve = max(int(reserve), 0)
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = self.values = None
        self.is_initialized = True

    def _rebuffer(self, capacity: int, key_states: Tensor, value_states: Tensor) -> None:
        """Move the cached keys and values (none yet, or tensors a reorder or crop left) into new
        buffers of `capacity` positions, shaped like the incoming states but for length."""
        length = 0 if self.keys is None else self.keys.shape[-2]
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if length:
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = keys, values
        self._set_length(length)

    def _set_length(self, length: int) -> None:
        self.keys = self._key_buffer[..., :length, :]
        self.values = self._value_buffer[..., :length, :]

    def _is_own_view(self) -> bool:
        return (
            self._key_buffer is not None
            and self.keys is not None
            and self.keys.data_ptr() == self._key_buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
            and self.keys.shape[:-2] == self._key_buffer.shape[:-2]
        )

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Write ``key_states, value_states (B, H, t, D)`` after the cached positions; returns the
        views ``(B, H, T + t, D)`` of everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = 0 if self.keys is None else self.keys.shape[-2]
        needed = length + key_states.shape[-2]
        if not self._is_own_view():
            # first update, or the tensors were replaced (reorder, crop, batch select)
            self._rebuffer(needed + self.reserve, key_states, value_states)
        elif needed > self._key_buffer.shape[-2]:
            self._rebuffer(2 * needed, key_states, value_states)
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self._set_length(needed)
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the batch rows ``indices`` (a decoder's finished rows leaving): one copy of the
        buffers' rows, room included, so the next update writes in place again."""
        if not self._is_own_view():
            super().batch_select_indices(indices)
            return
        length = self.keys.shape[-2]
        self._key_buffer = self._key_buffer.index_select(0, indices)
        self._value_buffer = self._value_buffer.index_select(0, indices)
        self._set_length(length)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def prefix_cache(model: Any, reserve: int) -> DynamicCache:
    """A `DynamicCache` for `model` whose full-attention layers are :class:`PrefixBufferLayer`
    with `reserve` positions of room (the tokens still to generate); sliding-window and other
    special layers stay transformers' own."""
    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    if cache.layers:
        cache.layers = [PrefixBufferLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:  # layers appended on first use
        cache.layer_class_to_replicate = partial(PrefixBufferLayer, reserve)
    return cache


def with_prefix_cache(model: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate()` keywords with a :func:`prefix_cache` reserved for ``max_new_tokens``, unless
    the call (or the model's generation config) chooses a cache of its own or no cache."""
    config = getattr(model, "generation_config", None)
    if (
        kwargs.get("past_key_values") is not None
        or kwargs.get("cache_implementation") is not None
        or getattr(config, "cache_implementation", None) is not None
        or kwargs.get("use_cache", getattr(config, "use_cache", True)) is False
        or kwargs.get("generation_config") is not None
        or kwargs.get("assistant_model") is not None
    ):
        return kwargs
    reserve = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None)) or 0
    return kwargs | {"past_key_values": prefix_cache(model, int(reserve))}
