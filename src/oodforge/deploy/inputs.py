"""What a guard accepts, brought to the model's input: file paths, PIL images, uint8 arrays or tensors, or
already-preprocessed float tensors, singly or in batches, converted as the benchmark converts its images."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from oodforge.data.datasets import _iter_archive, list_files
from oodforge.data.decoding import CorruptImageError, decode_fitted, fit_image
from oodforge.data.imageset import ImageSet
from oodforge.data.streaming import FileImageSet
from oodforge.util.errors import ConfigError, MissingPathError

RESIZE_MODES = ("stretch", "shorter_crop")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs: (H, W, C) size and channels, the resize rule, and float [0, 1] scaling.

    The network normalizes (mean/std) itself, so a preprocessed input is a float (C, H, W) tensor in [0, 1].
    """

    image_shape: tuple[int, int, int]
    resize: str = "stretch"

    def __post_init__(self) -> None:
        if len(self.image_shape) != 3 or min(self.image_shape) < 1 or self.image_shape[2] not in (1, 3):
            raise ConfigError(f"image_shape must be (H, W, C) with C 1 or 3, got {self.image_shape!r}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    def to_dict(self) -> dict:
        """JSON form (the guard artifact stores it)."""
        return {"image_shape": list(self.image_shape), "resize": self.resize}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """The inverse of ``to_dict``."""
        return cls(tuple(int(v) for v in data["image_shape"]), str(data.get("resize", "stretch")))

    def fit_array(self, image: np.ndarray | Image.Image, source: str = "image") -> np.ndarray:
        """A uint8 (H, W, C) array or PIL image brought to the guard's size and channels."""
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.ndim == 3 and array.shape[2] == 1:
                array = array[:, :, 0]
            if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
                raise ConfigError(f"{source}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got "
                                  f"shape {tuple(np.asarray(image).shape)}")
            image = Image.fromarray(array.astype(np.uint8, copy=False))
        if image.mode not in ("L", "RGB"):
            image = image.convert("L" if image.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
        return fit_image(image, self.image_shape, self.resize)

    def as_input(self, arrays: list[np.ndarray]) -> Tensor:
        """Fitted uint8 (H, W, C) arrays -> float (N, C, H, W) in [0, 1]."""
        height, width, channels = self.image_shape
        if not arrays:
            return torch.empty(0, channels, height, width)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class Item:
    """One input on its way to the network: its name, its fitted pixels or the error that stopped it."""

    name: str
    pixels: np.ndarray | Tensor | None = None
    error: str | None = None


def items_of(inputs: object, prep: Preprocessing) -> list[Item]:
    """Every input as an ``Item``: a path (file, folder or archive), a PIL image, a uint8 array/tensor, a float
    tensor already preprocessed ((C, H, W) or (N, C, H, W) in [0, 1]), a list of these, or an oodforge image set
    already in the guard's format."""
    if isinstance(inputs, ImageSet | FileImageSet):
        return [Item(f"{inputs.name}[{i}]", _set_image(inputs, i)) for i in range(len(inputs))]
    if isinstance(inputs, str | Path | Image.Image | np.ndarray | Tensor):
        inputs = [inputs]
    items: list[Item] = []
    for position, value in enumerate(inputs):
        if isinstance(value, str | Path):
            items.extend(Item(name, *_decoded(data, name, prep)) for name, data in iter_path_images(Path(value)))
        elif isinstance(value, Image.Image):
            items.append(Item(f"<image {position}>", prep.fit_array(value, f"image {position}")))
        elif isinstance(value, Tensor | np.ndarray):
            items.extend(_array_items(value, position, prep))
        else:
            raise ConfigError(f"cannot predict on a {type(value).__name__}: give file paths, PIL images, uint8 "
                              "arrays or tensors, or preprocessed float tensors")
    return items


def _set_image(images: ImageSet | FileImageSet, index: int) -> np.ndarray:
    """Image ``index`` of an oodforge image set (already in the benchmark's format), uint8 (H, W, C)."""
    return images.images[index] if isinstance(images, ImageSet) else images.load(index)


def _decoded(data: bytes | str, name: str, prep: Preprocessing) -> tuple[np.ndarray | None, str | None]:
    if isinstance(data, str):
        return None, data
    if not data:
        return None, f"cannot decode image {name}: the file is empty"
    try:
        return decode_fitted(data, name, prep.image_shape, prep.resize), None
    except CorruptImageError as exc:
        return None, str(exc)


def _array_items(value: Tensor | np.ndarray, position: int, prep: Preprocessing) -> list[Item]:
    """Items of one array or tensor: float tensors are taken as preprocessed, uint8 as raw pixels."""
    height, width, channels = prep.image_shape
    if isinstance(value, Tensor) and value.is_floating_point():
        batch = value.unsqueeze(0) if value.dim() == 3 else value
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (channels, height, width):
            raise ConfigError(f"input {position}: a float tensor is taken as preprocessed and must have shape "
                              f"(N, {channels}, {height}, {width}) or ({channels}, {height}, {width}), got "
                              f"{tuple(value.shape)}")
        if not torch.isfinite(batch).all():
            raise ConfigError(f"input {position}: the float tensor holds NaN or infinite values")
        return [Item(f"<tensor {position}[{i}]>", row) for i, row in enumerate(batch.float().cpu())]
    if isinstance(value, Tensor):
        if value.dtype != torch.uint8:
            raise ConfigError(f"input {position}: tensors must be uint8 pixels or float inputs, got {value.dtype}")
        array = value.cpu().numpy()
        array = np.moveaxis(array, -3, -1) if array.ndim >= 3 and array.shape[-3] in (1, 3, 4) else array
    else:
        array = value
        if array.dtype != np.uint8:
            raise ConfigError(f"input {position}: arrays must be uint8 (H, W[, C]) pixels, got {array.dtype}")
    many = array.ndim == 4 or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4))
    rows = list(array) if many else [array]
    return [Item(f"<array {position}[{i}]>" if many else f"<array {position}>",
                 prep.fit_array(row, f"input {position}")) for i, row in enumerate(rows)]


def iter_path_images(path: Path) -> Iterator[tuple[str, bytes | str]]:
    """(name, bytes) of an image file, of every image in a folder, or of every image in an archive, in sorted
    order; a file that cannot be read gives (name, error message) and is reported, not skipped."""
    if path.is_dir():
        for member in list_files(path):
            yield _read(path / member)
    elif path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        for member, data in _iter_archive(path):
            yield f"{path}/{member}", data
    elif path.is_file():
        yield _read(path)
    else:
        raise MissingPathError(f"input not found: {path}")


def _read(path: Path) -> tuple[str, bytes | str]:
    try:
        return str(path), path.read_bytes()
    except OSError as exc:
        return str(path), f"cannot read image {path}: {exc.strerror or exc}"


def check_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The input paths, each checked to exist before any image is read (one ``error:`` naming the first missing)."""
    checked = [Path(p) for p in paths]
    for path in checked:
        if not path.exists():
            raise MissingPathError(f"input not found: {path}")
    return checked


def stream_items(paths: Iterable[str | Path], prep: Preprocessing) -> Iterator[Item]:
    """``items_of`` for paths, one image at a time (folders and archives are never decoded into memory at once)."""
    for path in paths:
        for name, data in iter_path_images(Path(path)):
            yield Item(name, *_decoded(data, name, prep))
