"""Checking option values against their type annotations, for detectors and training recipes alike."""

from __future__ import annotations

import types
import typing

SIMPLE_TYPES = (bool, int, float, str, dict, list)


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
        raise ValueError(f"{owner}: {name} must be {names}, got {value!r}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool) and int not in allowed:
        return float(value)
    return value
