"""scanlab's error types: what bad input, a bad file or the machine's limits raise.

Every one is a `ScanlabError` and also the standard exception a caller would catch
(`ValueError`, `TypeError`, `OSError`, `TimeoutError`, `MemoryError`, `FloatingPointError`).
The CLI reports exactly `ScanlabError`s as one `error:` line with exit status 2; any other
exception is a bug, shown with its traceback.
"""

from __future__ import annotations


class ScanlabError(Exception):
    """The base of every error scanlab raises on purpose, with a message naming the cause."""


class ArgumentError(ScanlabError, ValueError):
    """An argument has a bad value: out of range, of the wrong shape, not finite."""


class ArgumentTypeError(ScanlabError, TypeError):
    """An argument has the wrong kind: a float for an int, a traced value for a static one."""


class PathError(ScanlabError, OSError):
    """A path cannot be read or written."""


class MissingPathError(PathError, FileNotFoundError):
    """A path that must exist does not."""


class PathExistsError(PathError, FileExistsError):
    """A path that would be overwritten already holds something."""


class JoinTimeoutError(ScanlabError, TimeoutError):
    """The processes of a multi-process run did not all arrive within the join timeout."""


class OutOfMemoryError(ScanlabError, MemoryError):
    """A request needs more memory than the device holds (estimated before allocating)."""


class DivergedError(ScanlabError, FloatingPointError):
    """A computation produced NaN or Inf where a finite value is needed (a training loss)."""
