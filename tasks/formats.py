"""Preference-row formats: detect a row's format and turn it into (prompt, chosen, rejected) text.

Pure functions on one row (a dict). Problems with a row raise `RowProblem(field, reason)`;
the ingestion loop turns those into `BadRowError`s or rows of the rejects table.

Formats
- ``trl``: ``prompt``/``chosen``/``rejected`` strings (TRL's explicit-prompt standard format;
  Dahoas/full-hh-rlhf's extra ``response`` column is ignored).
- ``hh``: Anthropic HH raw, ``chosen``/``rejected`` whole ``\\n\\nHuman: … \\n\\nAssistant: …``
  dialogues; the prompt is their common prefix cut after its last ``\\n\\nAssistant:``.
- ``conversational``: TRL's conversational preference format, lists of ``{role, content}``
  messages: ``prompt`` messages + ``chosen``/``rejected`` assistant turns, or (no ``prompt``, or a
  plain-string ``prompt`` as in UltraFeedback-binarized) ``chosen``/``rejected`` full conversations
  sharing a prefix. Rendered with the tokenizer's chat template when it has one, else HH style.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("trl", "hh", "conversational")
RESPONSE_FIELDS = ("chosen", "rejected")
HH_ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}

_ASSISTANT_SHOWN = repr(HH_ASSISTANT)  # "'\\n\\nAssistant:'" as it appears in messages


class RowProblem(Exception):
    """One row is unusable; `field` is None when the whole row is (malformed JSON, bad bytes)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


class DataError(ValueError):
    """Preference data that cannot be used as given; the message names the source."""


class FormatDetectionError(DataError):
    """The preference format of a row cannot be told from its keys."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], Mapping))


def detect_format(row: Any) -> str:
    """'trl', 'hh' or 'conversational' from one row's keys and value types.

    Any of prompt/chosen/rejected being a list means conversational; a string ``prompt`` next to
    ``chosen`` or ``rejected`` means TRL (Dahoas/full-hh-rlhf included); ``chosen`` and
    ``rejected`` without a prompt mean Anthropic HH. Anything else raises FormatDetectionError
    naming the keys found.
    """
    if not isinstance(row, Mapping):
        raise FormatDetectionError(
            f"cannot detect the preference format: the row is a {_type_name(row)}, not an object"
        )
    if any(isinstance(row.get(k), list) for k in ("prompt", *RESPONSE_FIELDS)):
        return "conversational"
    has_chosen, has_rejected = "chosen" in row, "rejected" in row
    if "prompt" in row and (has_chosen or has_rejected):
        return "trl"
    if has_chosen and has_rejected:
        return "hh"
    keys = ", ".join(repr(k) for k in row) or "none"
    raise FormatDetectionError(
        f"cannot detect the preference format from the keys found ({keys}): expected "
        "'prompt'/'chosen'/'rejected' strings (trl), 'chosen'/'rejected' dialogues (hh) "
        "or lists of {role, content} messages (conversational)"
    )


def _text(row: Mapping[str, Any], key: str, fmt: str) -> str:
    if key not in row:
        raise RowProblem(key, "missing field")
    value = row[key]
    if value is None:
        raise RowProblem(key, "missing value (null)")
    if not isinstance(value, str):
        hint = " (a message list: use format 'conversational')" if isinstance(value, list) else ""
        raise RowProblem(key, f"expected a string for format '{fmt}', got {_type_name(value)}{hint}")
    if not value:
        raise RowProblem(key, "empty string")
    if not value.strip():
        raise RowProblem(key, "whitespace-only string")
    return value


def _check_distinct(chosen: Any, rejected: Any) -> None:
    if chosen == rejected:
        raise RowProblem("rejected", "identical to 'chosen'")


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH dialogues into (prompt, chosen response, rejected response).

    The prompt is the longest common prefix cut right after its last ``\\n\\nAssistant:``, so the
    responses keep their leading space (``" Sure..."``). Raises RowProblem when no such cut exists.
    """
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT not in text:
            raise RowProblem(key, f"cannot parse the dialogue: no {_ASSISTANT_SHOWN} turn")
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        raise RowProblem(
            "rejected",
            f"cannot parse the dialogue: no common prompt with 'chosen' ending in {_ASSISTANT_SHOWN}",
        )
    cut += len(HH_ASSISTANT)
    prompt, chosen_resp, rejected_resp = chosen[:cut], chosen[cut:], rejected[cut:]
    for key, resp in (("chosen", chosen_resp), ("rejected", rejected_resp)):
        if not resp.strip():
            raise RowProblem(key, f"empty response after the prompt's last {_ASSISTANT_SHOWN}")
    return prompt, chosen_resp, rejected_resp


def _messages(row: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    if key not in row:
        raise RowProblem(key, "missing field")
    value = row[key]
    if value is None:
        raise RowProblem(key, "missing value (null)")
    if not isinstance(value, list):
        raise RowProblem(key, f"expected a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        raise RowProblem(key, "empty message list")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise RowProblem(
                key, f"message {i}: expected an object with 'role' and 'content', got {_type_name(msg)}"
            )
        for part in ("role", "content"):
            if msg.get(part) is None:
                raise RowProblem(key, f"message {i}: missing '{part}'")
            if not isinstance(msg[part], str):
                raise RowProblem(key, f"message {i}: '{part}' must be a string, got {_type_name(msg[part])}")
        if not msg["role"].strip():
            raise RowProblem(key, f"message {i}: empty 'role'")
        if not msg["content"].strip():
            raise RowProblem(key, f"message {i}: empty 'content'")
        # Parquet/Arrow structs carry every key of every message; drop the null ones for templates.
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def _same_message(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


def _starts_with(messages: list[dict[str, Any]], prefix: list[dict[str, Any]]) -> bool:
    return len(messages) > len(prefix) and all(
        _same_message(m, p) for m, p in zip(messages, prefix, strict=False)
    )


def split_conversation(
    row: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt messages, chosen messages, rejected messages) of a conversational row.

    With a message-list ``prompt``, chosen/rejected are the assistant turns (a copy of the prompt
    at their start is removed). Without one (or with a plain-string ``prompt``), the prompt is the
    longest common prefix of chosen and rejected, cut before an assistant message.
    """
    explicit = isinstance(row.get("prompt"), list)
    prompt = _messages(row, "prompt") if explicit else None
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    if prompt is not None:
        if _starts_with(chosen, prompt) and _starts_with(rejected, prompt):
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    else:
        common = 0
        for a, b in zip(chosen, rejected, strict=False):
            if not _same_message(a, b):
                break
            common += 1
        cut = common
        while cut > 0 and not (
            cut < len(chosen)
            and cut < len(rejected)
            and chosen[cut]["role"] == "assistant"
            and rejected[cut]["role"] == "assistant"
        ):
            cut -= 1
        if cut == 0:
            if common == len(chosen) == len(rejected):
                raise RowProblem("rejected", "identical to 'chosen'")
            raise RowProblem(
                "rejected", "no common prompt with 'chosen' followed by an assistant message in both"
            )
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[0]["role"] != "assistant":
            raise RowProblem(key, f"message 0: expected role 'assistant', got {msgs[0]['role']!r}")
    return prompt, chosen, rejected


def _hh_render(messages: list[dict[str, Any]]) -> str:
    return "".join(
        f"\n\n{HH_ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages
    )


def render_conversation(
    prompt: list[dict[str, Any]],
    chosen: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    tokenizer: Any = None,
) -> tuple[str, str, str]:
    """Render messages as text: the tokenizer's chat template if it has one, else HH style.

    Chat template: prompt = template(prompt, add_generation_prompt=True); a response is
    template(prompt + response) with the rendered prompt removed from its start (as TRL does).
    HH style: prompt = ``\\n\\nHuman: …\\n\\nAssistant:``; a response = ``" " + content`` (later turns,
    if any, follow in HH style).
    """
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        # Responses start with an assistant message, rendered "\n\nAssistant: content": the
        # prompt's trailing marker is theirs, so each response is " content" (+ later turns).
        prompt_text = _hh_render(prompt) + HH_ASSISTANT
        chosen_text, rejected_text = (
            _hh_render(prompt + resp)[len(prompt_text) :] for resp in (chosen, rejected)
        )
        return prompt_text, chosen_text, rejected_text
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja TemplateError, raise_exception(), ...
        raise RowProblem("prompt", f"chat template failed: {exc}") from exc
    texts = []
    for key, resp in (("chosen", chosen), ("rejected", rejected)):
        try:
            full = tokenizer.apply_chat_template(prompt + resp, tokenize=False)
        except Exception as exc:
            raise RowProblem(key, f"chat template failed: {exc}") from exc
        if not full.startswith(prompt_text):
            raise RowProblem(
                key,
                "chat template: the rendered prompt + response does not start with the rendered prompt",
            )
        texts.append(full[len(prompt_text) :])
    return prompt_text, texts[0], texts[1]


def parse_row(row: Any, fmt: str, tokenizer: Any = None) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) text of one row in format `fmt`; raises RowProblem."""
    if not isinstance(row, Mapping):
        raise RowProblem(None, f"expected an object, got {_type_name(row)}")
    if fmt == "trl":
        prompt, chosen, rejected = (_text(row, k, fmt) for k in ("prompt", *RESPONSE_FIELDS))
        _check_distinct(chosen, rejected)
        return prompt, chosen, rejected
    if fmt == "hh":
        chosen, rejected = (_text(row, k, fmt) for k in RESPONSE_FIELDS)
        _check_distinct(chosen, rejected)
        return split_hh(chosen, rejected)
    if fmt == "conversational":
        prompt_msgs, chosen_msgs, rejected_msgs = split_conversation(row)
        if len(chosen_msgs) == len(rejected_msgs) and all(
            _same_message(a, b) for a, b in zip(chosen_msgs, rejected_msgs, strict=False)
        ):
            raise RowProblem("rejected", "identical to 'chosen'")
        prompt, chosen, rejected = render_conversation(prompt_msgs, chosen_msgs, rejected_msgs, tokenizer)
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise RowProblem(key, "empty after rendering")
        _check_distinct(chosen, rejected)
        return prompt, chosen, rejected
    raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
