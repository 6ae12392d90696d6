"""Issue 14, item 4: training batches cut from a uint8 tensor and augmented per batch equal the per-image
DataLoader path (no augmentation), and crop + flip match torchvision's per-image transforms exactly for the
same draws and statistically for fresh ones."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from oodforge.data.batches import TensorBatches, crop_flip
from oodforge.data.imageset import ImageSet
from oodforge.data.sampling import MixedBatchSampler


def image_set(n: int = 50, channels: int = 3, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet("set", rng.integers(0, 256, (n, 12, 12, channels), dtype=np.uint8), np.arange(n) % 5,
                    [str(c) for c in range(5)])


def test_batches_equal_the_dataloader_without_augmentation():
    images = image_set()
    sampler = MixedBatchSampler(len(images), 8, seed=3)
    ours = list(TensorBatches([images], sampler))
    theirs = list(DataLoader(images.torch_dataset(), batch_sampler=sampler))
    assert len(ours) == len(theirs) == 7
    for (x, y), (x_ref, y_ref) in zip(ours, theirs, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and x.dtype == torch.float32


def test_real_and_synthetic_sets_are_concatenated_like_concat_dataset():
    real, synthetic = image_set(40, seed=1), image_set(30, seed=2)
    sampler = MixedBatchSampler(len(real), 10, len(synthetic), real_ratio=0.8, seed=0)
    for x, y in TensorBatches([real, synthetic], sampler):
        assert x.shape == (10, 3, 12, 12) and len(y) == 10
    index = next(iter(sampler))
    x, _ = next(iter(TensorBatches([real, synthetic], sampler)))
    expected = np.concatenate([real.images, synthetic.images])[index]
    assert torch.equal(x, torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 255)


def test_crop_flip_equals_torchvision_per_image_for_the_same_draws():
    batch = torch.from_numpy(image_set(16).images).permute(0, 3, 1, 2)
    torch.manual_seed(7)
    ours = crop_flip(batch, padding=4)
    torch.manual_seed(7)
    offsets = torch.randint(0, 9, (2, 16))
    flips = torch.rand(16) < 0.5
    for i in range(16):
        padded = TF.pad(batch[i], [4, 4, 4, 4], fill=0)
        crop = TF.crop(padded, int(offsets[0, i]), int(offsets[1, i]), 12, 12)
        assert torch.equal(ours[i], TF.horizontal_flip(crop) if flips[i] else crop)


def marker_positions(augment, trials: int) -> tuple[np.ndarray, np.ndarray]:
    """Where a single bright pixel at (row 5, column 2) of a 12x12 image lands: row shift, column shift."""
    image = torch.zeros(trials, 1, 12, 12, dtype=torch.uint8)
    image[:, 0, 5, 2] = 255
    out = augment(image)
    rows, cols = [], []
    for i in range(trials):
        found = torch.nonzero(out[i, 0])
        if len(found):  # the marker can be cropped away
            rows.append(int(found[0, 0]) - 5)
            cols.append(int(found[0, 1]))
    return np.array(rows), np.array(cols)


def test_crop_flip_statistics_match_torchvision():
    torch.manual_seed(0)
    ours = marker_positions(crop_flip, 4000)
    torchvision = v2.Compose([v2.RandomCrop(12, padding=4), v2.RandomHorizontalFlip()])
    theirs = marker_positions(lambda batch: torch.stack([torchvision(image) for image in batch]), 4000)
    for a, b in zip(ours, theirs, strict=True):
        values = np.union1d(a, b)
        share_a = np.array([(a == v).mean() for v in values])
        share_b = np.array([(b == v).mean() for v in values])
        assert np.abs(share_a - share_b).max() < 0.03  # each shift's frequency within 3 points
    rows = ours[0]
    assert set(np.unique(rows)) == set(range(-4, 5))  # all nine vertical shifts occur
