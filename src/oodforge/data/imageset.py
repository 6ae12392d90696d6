"""``ImageSet``: a decoded dataset held in memory as uint8 arrays, and its torch view."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from oodforge.util.errors import ConfigError


@dataclass
class ImageSet:
    """Images as uint8 (N, H, W, C) plus int64 labels (-1 where unlabeled) and class names."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ConfigError(f"{self.name}: images must be uint8 (N, H, W, C), got {self.images.dtype} "
                             f"{self.images.shape}")
        if len(self.labels) != len(self.images):
            raise ConfigError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray, name: str | None = None) -> ImageSet:
        """The images at ``index`` (array of positions or boolean mask)."""
        return ImageSet(name or self.name, self.images[index], self.labels[index], self.classes)

    def balanced_head(self, count: int, name: str | None = None) -> ImageSet:
        """``count`` images taken from the classes in turn, each class in file order, kept in file order.

        Unlike the first ``count`` images this stays class-balanced when the files are sorted by class
        (the CIFAR-10 image-folder copy is); deterministic, and all images when ``count >= len(self)``.
        """
        return self.subset(balanced_index(self.labels, count), name)

    def fingerprint(self) -> str:
        """A short hash of the name, the shape, every pixel of every image, the labels and the class names."""
        digest = hashlib.sha256(f"{self.name}|{self.images.shape}|{self.classes}".encode())
        digest.update(self.item_digests().tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def item_digests(self) -> np.ndarray:
        """One 16-byte hash of each image's pixels, shape (N, 16) uint8 (equal images, equal rows)."""
        return pixel_digests(self.images)

    def torch_dataset(self, transform: Callable[[Tensor], Tensor] | None = None) -> TensorImages:
        """A torch ``Dataset`` yielding (float image in [0, 1] of shape (C, H, W), label)."""
        return TensorImages(self, transform)


def pixel_digests(images: np.ndarray) -> np.ndarray:
    """16 bytes of SHA-256 of each row of ``images`` (any shape with rows first), as (N, 16) uint8."""
    if len(images) == 0:
        return np.zeros((0, 16), np.uint8)
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    view = memoryview(flat.reshape(-1))
    width = flat.shape[1]
    return np.frombuffer(b"".join(hashlib.sha256(view[i * width:(i + 1) * width]).digest()[:16]
                                  for i in range(len(flat))), np.uint8).reshape(len(flat), 16)


def balanced_index(labels: np.ndarray, count: int) -> np.ndarray:
    """Sorted positions of ``count`` items taken from the classes in turn, each class in file order."""
    position = np.arange(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # how many earlier items share the label
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    return np.sort(np.lexsort((position, rank))[:count])


class TensorImages(Dataset):
    """Torch view of an ``ImageSet``; ``transform`` acts on the (C, H, W) float tensor."""

    def __init__(self, images: ImageSet, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = torch.from_numpy(self.images.images[index]).permute(2, 0, 1).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.images.labels[index])
