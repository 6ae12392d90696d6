"""A run folder's files (results.json, scores.npz, results.md, report.html, ...) replaced together.

Every file of one write is first written into a staging folder inside the run folder
(``.staging-<host>-<pid>-*``). When all are written, a ``COMMITTED`` marker listing them is written, then
each is renamed into place. A kill before the marker leaves the old files untouched (the staging folder is
removed by the next writer or reader); a kill after it is finished by the next writer or reader (roll
forward). Moving files in holds an exclusive lock on the run folder, so concurrent writers replace the run
one after the other, never interleaved. So, seen through oodforge, a run folder holds either all old files or
all new ones. results.json also records ``scores_sha256``, a digest of the score arrays, so that ``report``
refuses a scores.npz that does not belong to its results.json (copied from elsewhere, or left by an older oodforge).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from oodforge.util.atomic import WriteError, process_tag, tag_owner, write_failure, writer_gone

STAGING_PREFIX = ".staging-"
COMMITTED = "COMMITTED"


def scores_digest(scores: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the sorted keys, dtypes, shapes and bytes of float64 score arrays."""
    digest = hashlib.sha256()
    for key in sorted(scores):
        array = np.ascontiguousarray(np.asarray(scores[key], dtype=np.float64).ravel())
        digest.update(f"{key}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_together(folder: Path, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Write ``folder/<name>`` for every ``name -> write(path)`` so that the files change together."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_pending(folder)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{process_tag()}-", dir=folder))
    except OSError as exc:
        raise WriteError(folder, exc.strerror or str(exc), exc.errno) from exc
    name = COMMITTED
    try:
        for name, write in writers.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
        name = COMMITTED
        marker = staging / f".{COMMITTED}.tmp"
        marker.write_text("\n".join(writers) + "\n")
        os.replace(marker, staging / COMMITTED)  # from here on the new files win
    except (OSError, RuntimeError) as exc:  # a full disk: name the file (torch.save raises RuntimeError)
        shutil.rmtree(staging, ignore_errors=True)
        raise WriteError(folder / name, write_failure(exc), getattr(exc, "errno", None)) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with _locked(folder):  # one writer moves its files in at a time, so no run is mixed from two writes
        if (staging / COMMITTED).is_file():  # else another writer's finish_pending already rolled it forward
            _move_in(staging, folder)


def finish_pending(folder: Path) -> None:
    """Complete a committed write that a kill interrupted; drop an uncommitted one of a dead process."""
    with _locked(folder):
        for staging in sorted(Path(folder).glob(f"{STAGING_PREFIX}*")):
            if (staging / COMMITTED).is_file():
                _move_in(staging, folder)
            elif writer_gone(*tag_owner(staging.name[len(STAGING_PREFIX):].rpartition("-")[0])):
                shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself (``flock`` on the directory: no lock file is left)."""
    if not Path(folder).is_dir():  # nothing written there yet: nothing to finish or to guard
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _move_in(staging: Path, folder: Path) -> None:
    """Rename every listed file of a committed staging folder into ``folder`` (idempotent), then drop it."""
    for name in (staging / COMMITTED).read_text().splitlines():
        source = staging / name
        if source.exists():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, folder / name)
    shutil.rmtree(staging, ignore_errors=True)
