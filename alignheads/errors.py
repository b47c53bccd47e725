"""Errors that are the user's to fix: the CLI prints their message instead of a traceback."""

from __future__ import annotations

from alignheads.config import ConfigError
from alignheads.models.head_io import HeadFormatError, HeadMismatchError
from alignheads.storage.manifest import ArtifactError
from alignheads.storage.query import QueryError
from alignheads.tasks.ingest import DataError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ArtifactError,
    QueryError,
    DataError,
    HeadFormatError,
    HeadMismatchError,
    FileNotFoundError,
)
