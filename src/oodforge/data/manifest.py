"""Content hashes of streamed image files, kept in a manifest so that a rerun does not read every file again.

A file's hash is reused only while its size, modification time, status-change time and inode are all
unchanged (the status-change time cannot be set back by a user, so a file replaced with another of the
same size and an old modification time is read again). A zip archive is hashed member by member, again
only when the archive itself changed. Manifests live under ``$OODFORGE_CACHE/manifests``; a cache that
cannot be written warns and the hashes are simply computed again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from oodforge.util.atomic import atomic_write

MANIFEST_FORMAT = 1


def cache_root() -> Path:
    """``$OODFORGE_CACHE``, else ``~/.cache/oodforge`` (the data folder may be read-only)."""
    return Path(os.environ.get("OODFORGE_CACHE", Path.home() / ".cache" / "oodforge")).expanduser()


def file_digests(source: Path, members: list[str]) -> np.ndarray:
    """16 bytes of SHA-256 of each member's content, (N, 16) uint8; ``source`` is a folder or a zip archive."""
    source = source.resolve()
    path = cache_root() / "manifests" / f"{hashlib.sha256(str(source).encode()).hexdigest()[:24]}.json"
    known = _read(path, source)
    stamps = {"": _stamp(source)} if source.is_file() else {m: _stamp(source / m) for m in members}
    if source.is_file() and known.get("", [None])[0] != stamps[""]:
        known = {}  # the archive changed: every member is hashed again
    entries, changed = {}, False
    zip_handle = zipfile.ZipFile(source) if source.is_file() else None
    try:
        for member in members:
            stamp = stamps[""] if zip_handle else stamps[member]
            old = known.get(member)
            if old is not None and old[0] == stamp:
                entries[member] = old
                continue
            data = zip_handle.read(member) if zip_handle else (source / member).read_bytes()
            entries[member] = [stamp, hashlib.sha256(data).hexdigest()[:32]]
            changed = True
    finally:
        if zip_handle is not None:
            zip_handle.close()
    if zip_handle:
        entries[""] = [stamps[""], ""]
    if changed:
        _write(path, source, {**known, **entries})
    return np.frombuffer(b"".join(bytes.fromhex(entries[m][1]) for m in members), np.uint8).reshape(-1, 16)


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _read(path: Path, source: Path) -> dict[str, list]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if record.get("format") != MANIFEST_FORMAT or record.get("source") != str(source):
        return {}
    return record.get("files", {})


def _write(path: Path, source: Path, files: dict[str, list]) -> None:
    try:
        text = json.dumps({"format": MANIFEST_FORMAT, "source": str(source), "files": files}, separators=(",", ":"))
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as exc:  # read-only or full cache: hashes are computed again next time
        warnings.warn(f"file manifest {path} not written ({exc}); file hashes are recomputed next time",
                      stacklevel=3)
