"""The errors oodforge raises for its users: one family, each a one-line message naming the file, folder, flag
or value at fault. The command line prints them as ``error: <message>`` with exit code 2; anything else is a
bug and keeps its traceback. Each also derives from the builtin exception it refines, so ``except ValueError``
and the like still catch it."""

from __future__ import annotations

from pathlib import Path


class OodforgeError(Exception):
    """An error the user can act on; ``str(error)`` is one line."""


class ConfigError(OodforgeError, ValueError):
    """A bad option, value, spec or file content (a detector option, a YAML key, a flag)."""


class UnknownNameError(OodforgeError, KeyError):
    """A name no registry knows (a detector, dataset, benchmark, loss, head or backbone)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingPathError(OodforgeError, FileNotFoundError):
    """A file or folder the user named that is not there."""


class DataError(OodforgeError, ValueError):
    """Data that cannot be used: an image that does not decode, a damaged archive or synthetic set."""


class ModelError(OodforgeError, ValueError):
    """A model that cannot be loaded or does not fit the benchmark."""


class DivergedError(OodforgeError, FloatingPointError):
    """Numbers that stopped being finite: diverged training, a model whose outputs are NaN."""


class WriteError(OodforgeError, OSError):
    """A file that could not be written (full disk, read-only folder, ...); one line naming the file."""

    def __init__(self, path: str | Path, reason: str, errno_: int | None = None) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.message = f"cannot write {path}: {reason}"
        self.errno = errno_
        self.path = str(path)

    def __str__(self) -> str:
        return self.message
