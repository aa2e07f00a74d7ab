"""Errors a user can cause: the CLI prints a :class:`TumorsegError` as one line and exits 2; anything
else escaping is a bug in tumorseg."""

from __future__ import annotations

import errno


class TumorsegError(Exception):
    """A user-facing error: the message names the file or key and what to do."""


class ConfigError(TumorsegError):
    """A bad value in params.yaml (or an override of it)."""


class DataError(TumorsegError):
    """Input data that cannot be used as it is."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of space (no space left, or over quota)."""
    return isinstance(exc, OSError) and exc.errno in {errno.ENOSPC, getattr(errno, "EDQUOT", 122)}


def disk_full(path: object) -> DataError:
    """The one-line error for a write to ``path`` that ran out of space."""
    return DataError(
        f"{path}: no space left on the device while writing it; free space there or write elsewhere"
    )
