"""Atomic file writes: a crash never leaves a half-written result, checkpoint or cache file.

Temporary files carry the host and process id (``.<name>.tmp-<host>-<pid>-<random>``), so the ones a
killed process left behind can be told from a live writer's and removed (``remove_stale_temp_files``).
Written files get the usual permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from oodforge.util.errors import ConfigError, MissingPathError, WriteError

STALE_AFTER_S = 24 * 3600  # temp files of another host (or of an unknown writer) older than this are removed


def host_tag() -> str:
    """This machine's host name, reduced to letters, digits, ``_`` and ``-`` and 40 characters (used in
    temp names)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def process_tag() -> str:
    """``<host>-<pid>`` of this process, carried by its temporary files and folders."""
    return f"{host_tag()}-{os.getpid()}"


def partial_path(target: Path) -> Path:
    """The folder beside ``target`` that this process fills before renaming it to ``target``."""
    return target.with_name(f".{target.name}.{process_tag()}.partial")


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failure(exc: BaseException) -> str:
    """One line saying why a write failed."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "write failed" in text):
        text += " (is the disk full?)"  # what torch.save says on a full disk
    return text


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Any failure (an ``OSError``, or the ``RuntimeError`` torch.save raises on a full disk) becomes a
    ``WriteError`` naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{process_tag()}-", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except WriteError:
        raise
    except (OSError, RuntimeError) as exc:
        raise WriteError(path, write_failure(exc), getattr(exc, "errno", None)) from exc
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    return path


TEMP_FILE = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
PARTIAL_FOLDER = re.compile(r"^\..+\.(?:(?P<host>[A-Za-z0-9_-]+)-)?(?P<pid>\d+)\.partial$")
OLD_TEMP_FILE = re.compile(r"^\..+\.tmp$")  # written before temp names carried host and pid


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (True when that cannot be told)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's), or not a pid this system knows: leave it alone
    return True


def writer_gone(host: str | None, pid: int | None) -> bool:
    """Whether the writer named by ``host`` and ``pid`` (as in ``process_tag``) is a process of this host
    that no longer runs; another host's writer, or an unnamed one, cannot be told gone."""
    return host == host_tag() and pid is not None and not process_alive(pid)


def tag_owner(tag: str) -> tuple[str | None, int | None]:
    """``"<host>-<pid>"`` (a ``process_tag``) -> (host, pid); (None, None) when ``tag`` is not one."""
    host, _, pid = tag.rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else (None, None)


def _temp_owner(name: str) -> tuple[bool, str | None, int | None]:
    """(whether ``name`` is a temp file or partial folder, its host or None, its pid or None)."""
    for pattern in (TEMP_FILE, PARTIAL_FOLDER):
        match = pattern.match(name)
        if match:
            return True, match.group("host"), int(match.group("pid"))
    return bool(OLD_TEMP_FILE.match(name)), None, None


def remove_stale_temp_files(folder: str | Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temp files and ``.partial`` folders in ``folder`` (not below it) that a killed process left.

    Removed: those of a process of this host that no longer runs, and those older than ``max_age_s``
    from another host (or whose writer is not named). A live process's files are never touched. Returns
    the removed paths; a folder that does not exist, or an entry that cannot be removed, is passed over.
    """
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed, here, now = [], host_tag(), time.time()
    for entry in entries:
        is_temp, host, pid = _temp_owner(entry.name)
        if not is_temp:
            continue
        try:
            if host == here and pid is not None:
                stale = writer_gone(host, pid)
            else:
                stale = now - entry.lstat().st_mtime > max_age_s
            if not stale:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    return removed


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` that never leaves a partial file."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


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


def duplicate_key(node: yaml.Node) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping of a composed YAML document, as (dotted key, its line, the
    line of its first use); None when there is none (YAML would let the last one win silently)."""
    constructor = yaml.constructor.SafeConstructor()
    visited: set[int] = set()
    pending: list[tuple[yaml.Node, str]] = [(node, "")]
    while pending:  # depth first in document order; a node shared through aliases is checked once
        current, where = pending.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(current, yaml.SequenceNode):
            children = [(child, f"{where}[{i}]") for i, child in enumerate(current.value)]
        elif isinstance(current, yaml.MappingNode):
            first_lines: dict = {}
            for key_node, value_node in current.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    children.append((value_node, where))
                    continue
                key = constructor.construct_object(key_node)
                name = f"{where}.{key}" if where else str(key)
                line = key_node.start_mark.line + 1
                if key in first_lines:
                    return name, line, first_lines[key]
                first_lines[key] = line
                children.append((value_node, name))
        pending.extend(reversed(children))
    return None


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping; a missing file, text that is not UTF-8, bad YAML, a key given
    twice, an alias bomb or another type is one clear error naming the file."""
    if not path.is_file():
        raise MissingPathError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: a {what} larger than {MAX_YAML_BYTES >> 20} MiB is refused")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: a {what} must be UTF-8 text; byte 0x{data[exc.start]:02x} on line {line} is "
                         "not") from None
    loader = yaml.SafeLoader(text)  # safe: no python tags
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node) > MAX_YAML_NODES:
            raise ConfigError(f"{path}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values; refused "
                             "(a YAML alias bomb)")
        duplicate = None if node is None else duplicate_key(node)
        if duplicate is not None:
            key, line, first = duplicate
            raise ConfigError(f"{path}: key {key!r} is given twice, on line {first} and again on line {line}; "
                             "keep one")
        config = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping, got {type(config).__name__}")
    return config
