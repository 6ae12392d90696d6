"""Generated image sets on disk: ``images.npy``, ``labels.npy``, extras, ``manifest.json``, ``grid.png``.

Layout of a synthetic set folder::

    images.npy      uint8 (N, H, W, C)
    labels.npy      int64 (N,); -1 for outliers (interpolated sets)
    pairs.npy       int64 (N, 2), optional: the class pair (i, j) of each interpolated image
    alphas.npy      float (N,), optional: the weight a of class i in e = a*e_i + (1-a)*e_j
    manifest.json   kind ("id" | "interpolated"), model_hash, seed, guidance, steps, alpha_range,
                    count, classes, image_shape, extras, created_by, ...
    grid.png        a few images per class (ID sets) or per class pair (interpolated sets)

``manifest.json`` is written last, so a folder without it is an unfinished write. A new set is written into
a hidden folder beside the target (``.<name>.new-<host>-<pid>-*``) and swapped in whole, so re-sampling into an
existing set never loses it: a kill leaves either the earlier set or the new one (``recover_synthetic``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oodforge.data.imageset import ImageSet
from oodforge.util.atomic import atomic_json, atomic_write, current_umask, process_tag, tag_owner, writer_gone
from oodforge.util.errors import ConfigError, DataError

FORMAT = "oodforge-synthetic"
KINDS = ("id", "interpolated")
MANIFEST = "manifest.json"
GRID = "grid.png"


class SyntheticSetError(DataError, RuntimeError):
    """A synthetic set folder that is missing, incomplete or inconsistent."""


@dataclass
class SyntheticSet(ImageSet):
    """An ``ImageSet`` produced by a generator, with its manifest and per-image extras (pairs, alphas)."""

    manifest: dict = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_extra(self.extra, len(self.images), self.name)


def write_synthetic(
    path: str | Path,
    images: ImageSet,
    manifest: dict,
    extra: dict[str, np.ndarray] | None = None,
    grid: bool = True,
) -> Path:
    """Write ``images`` with ``manifest`` (needs ``kind``) and optional per-image ``extra`` arrays."""
    folder = Path(path)
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"manifest['kind'] must be one of {KINDS}, got {kind!r}")
    extra = dict(extra or {})
    _check_extra(extra, len(images), str(folder))
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a synthetic set folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_synthetic(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-{process_tag()}-", dir=folder.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; a set folder follows the umask
        np.save(staging / "images.npy", np.ascontiguousarray(images.images, dtype=np.uint8))
        np.save(staging / "labels.npy", np.asarray(images.labels, dtype=np.int64))
        for key, array in extra.items():
            np.save(staging / f"{key}.npy", np.asarray(array))
        if grid:
            sample_grid(images, staging / GRID, pairs=extra.get("pairs"), alphas=extra.get("alphas"))
        full = {
            **manifest,
            "format": FORMAT,
            "count": len(images),
            "classes": list(images.classes),
            "image_shape": list(images.image_shape),
            "extras": sorted(extra),
            "created_by": f"oodforge {_version()}",
        }
        atomic_json(full, staging / MANIFEST)  # last: a staging folder with a manifest is complete
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, folder)
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Put the complete set ``staging`` at ``folder``; the earlier set stays until the new one is in place."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{staging.name.rsplit('.new-', 1)[1]}")
        os.rename(folder, old)  # a kill here: recover_synthetic moves the complete new set in
        os.rename(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, folder)


def recover_synthetic(folder: str | Path) -> None:
    """Finish or undo a ``write_synthetic`` that a kill interrupted, so ``folder`` holds one whole set.

    A missing ``folder`` gets the newest complete new set (with a manifest) or else the earlier set back;
    leftover earlier sets are deleted once ``folder`` exists, as are unfinished new sets of dead writers.
    """
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return
    new = sorted(parent.glob(f".{glob.escape(folder.name)}.new-*"), key=lambda p: p.stat().st_mtime)
    old = sorted(parent.glob(f".{glob.escape(folder.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if not folder.exists():
        complete = [p for p in new if (p / MANIFEST).is_file()]
        if complete:
            os.rename(complete[-1], folder)
        elif old:
            os.rename(old[-1], folder)
    for leftover in old:
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
    for unfinished in new:  # .<name>.new-<host>-<pid>-<random>
        if unfinished.exists() and writer_gone(*tag_owner(unfinished.name.rsplit(".new-", 1)[1].rpartition("-")[0])):
            shutil.rmtree(unfinished, ignore_errors=True)


def load_synthetic(path: str | Path) -> SyntheticSet:
    """Read a folder written by ``write_synthetic``; any problem raises ``SyntheticSetError`` naming it."""
    folder = Path(path)
    try:
        recover_synthetic(folder)  # a re-sampling that a kill interrupted
    except OSError:
        pass  # a read-only location: read what is there
    if not folder.is_dir():
        raise SyntheticSetError(f"synthetic set folder not found: {folder}")
    manifest = _read_manifest(folder)
    images = _read_array(folder, "images.npy")
    labels = _read_array(folder, "labels.npy")
    extra = {key: _read_array(folder, f"{key}.npy") for key in manifest.get("extras", [])}
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != manifest.get("count"):
        raise SyntheticSetError(
            f"{folder}: images.npy is {images.dtype} {images.shape}, manifest says "
            f"{manifest.get('count')} uint8 (N, H, W, C) images"
        )
    try:
        return SyntheticSet(folder.name, images, labels.astype(np.int64), list(manifest.get("classes", [])),
                            manifest, extra)
    except ValueError as exc:
        raise SyntheticSetError(f"{folder}: {exc}") from exc


def sample_grid(
    images: ImageSet,
    path: str | Path,
    rows_by: str = "auto",
    pairs: np.ndarray | None = None,
    alphas: np.ndarray | None = None,
    columns: int = 8,
    max_rows: int = 12,
) -> Path:
    """PNG grid of ``columns`` images per row; rows are classes (``"label"``) or class pairs (``"pair"``).

    ``"auto"`` picks ``"pair"`` when pairs are given (or held in a ``SyntheticSet``'s extras). With more
    pairs than ``max_rows``, the rows are spread evenly over the sorted pairs; images in a pair row are
    sorted by the weight of the lower-numbered class, from high to low.
    """
    extra = getattr(images, "extra", {})
    pairs = extra.get("pairs") if pairs is None else pairs
    alphas = extra.get("alphas") if alphas is None else alphas
    if rows_by == "auto":
        rows_by = "pair" if pairs is not None else "label"
    if rows_by == "label":
        rows = _rows_by_label(images, columns, max_rows)
    elif rows_by == "pair":
        if pairs is None:
            raise ConfigError("rows_by='pair' needs the class pairs (pairs=... or a SyntheticSet with pairs)")
        rows = _rows_by_pair(images, np.asarray(pairs), alphas, columns, max_rows)
    else:
        raise ConfigError(f"rows_by must be 'auto', 'label' or 'pair', got {rows_by!r}")
    return _draw_grid(images.images, rows, Path(path))


def _rows_by_label(images: ImageSet, columns: int, max_rows: int) -> list[tuple[str, np.ndarray]]:
    rows = []
    for label in np.unique(images.labels)[:max_rows]:
        index = np.flatnonzero(images.labels == label)[:columns]
        rows.append((_class_name(images.classes, int(label)), index))
    return rows


def _rows_by_pair(
    images: ImageSet, pairs: np.ndarray, alphas: np.ndarray | None, columns: int, max_rows: int
) -> list[tuple[str, np.ndarray]]:
    if pairs.shape != (len(images), 2):
        raise ConfigError(f"pairs must have shape ({len(images)}, 2), got {pairs.shape}")
    low, high = pairs.min(axis=1), pairs.max(axis=1)
    weight_low = None
    if alphas is not None:
        weight_low = np.where(pairs[:, 0] == low, alphas, 1.0 - np.asarray(alphas))
    keys = sorted(set(zip(low.tolist(), high.tolist(), strict=True)))
    if len(keys) > max_rows:  # spread the rows over all pairs rather than the first few
        keys = [keys[k] for k in np.unique(np.linspace(0, len(keys) - 1, max_rows).round().astype(int))]
    rows = []
    for i, j in keys:
        index = np.flatnonzero((low == i) & (high == j))[:columns]
        if weight_low is not None:
            index = index[np.argsort(-weight_low[index], kind="stable")]
        rows.append((f"{_class_name(images.classes, i)} / {_class_name(images.classes, j)}", index))
    return rows


def _draw_grid(pixels: np.ndarray, rows: list[tuple[str, np.ndarray]], path: Path) -> Path:
    if not rows:
        raise ConfigError(f"no images to draw in {path}")
    height, width, channels = pixels.shape[1:]
    columns = max(1, max(len(index) for _, index in rows))
    pad = 2
    mosaic = np.full((len(rows) * (height + pad), columns * (width + pad), channels), 255, np.uint8)
    for r, (_, index) in enumerate(rows):
        for c, i in enumerate(index):
            y, x = r * (height + pad), c * (width + pad)
            mosaic[y : y + height, x : x + width] = pixels[i]
    scale = 0.9 / 28
    figure = Figure(figsize=(1.6 + columns * (width + pad) * scale, 0.3 + len(rows) * (height + pad) * scale))
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    image = mosaic[..., 0] if channels == 1 else mosaic
    axes.imshow(image, cmap="gray" if channels == 1 else None, vmin=0, vmax=255, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([r * (height + pad) + height / 2 for r in range(len(rows))], [name for name, _ in rows])
    axes.tick_params(length=0, labelsize=8)
    for spine in axes.spines.values():
        spine.set_visible(False)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def _class_name(classes: list[str], label: int) -> str:
    return classes[label] if 0 <= label < len(classes) else str(label)


def _check_extra(extra: dict[str, np.ndarray], count: int, where: str) -> None:
    for key, array in extra.items():
        if not key.isidentifier() or key in ("images", "labels"):
            raise ConfigError(f"{where}: extra array name {key!r} is not allowed")
        if len(array) != count:
            raise ConfigError(f"{where}: extra {key!r} has {len(array)} rows for {count} images")


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise SyntheticSetError(f"{folder} has no {MANIFEST} (not a synthetic set, or its write was cut off)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SyntheticSetError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SyntheticSetError(f"{path} is not an {FORMAT} manifest")
    return manifest


def _read_array(folder: Path, name: str) -> np.ndarray:
    try:
        return np.load(folder / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SyntheticSetError(f"cannot read {folder / name}: {exc}") from exc


def _version() -> str:
    try:
        return metadata.version("oodforge")
    except metadata.PackageNotFoundError:
        return "unknown"
