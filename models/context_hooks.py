"""Token context for heads that need it, tracked across KV-cached decoding.

``generate()`` only hands the output layer the hidden states whose logits it wants (the last
one, usually), and during cached decoding only the new token's. :class:`ContextTracker`
therefore hooks the causal LM and its backbone:

* a pre-hook on the LM records ``logits_to_keep`` (which positions reach the output layer);
* a pre-hook on the backbone records the padding mask and the KV cache it was given;
* a hook after the backbone computes the context of *all* the call's new tokens from its
  last hidden states, continuing the :class:`RunningContext` stored on the KV cache, and
  stores the updated state back on that cache.

Keeping the state on the cache object ties it to that generation: a new ``generate()``
makes a new cache and starts afresh, and the cache's own row operations (beam-search
``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``) are wrapped on
that instance so the state follows the rows. ``crop``/``reset`` drop the state; continuing
such a cache then fails loudly instead of silently using the wrong context.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from alignheads.models.context import RunningContext, TokenContext, continue_context, step_context

__all__ = ["ContextTracker", "attach_running_context", "running_context_of"]

_STATE_ATTR = "_alignheads_running_context"
_PATCHED_ATTR = "_alignheads_rows_patched"


def running_context_of(cache: Any) -> RunningContext | None:
    """The head's running context stored on a KV cache, if any."""
    return None if cache is None else getattr(cache, _STATE_ATTR, None)


def _set_state(cache: Any, state: RunningContext | None) -> None:
    cache.__dict__[_STATE_ATTR] = state


def attach_running_context(cache: Any, state: RunningContext) -> None:
    """Store ``state`` on ``cache`` and make the cache's row operations carry it along."""
    if not hasattr(cache, "__dict__"):
        raise TypeError(
            f"cannot keep the head's decoding state on a {type(cache).__name__} KV cache; "
            "use a transformers Cache object (the default in transformers >= 5)"
        )
    _set_state(cache, state)
    if cache.__dict__.get(_PATCHED_ATTR):
        return
    ref = weakref.ref(cache)  # no reference cycle: the cache (and its tensors) is freed promptly
    cls = type(cache)

    def wrap(name: str, update: Callable[[RunningContext, Any], RunningContext | None]) -> None:
        original = getattr(cls, name, None)
        if original is None:
            return

        def method(arg: Any) -> Any:
            target = ref()
            result = original(target, arg)
            state = running_context_of(target)
            if state is not None:
                _set_state(target, update(state, arg))
            return result

        cache.__dict__[name] = method

    wrap("reorder_cache", lambda state, index: state.select_rows(index))
    wrap("batch_select_indices", lambda state, index: state.select_rows(index))
    wrap("batch_repeat_interleave", lambda state, repeats: state.repeat_rows(repeats))
    wrap("crop", lambda state, _n: None)
    if hasattr(cls, "reset"):
        original_reset = cls.reset

        def reset() -> Any:
            target = ref()
            _set_state(target, None)
            return original_reset(target)

        cache.__dict__["reset"] = reset
    cache.__dict__[_PATCHED_ATTR] = True


def _bound_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a call by name, with ``**kwargs`` flattened in."""
    if not args:  # generate() and the causal LM call by keyword: no binding needed (~20 µs saved)
        return kwargs
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    out = dict(bound)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(out.get(name), dict):
            out.update(out.pop(name))
    return out


class ContextTracker:
    """Computes, for each forward call of ``model``, the token context of the positions
    whose logits reach the output layer (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        backbone = getattr(model, "base_model", None)
        if backbone is None or backbone is model:
            raise TypeError(
                f"{type(model).__name__} has no separate backbone (model.base_model); "
                "a head that needs token context cannot be attached to it"
            )
        self._model_signature = inspect.signature(model.forward)
        self._backbone_signature = inspect.signature(backbone.forward)
        self._logits_to_keep: int | Tensor = 0
        self._mask: Tensor | None = None
        self._cache_in: Any = None
        self._cache_len = 0
        self._context: TokenContext | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            backbone.register_forward_pre_hook(self._before_backbone, with_kwargs=True),
            backbone.register_forward_hook(self._after_backbone),
        ]

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _before_model(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = _bound_arguments(self._model_signature, args, kwargs)
        self._logits_to_keep = arguments.get("logits_to_keep", 0)
        self._context = None

    def _before_backbone(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = _bound_arguments(self._backbone_signature, args, kwargs)
        self._mask = arguments.get("attention_mask")
        self._cache_in = arguments.get("past_key_values")
        # the backbone fills the cache in place: measure it before it runs; only a call without a
        # padding mask needs it (the mask's columns count the past tokens otherwise)
        self._cache_len = (
            self._cache_in.get_seq_length() if self._mask is None and self._cache_in is not None else 0
        )

    def _after_backbone(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        length = hidden.shape[1]
        mask, cache_in = self._mask, self._cache_in
        self._mask = self._cache_in = None
        if mask is not None:
            if mask.dim() != 2:
                raise NotImplementedError(
                    f"the head needs a 2-D padding mask (batch, past + new tokens); got shape {tuple(mask.shape)}"
                )
            past = mask.shape[1] - length
            if past < 0:
                raise ValueError(f"attention_mask has {mask.shape[1]} columns for {length} new tokens")
            new_mask = mask[:, past:]
        else:
            past = self._cache_len
            new_mask = None
        state = None
        if past > 0:
            state = running_context_of(cache_in)
            if state is None:
                raise RuntimeError(
                    f"this call continues a KV cache holding {past} tokens that the head did not see "
                    "being filled (or that was cropped/reset); prefill the cache through the aligned model"
                )
            if state.seen != past:
                raise RuntimeError(
                    f"the head's running context covers {state.seen} tokens but the KV cache holds {past}"
                )
        # a decoding step (one new token after a prefix) takes the one-token path: same numbers,
        # a few small ops instead of the cumulative sums
        if length == 1 and state is not None:
            context, new_state = step_context(hidden, new_mask, state)
        else:
            context, new_state = continue_context(hidden, new_mask, state)
        cache_out = getattr(output, "past_key_values", None)
        if cache_out is None:
            cache_out = cache_in
        if cache_out is not None:
            attach_running_context(cache_out, new_state)
        self._context = context

    # ------------------------------------------------------------------ consumer
    def take(self, n_positions: int) -> TokenContext:
        """The context of the ``n_positions`` hidden states the output layer received."""
        context = self._context
        if context is None:
            raise RuntimeError(
                "the head needs token context but none was computed for this call: call the causal LM "
                "(or generate), not its output layer directly"
            )
        self._context = None
        keep = self._logits_to_keep
        if isinstance(keep, Tensor):
            context = context.select(keep.to(context.positions.device))
        elif keep and int(keep) < context.length:  # keeping as many as there are (a step): all
            context = context.select(slice(-int(keep), None))
        if context.length != n_positions:
            raise RuntimeError(
                f"the output layer got {n_positions} positions but the tracked context has {context.length}"
            )
        return context
