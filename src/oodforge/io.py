"""Atomic file writes: a crash never leaves a half-written result, checkpoint or cache file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` that never leaves a partial file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def atomic_npz(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """``np.savez`` of ``arrays`` atomically (keys may contain ``/``)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    return atomic_write(path, write)


def atomic_npy(array: np.ndarray, path: str | Path) -> Path:
    """``np.save`` of one array atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    return atomic_write(path, write)


MAX_YAML_NODES = 100_000  # a config whose aliases expand to more values than this is refused (alias bomb)
MAX_YAML_BYTES = 1 << 20


def expanded_size(node: yaml.Node, memo: dict[int, int] | None = None) -> int:
    """How many values a composed YAML node becomes once every alias is expanded (shared nodes counted once
    per use, computed once)."""
    memo = {} if memo is None else memo
    if id(node) not in memo:
        memo[id(node)] = 0  # a cycle counts as nothing more
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(expanded_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
        else:
            size = 1
        memo[id(node)] = size
    return memo[id(node)]


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping; a missing file, bad YAML, an alias bomb or another type is one
    clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{path}: a {what} larger than {MAX_YAML_BYTES >> 20} MiB is refused")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and expanded_size(node) > MAX_YAML_NODES:
            raise ValueError(f"{path}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values; refused "
                             "(a YAML alias bomb)")
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a {what} must be a YAML mapping, got {type(config).__name__}")
    return config
