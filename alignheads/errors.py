"""Errors that are the user's to fix: the CLI prints their message instead of a traceback."""

from __future__ import annotations

# Defined with the flows, which end a run in a Failed state with the error's one line for these
# (`alignheads.flows.failures`); the command line prints their message instead of a traceback.
from alignheads.flows.failures import USER_ERRORS

__all__ = ["USER_ERRORS"]
