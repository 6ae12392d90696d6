"""Checking option values against their type annotations, for detectors and training recipes alike, and
output folders before anything runs."""

from __future__ import annotations

import os
import tempfile
import types
import typing
from collections.abc import Iterable
from pathlib import Path

import yaml

from oodforge.util.atomic import expanded_size
from oodforge.util.errors import ConfigError

SIMPLE_TYPES = (bool, int, float, str, dict, list)
MAX_OPTION_VALUES = 10_000  # an option value whose YAML aliases expand to more values than this is refused


def allowed_types(hint: object) -> tuple[type, ...]:
    """The plain types an annotation allows (``int | None`` -> (int, NoneType)); () when not plain."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    args = tuple(typing.get_origin(a) or a for a in args)  # dict[str, int] -> dict
    if not args or not all(a in SIMPLE_TYPES or a is type(None) for a in args):
        return ()
    return args


def fits(value: object, allowed: tuple[type, ...]) -> bool:
    """Whether ``value`` is one of ``allowed``; an int passes for a float, a bool never for a number."""
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def check_value(owner: str, name: str, value: object, hint: object) -> object:
    """``value`` (an int made float where a float is expected) or a ValueError naming owner and option."""
    allowed = allowed_types(hint)
    if allowed and not fits(value, allowed):
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{owner}: {name} must be {names}, got {value!r}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool) and int not in allowed:
        return float(value)
    return value


def parse_options(pairs: Iterable[str], what: str) -> dict:
    """``["key=value", ...]`` -> {key: value}, each value read as plain YAML (safe loader: no Python tags).

    A pair without ``=`` or a key, a value that is not valid YAML, or one whose aliases expand to more than
    ``MAX_OPTION_VALUES`` values is one ``ValueError`` naming ``what``, the pair and the option.
    """
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {pair!r} must look like key=value")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            if node is not None and expanded_size(node) > MAX_OPTION_VALUES:
                raise ConfigError(f"{what} {pair!r}: the value of {key!r} expands to more than "
                                 f"{MAX_OPTION_VALUES:,} values; refused")
            options[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{what} {pair!r}: the value of {key!r} is not a plain YAML value ({reason})") from None
    return options


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be written, before any training or forward pass.

    An existing file is refused; otherwise the folder is made (parents too) and a temporary file is
    created and deleted in it. Folders made here are removed again, so a run refused later leaves
    nothing behind. Any ``OSError`` becomes a ``ValueError`` naming ``flag``, the path and the reason.
    """
    path = Path(path)
    made: list[Path] = []
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a folder")
        made = [p for p in (path, *path.parents) if not p.exists() and not p.is_symlink()]
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".oodforge-write-check-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return path


def check_output_file(path: str | Path, flag: str = "--output") -> Path:
    """Refuse an output file that is a folder or whose folder cannot be written, before any work."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder, not a file")
    check_output_folder(path.parent if str(path.parent) else Path("."), flag)
    return path
