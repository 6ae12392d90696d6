"""Training batches cut from one uint8 image tensor on the training device, augmented a whole batch at a time.

For image sets held in memory (CIFAR-10, Fashion-MNIST, synthetic sets) this replaces a DataLoader
whose per-image ``__getitem__`` and torchvision transforms dominate a small network's epoch. The pixels
stay uint8 (N, H, W, C) (a view of the set's array on the CPU; one copy on a GPU); each batch is gathered,
cropped and flipped with tensor ops, then scaled to float [0, 1]. The random draws (crop offsets, flips)
come from the global torch RNG on the CPU, so a run resumes bit-identically (the RNG is checkpointed)
and every device sees the same batches. Statistics equal torchvision's ``RandomCrop(size, padding=p)``
(zero fill) followed by ``RandomHorizontalFlip()``: offsets uniform in [0, 2p], flips with probability 1/2.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from oodforge.data.imageset import ImageSet
from oodforge.util.errors import ConfigError

AUGMENTATIONS = (None, "crop_flip")


def crop_flip(images: Tensor, padding: int = 4) -> Tensor:
    """Random ``padding``-padded crops (zero fill) and horizontal flips of a (B, C, H, W) batch, any dtype."""
    batch, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch))
    flips = torch.rand(batch) < 0.5
    rows = offsets[0, :, None] + torch.arange(height)  # (B, H) rows of the padded image
    cols = offsets[1, :, None] + torch.arange(width)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    return padded[torch.arange(batch, device=device)[:, None, None, None],
                  torch.arange(channels, device=device)[None, :, None, None],
                  rows.to(device)[:, None, :, None], cols.to(device)[:, None, None, :]]


class TensorBatches:
    """(x, y) for each index batch of ``sampler`` over the concatenated ``sets``: x float (B, C, H, W) in
    [0, 1] on ``device``, y int64 labels; ``augment`` is None or ``"crop_flip"`` (padding ``padding``)."""

    def __init__(self, sets: list[ImageSet], sampler: Iterable[list[int]], device: torch.device | str = "cpu",
                 augment: str | None = None, padding: int = 4, channels_last: bool = False) -> None:
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        arrays = [s.images for s in sets]
        pixels = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        self.device = torch.device(device)
        self.pixels = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)  # uint8 (N, H, W, C)
        self.labels = torch.from_numpy(np.concatenate([np.asarray(s.labels, np.int64) for s in sets]))
        self.sampler, self.augment, self.padding, self.channels_last = sampler, augment, padding, channels_last

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.sampler:
            index = torch.as_tensor(batch, dtype=torch.long)
            x = self.pixels[index.to(self.device)].permute(0, 3, 1, 2)
            if self.augment == "crop_flip":
                x = crop_flip(x, self.padding)
            x = x.float().div_(255.0)
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield x, self.labels[index].to(self.device)
