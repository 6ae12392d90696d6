"""``Benchmark``: an ID dataset plus named near/far OOD sets, converted to the ID image format."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from oodforge.data.datasets import DatasetNotFoundError, load_dataset, overlaps
from oodforge.data.imageset import ImageSet, balanced_index
from oodforge.data.streaming import FileImageSet
from oodforge.util.errors import ConfigError, UnknownNameError

Images = ImageSet | FileImageSet
VAL_HOLDOUT = 1000  # ID validation images held out from the training split when no val.id set is given
VAL_HOLDOUT_SHARE = 0.2  # ... but never more than this share of it, so detectors still fit on most images
VAL_LIMIT = 2000  # validation OOD sets are cut to this many images


def same_source(a: str, b: str) -> bool:
    """Whether two dataset specs can share images (same dataset, known overlap, or nested folders)."""
    if a.startswith("folder:") and b.startswith("folder:"):
        pa, pb = Path(a[7:]).resolve(), Path(b[7:]).resolve()
        return pa == pb or pa in pb.parents or pb in pa.parents
    return overlaps(a, b)




@dataclass(frozen=True)
class Benchmark:
    """An ID dataset, its OOD test sets (name -> "near" | "far"), and its training defaults.

    Built-in benchmarks name registered datasets; a YAML benchmark (``load_benchmark_file``) maps
    its names to dataset specs in ``sources`` (keys ``id:train``, ``id:test`` and the OOD names).
    """

    name: str
    id_dataset: str
    ood: dict[str, str]
    image_shape: tuple[int, int, int]  # (H, W, C)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"  # "none" or "crop_flip"
    default_backbone: str = "small_cnn"
    notes: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None  # class order of a YAML benchmark (default: sorted train folders)
    resize: str = "stretch"  # "stretch" or "shorter_crop" (resize the shorter side, then centre-crop)
    streaming: str = "never"  # folder datasets: "auto", "always" or "never" (decode into memory)
    val: dict = field(default_factory=dict)  # {"id": spec or {"holdout": n}, "ood": {name: {data, split, group}}}
    calibration: str | None = None  # ID images a guard calibrates on (a dataset spec); default: see oodforge.deploy
    path: str | None = None  # the YAML file, if any

    def spec(self, key: str) -> str:
        """The dataset spec behind ``id:train``, ``id:test`` or an OOD name."""
        return self.sources.get(key, self.id_dataset if key.startswith("id:") else key)

    def id_set(self, split: str, root: str | Path | None = None) -> Images:
        """The ID train or test split, in the benchmark's image shape and class order."""
        images = load_dataset(self.spec(f"id:{split}"), split, root, image_shape=self.image_shape,
                              streaming=self.streaming, resize=self.resize)
        images = adapt(images, self.image_shape, self.resize)
        if self.path is None:
            return images
        classes = list(self.classes) if self.classes else (
            images.classes if split == "train" else self.id_set("train", root).classes)
        return relabel(images, classes, self.spec(f"id:{split}"))

    def ood_set(self, name: str, root: str | Path | None = None) -> Images:
        """An OOD test set in the ID image size and channels."""
        if name not in self.ood:
            raise UnknownNameError(f"{name!r} is not an OOD set of benchmark {self.name!r}; its sets: "
                                   f"{sorted(self.ood)}")
        images = load_dataset(self.spec(name), "test", root, image_shape=self.image_shape, streaming=self.streaming,
                              resize=self.resize)
        return adapt(images, self.image_shape, self.resize)

    def calibration_set(self, spec: str | None = None, root: str | Path | None = None) -> Images | None:
        """The guard calibration images of dataset ``spec`` (default: the benchmark's ``calibration`` key), in the
        benchmark's image format and class order; None when neither names one."""
        spec = spec or self.calibration
        if spec is None:
            return None
        images = load_dataset(spec, "test", root, image_shape=self.image_shape, streaming=self.streaming,
                              resize=self.resize)
        classes = list(self.classes) if self.classes else self.id_set("test", root).classes
        return relabel(adapt(images, self.image_shape, self.resize), classes, spec)

    def without_missing_ood(self, root: str | Path | None = None) -> tuple[Benchmark, list[str]]:
        """(this benchmark without the OOD test sets whose files are missing, one message per set dropped).

        Each OOD set is loaded once to find out. Validation OOD sets drawn from a dropped set's dataset
        are dropped too. When every OOD set is missing, the first one's ``DatasetNotFoundError`` is raised.
        """
        missing: dict[str, DatasetNotFoundError] = {}
        for name in self.ood:
            try:
                self.ood_set(name, root)
            except DatasetNotFoundError as exc:
                missing[name] = exc
        if not missing:
            return self, []
        if len(missing) == len(self.ood):
            raise next(iter(missing.values()))
        messages = [f"OOD set {name!r} skipped: {exc}" for name, exc in missing.items()]
        gone = {self.spec(name) for name in missing}
        val_ood = {}
        for name, entry in self.val.get("ood", {}).items():
            if entry["data"] in gone:
                messages.append(f"validation OOD set {name!r} skipped: its dataset {entry['data']!r} is missing")
            else:
                val_ood[name] = entry
        val = {**self.val, "ood": val_ood} if "ood" in self.val else self.val
        return replace(self, ood={n: g for n, g in self.ood.items() if n not in missing}, val=val), messages

    def split_train(self, root: str | Path | None = None) -> tuple[Images, Images]:
        """(images to fit detectors on, ID validation images): a separate ``val.id`` set, or a class-balanced
        hold-out taken from the end of the training split (``holdout_count`` images)."""
        train = self.id_set("train", root)
        held = self.holdout_index(train)
        if held is not None:
            return self.without_holdout(train), train.subset(held, f"{train.name}-val")
        source = self.val["id"]
        images = load_dataset(source, "test", root, image_shape=self.image_shape, streaming=self.streaming,
                              resize=self.resize)
        classes = list(self.classes) if self.classes else train.classes
        return train, relabel(adapt(images, self.image_shape, self.resize), classes, source)

    def val_id_source(self) -> dict | str:
        """The ``val.id`` entry: a dataset spec (a separate set) or ``{"holdout": n}`` (default ``VAL_HOLDOUT``)."""
        return self.val.get("id", {"holdout": VAL_HOLDOUT})

    def holdout_index(self, train: Images) -> np.ndarray | None:
        """Sorted positions in ``train`` (the ID training split) of the images ``split_train`` holds out for ID
        validation: ``holdout_count`` class-balanced images from its end; None with a separate ``val.id`` set."""
        count = self.holdout_count(len(train))
        if count is None:
            return None
        return np.sort(len(train) - 1 - balanced_index(train.labels[::-1], count))

    def without_holdout(self, train: Images) -> Images:
        """``train`` (the ID training split) minus the ID validation hold-out; all of it with a separate ``val.id``."""
        held = self.holdout_index(train)
        return train if held is None else train.subset(np.setdiff1d(np.arange(len(train)), held))

    def holdout_count(self, train_size: int) -> int | None:
        """How many of ``train_size`` training images ``split_train`` holds out for ID validation: the configured
        ``val.id.holdout`` (default ``VAL_HOLDOUT``) but at most ``VAL_HOLDOUT_SHARE`` of them; None with a
        separate ``val.id`` set. A split too small to hold out even one image is one ``ValueError``."""
        source = self.val_id_source()
        if not isinstance(source, dict):
            return None
        count = min(int(source.get("holdout", VAL_HOLDOUT)), int(train_size * VAL_HOLDOUT_SHARE))
        if count < 1:
            raise ConfigError(f"benchmark {self.name!r}: its ID training split has {train_size} images, too few to "
                             f"hold out {VAL_HOLDOUT_SHARE:.0%} of them for validation; give a separate 'val.id' set")
        return count

    def holdout_rule(self) -> str | None:
        """How ``holdout_count`` sizes the hold-out, in words (None with a separate ``val.id`` set)."""
        source = self.val_id_source()
        if not isinstance(source, dict):
            return None
        return f"min({int(source.get('holdout', VAL_HOLDOUT))}, {VAL_HOLDOUT_SHARE:.0%} of the training split)"

    def val_ood_sets(self, root: str | Path | None = None, limit: int = VAL_LIMIT) -> dict[str, Images]:
        """The validation OOD sets (at most ``limit`` evenly spaced images each), in the ID format."""
        self.check_validation()
        sets = {}
        for name, entry in self.val.get("ood", {}).items():
            images = load_dataset(entry["data"], entry.get("split", "test"), root, image_shape=self.image_shape,
                                  streaming=self.streaming, resize=self.resize)
            images = adapt(images, self.image_shape, self.resize)
            if len(images) > limit:
                images = images.subset(np.linspace(0, len(images) - 1, limit).round().astype(int))
            sets[name] = images
        if not sets:
            raise ConfigError(f"benchmark {self.name!r} declares no validation OOD sets (a 'val: ood:' section)")
        return sets

    def check_validation(self) -> None:
        """Refuse validation OOD sets that share images with a test set (same source and split)."""
        tests = [(self.spec(n), "test") for n in self.ood] + [(self.spec("id:test"), "test")]
        for name, entry in self.val.get("ood", {}).items():
            for spec, split in tests:
                if entry.get("split", "test") == split and same_source(entry["data"], spec):
                    raise ConfigError(f"benchmark {self.name!r}: validation OOD set {name!r} ({entry['data']}) "
                                     f"shares images with test set {spec!r}")

    def num_classes(self, root: str | Path | None = None) -> int:
        """How many ID classes the benchmark has."""
        return len(self.classes) if self.classes else len(self.id_set("test", root).classes)

    def train_transform(self) -> v2.Transform | None:
        """Training augmentation on (C, H, W) float tensors."""
        if self.augment == "crop_flip":
            return v2.Compose([v2.RandomCrop(self.image_shape[0], padding=4), v2.RandomHorizontalFlip()])
        return None


def adapt(images: Images, shape: tuple[int, int, int], resize: str = "stretch") -> Images:
    """Images in ``shape`` (H, W, C): converted now (in memory) or on loading (streamed files)."""
    if isinstance(images, FileImageSet):
        return images.reshaped(shape, resize)
    return adapt_images(images, shape, resize=resize)


def relabel(images: Images, classes: list[str], spec: str) -> Images:
    """``images`` with labels re-indexed into ``classes`` by class name (unlabelled images stay -1)."""
    if list(images.classes) == list(classes) or not images.classes:
        return images
    unknown = sorted(set(images.classes) - set(classes))
    if unknown:
        raise ConfigError(f"{spec}: class folders {unknown[:5]} are not among the benchmark's classes {classes[:10]}")
    mapping = np.array([classes.index(c) for c in images.classes], np.int64)
    labels = np.where(images.labels >= 0, mapping[np.clip(images.labels, 0, None)], -1)
    return replace(images, labels=labels, classes=list(classes))


def adapt_images(images: ImageSet, shape: tuple[int, int, int], batch: int = 2048, resize: str = "stretch"
                 ) -> ImageSet:
    """Resize (antialiased bilinear) and convert channels (gray <-> RGB) to ``shape`` = (H, W, C).

    ``resize="shorter_crop"`` scales the shorter side to H and centre-crops instead of stretching.
    """
    height, width, channels = shape
    if images.image_shape == tuple(shape):
        return images
    out = np.empty((len(images), height, width, channels), np.uint8)
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(images.images[start:start + batch]).permute(0, 3, 1, 2)
        if chunk.shape[1] != channels:
            chunk = chunk.expand(-1, 3, -1, -1) if channels == 3 else _luma(chunk)
        if chunk.shape[2:] != (height, width):
            if resize == "shorter_crop":
                chunk = TF.center_crop(TF.resize(chunk, height, antialias=True), [height, width])
            else:
                chunk = TF.resize(chunk, [height, width], antialias=True)
        out[start:start + batch] = chunk.permute(0, 2, 3, 1).numpy()
    return ImageSet(images.name, out, images.labels, images.classes)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of uint8 (N, 3, H, W) images, rounded to uint8 (N, 1, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (rgb.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def holdout_record(benchmark: Benchmark, root: str | Path | None = None, train: Images | None = None) -> dict:
    """Which ID training images ``benchmark`` keeps back for validation: ``{"images", "of_train", "rule",
    "indices_sha256", "source"}`` (``train``: the ID training split, loaded when not given), or ``{"separate":
    spec}`` with a separate ``val.id`` set. The hash is SHA-256 of the sorted positions as int64 little-endian."""
    source = benchmark.val_id_source()
    if not isinstance(source, dict):
        return {"separate": str(source)}
    train = benchmark.id_set("train", root) if train is None else train
    held = benchmark.holdout_index(train)
    return {"images": len(held), "of_train": len(train), "rule": benchmark.holdout_rule(),
            "indices_sha256": hashlib.sha256(held.astype("<i8").tobytes()).hexdigest(),
            "source": benchmark.spec("id:train")}
