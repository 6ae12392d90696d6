"""``FileImageSet``: images listed as files of a folder or archive, decoded and resized lazily.

Each image is read, decoded and brought to the target shape inside ``__getitem__``, so DataLoader
workers do the work and memory holds only the batches in flight. Zip archives are read in place;
tar archives (``.tar``, ``.tar.gz``) have no random access, so they are unpacked once into the cache
(on disk, never into memory; into a temporary folder when the cache cannot be written) and streamed
from there.
"""

from __future__ import annotations

import atexit
import hashlib
import lzma
import os
import shutil
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from oodforge.data.decoding import archive_error, decode_fitted
from oodforge.data.imageset import balanced_index
from oodforge.data.manifest import file_digests
from oodforge.util.errors import ConfigError, WriteError

RESIZE_MODES = ("stretch", "shorter_crop")


@dataclass
class FileImageSet:
    """Image files (folder or zip) with labels; ``image_shape`` (H, W, C) is what ``__getitem__`` returns."""

    name: str
    source: Path  # a folder, or a .zip archive
    members: list[str]  # paths relative to ``source``
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)
    image_shape: tuple[int, int, int] | None = None  # None: keep each file's own size (batching needs equal sizes)
    resize: str = "stretch"

    def __post_init__(self) -> None:
        if len(self.members) != len(self.labels):
            raise ConfigError(f"{self.name}: {len(self.members)} files but {len(self.labels)} labels")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"{self.name}: resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    def __len__(self) -> int:
        return len(self.members)

    def reshaped(self, shape: tuple[int, int, int], resize: str = "stretch") -> FileImageSet:
        """The same files, delivered as ``shape`` = (H, W, C)."""
        return replace(self, image_shape=tuple(shape), resize=resize)

    def subset(self, index: np.ndarray, name: str | None = None) -> FileImageSet:
        """The files at ``index`` (positions or boolean mask)."""
        positions = np.arange(len(self))[index]
        return replace(self, name=name or self.name, members=[self.members[i] for i in positions],
                       labels=self.labels[positions])

    def balanced_head(self, count: int, name: str | None = None) -> FileImageSet:
        """``count`` files taken from the classes in turn (see ``ImageSet.balanced_head``)."""
        return self.subset(balanced_index(self.labels, count), name)

    def fingerprint(self) -> str:
        """A short hash of the chosen files' names and contents, their labels, the class names and the delivered
        shape (file contents hashed once and kept in a manifest, ``oodforge.data.manifest``)."""
        digest = hashlib.sha256(f"{self.name}|{self.image_shape}|{self.resize}|{self.classes}".encode())
        digest.update("\n".join(self.members).encode())
        digest.update(self.item_digests().tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def item_digests(self) -> np.ndarray:
        """One 16-byte hash of each file's content, shape (N, 16) uint8."""
        return file_digests(self.source, self.members)

    def torch_dataset(self, transform=None) -> StreamingImages:
        """A torch ``Dataset`` yielding (float image in [0, 1] of shape (C, H, W), label)."""
        return StreamingImages(self, transform)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (H, W, C) in the delivered shape."""
        member = self.members[index]
        source = f"{self.source}:{member}" if self.is_zip else str(self.source / member)
        return decode_fitted(self._read(member), source, self.image_shape, self.resize)

    @property
    def is_zip(self) -> bool:
        """Whether the files are members of a zip archive."""
        return self.source.is_file()

    def _read(self, member: str) -> bytes:
        if not self.is_zip:
            return (self.source / member).read_bytes()
        return _zip_handle(self.source).read(member)


_ZIP_HANDLES: dict[tuple[int, str], zipfile.ZipFile] = {}


def _zip_handle(path: Path) -> zipfile.ZipFile:
    """One open ``ZipFile`` per process (DataLoader workers each open their own)."""
    key = (os.getpid(), str(path))
    if key not in _ZIP_HANDLES:
        _ZIP_HANDLES[key] = zipfile.ZipFile(path)
    return _ZIP_HANDLES[key]


class StreamingImages(Dataset):
    """Torch view of a ``FileImageSet``; ``transform`` acts on the (C, H, W) float tensor."""

    def __init__(self, images: FileImageSet, transform=None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(self.images.load(index)).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.images.labels[index])


_TEMPORARY_UNPACKED: dict[str, Path] = {}  # archive key -> temporary folder, when the cache could not be written


class _CannotWrite(Exception):
    """The folder an archive is unpacked into cannot be written (read-only, full, not a folder)."""


def unpack_tar(archive: Path, cache: Path) -> Path:
    """Unpack a tar(.gz) archive once into ``cache`` (atomically, by renaming a finished folder).

    When the cache cannot be written (read-only, full disk), one warning names it and the cause, and the
    archive is unpacked into a temporary folder removed at exit (once per process). An archive that
    cannot be read is a ``CorruptImageError`` naming it.
    """
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / "unpacked" / f"{archive.name}-{key}"
    if target.is_dir():
        return target
    if key in _TEMPORARY_UNPACKED and _TEMPORARY_UNPACKED[key].is_dir():
        return _TEMPORARY_UNPACKED[key]
    reason = _unpack_into(archive, target)
    if reason is None:
        return target
    folder = Path(tempfile.mkdtemp(prefix=f"oodforge-{archive.name}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    try:
        _extract(archive, folder)
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, _CannotWrite):
            raise WriteError(folder, f"cannot unpack {archive} there either ({exc}); the cache "
                                     f"{cache / 'unpacked'} could not be written either ({reason})") from None
        raise
    warnings.warn(f"archive cache {cache / 'unpacked'} not written ({reason}); unpacked {archive} into the "
                  f"temporary folder {folder} instead (removed at exit)", stacklevel=2)
    _TEMPORARY_UNPACKED[key] = folder
    return folder


def _unpack_into(archive: Path, target: Path) -> str | None:
    """Unpack into a partial folder renamed to ``target``; why the cache cannot be written, or None when done."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        _extract(archive, partial)
        try:
            os.replace(partial, target)
        except OSError as exc:
            raise _CannotWrite(exc.strerror or str(exc)) from exc
    except _CannotWrite as exc:
        return None if target.is_dir() else str(exc)  # a folder already there: another process finished first
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return None


def _extract(archive: Path, folder: Path) -> None:
    """Unpack ``archive`` into ``folder``: ``_CannotWrite`` when ``folder`` cannot be written, a
    ``CorruptImageError`` naming the archive when the archive cannot be read."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _CannotWrite(exc.strerror or str(exc)) from exc
    with open(archive, "rb") as handle:  # an archive that cannot be opened is an OSError naming it, raised here
        try:
            with tarfile.open(fileobj=handle, mode="r:*") as tar:
                tar.extractall(folder, filter="data")
        except OSError as exc:
            if exc.errno is None:  # a damaged gzip/bz2/xz stream has no errno; a failed write (ENOSPC, EROFS) has
                raise archive_error(archive, exc) from exc
            raise _CannotWrite(exc.strerror or str(exc)) from exc
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise archive_error(archive, exc) from exc
