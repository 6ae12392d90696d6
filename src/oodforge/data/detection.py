"""Detection datasets: images with boxes, in the (image, target) form torchvision's detection models take.

An item is ``(image, target)``: ``image`` a float tensor (3, H, W) in [0, 1]; ``target`` a dict with ``boxes``
(N, 4) float32 ``x0, y0, x1, y1`` in pixels, ``labels`` (N,) int64, ``image_id`` (int) and ``ood`` (N,) bool,
True for objects of a category marked ``"ood": true``. Labels number the categories 1..K in the order of their
COCO ids (0 is the background class of torchvision's detectors); for categories with ids 1..K, label = id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

Target = dict[str, Tensor | int]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]


@dataclass
class DetectionRecord:
    """One image: uint8 (H, W, 3) pixels, float (N, 4) xyxy boxes, int (N,) COCO category ids, and its image id."""

    image: np.ndarray
    boxes: np.ndarray
    category_ids: np.ndarray
    image_id: int


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, w, h]`` boxes (N, 4) as ``[x0, y0, x1, y1]``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``[x0, y0, x1, y1]`` boxes (N, 4) as COCO ``[x, y, w, h]``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


class DetectionDataset(Dataset):
    """Base of the detection datasets: subclasses give ``categories`` (COCO dicts), ``__len__`` and ``record``."""

    categories: list[dict]
    transforms: Transform | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int) -> DetectionRecord:
        """The image, boxes and category ids of item ``index``."""
        raise NotImplementedError

    @property
    def classes(self) -> list[str]:
        """Category names by label: ``classes[label]``, with ``"__background__"`` at 0."""
        ordered = sorted(self.categories, key=lambda category: category["id"])
        return ["__background__"] + [str(category["name"]) for category in ordered]

    @property
    def ood_category_ids(self) -> set[int]:
        """The ids of the categories marked ``"ood": true``."""
        return {int(category["id"]) for category in self.categories if category.get("ood", False)}

    def labels_of(self, category_ids: np.ndarray) -> np.ndarray:
        """Labels (1..K in the order of the category ids) of an array of COCO category ids."""
        ids = np.asarray(sorted(int(category["id"]) for category in self.categories), np.int64)
        return np.searchsorted(ids, np.asarray(category_ids, np.int64)) + 1

    def target(self, record: DetectionRecord) -> Target:
        """The torchvision-style target dict of a record."""
        ood = np.isin(record.category_ids, sorted(self.ood_category_ids))
        return {"boxes": torch.as_tensor(np.asarray(record.boxes, np.float32).reshape(-1, 4)),
                "labels": torch.as_tensor(self.labels_of(record.category_ids), dtype=torch.int64),
                "image_id": int(record.image_id),
                "ood": torch.as_tensor(ood, dtype=torch.bool)}

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        record = self.record(index)
        image = torch.from_numpy(np.ascontiguousarray(record.image)).permute(2, 0, 1).float().div_(255.0)
        target = self.target(record)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_detection(batch: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """A ``DataLoader`` ``collate_fn`` for detection: (list of images, list of targets), as the models take them."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)
