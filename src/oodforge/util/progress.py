"""Rich progress bars that disappear entirely with ``quiet``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress]:
    """A rich ``Progress`` (disabled when ``quiet``) showing description, bar, count and times."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=quiet, transient=False,
    )
    with progress:
        yield _DefaultStatus(progress)


class _DefaultStatus:
    """Wraps ``Progress`` so tasks get an empty ``status`` field by default."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        fields.setdefault("status", "")
        return self._progress.add_task(description, total=total, **fields)

    def __getattr__(self, name: str):
        return getattr(self._progress, name)
