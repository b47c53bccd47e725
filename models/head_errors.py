"""The errors of reading a head directory (`models.head_io`), in a module of their own: the flows
catch them to fail in one line, and importing them must not import torch."""

from __future__ import annotations


class HeadFormatError(ValueError):
    """A head directory that cannot be read; the message names the file and the field."""


class HeadMismatchError(ValueError):
    """A head loaded onto a base model it was not trained for; the message says what differs."""
