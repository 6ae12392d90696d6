"""Canvas detection benchmarks: settings, the registry, and canvases made on the fly from real image sets.

A canvas is a crop of a background image (default: a DTD texture) with 1-5 objects pasted on it (see
``oodforge.data.canvas``). Splits and where their pixels come from:

=================  ==========================  =======================================  ===========
split              objects                     object images from                       backgrounds
=================  ==========================  =======================================  ===========
``train``          ID only                     ID train split, positions i % 6 != 5     train part
``val``            ID only                     ID train split, positions i % 6 == 5     train part
``test_id``        ID only                     ID test split                            test part
``test_ood``       OOD only                    OOD sources' test splits                 test part
``test_mixed``     ID and OOD (at least one    ID and OOD test splits                   test part
                   of each)
``train_outliers`` ID and training outliers    ID as ``train``; outlier sources' train  train part
                   (at least one of each)      splits
=================  ==========================  =======================================  ===========

The background images at positions i % 5 == 4 form the test part, the others the train part. Canvas ``index`` of
``split`` under ``seed`` is drawn from its own random stream, so a canvas is the same whether it is made alone,
in a dataset or written to disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from oodforge.data.canvas import Canvas, ObjectImage, background_crop, compose
from oodforge.data.datasets import load_dataset, overlaps
from oodforge.data.detection import DetectionDataset, DetectionRecord, Transform
from oodforge.data.imageset import ImageSet
from oodforge.util.errors import ConfigError
from oodforge.util.registry import Registry

SPLITS = ("train", "val", "test_id", "test_ood", "test_mixed", "train_outliers")
VAL_EVERY = 6  # ID training images at positions i % 6 == 5 make the val canvases, the others the train canvases
TEST_BACKGROUND_EVERY = 5  # background images at positions i % 5 == 4 are used by test canvases only
LAYOUT_TRIES = 10  # layouts tried for a canvas that must hold both kinds of object before giving up
DEFAULT_COUNTS = {"train": 2000, "val": 500, "test_id": 500, "test_ood": 500, "test_mixed": 500,
                  "train_outliers": 1000}


@dataclass(frozen=True)
class SplitPlan:
    """What a split's canvases hold: ``kind`` (id, ood or mixed), the part of the ID source they draw from (fit,
    holdout or test), the role of their other objects (ood, outliers or none) and their background part."""

    kind: str
    id_part: str
    others: str
    backgrounds: str


PLANS = {
    "train": SplitPlan("id", "fit", "", "train"),
    "val": SplitPlan("id", "holdout", "", "train"),
    "test_id": SplitPlan("id", "test", "", "test"),
    "test_ood": SplitPlan("ood", "", "ood", "test"),
    "test_mixed": SplitPlan("mixed", "test", "ood", "test"),
    "train_outliers": SplitPlan("mixed", "fit", "outliers", "train"),
}


@dataclass(frozen=True)
class CanvasBenchmark:
    """A canvas detection benchmark: its object sources (registered dataset names) and canvas settings.

    ``size``: canvas side in pixels; ``objects``: (fewest, most) objects per canvas; ``scale``: range of an
    object's side as a fraction of ``size``; ``max_overlap``: the largest IoU between two objects' pasted squares;
    ``counts``: canvases per split (splits left out get ``DEFAULT_COUNTS``).
    """

    name: str
    id_source: str = "mnist"
    ood_sources: tuple[str, ...] = ("notmnist", "fashion_mnist")
    outlier_sources: tuple[str, ...] = ("cifar10",)
    background: str = "dtd"
    size: int = 128
    objects: tuple[int, int] = (1, 5)
    scale: tuple[float, float] = (0.15, 0.4)
    max_overlap: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ood_sources", tuple(self.ood_sources))
        object.__setattr__(self, "outlier_sources", tuple(self.outlier_sources))
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        unknown = sorted(set(self.counts) - set(SPLITS))
        if unknown:
            raise ConfigError(f"{self.name}: unknown split {unknown[0]!r} in counts; splits: {', '.join(SPLITS)}")
        object.__setattr__(self, "counts", {**DEFAULT_COUNTS, **self.counts})
        _check_settings(self)
        _check_sources(self)

    def with_options(self, **options: object) -> CanvasBenchmark:
        """A copy with some settings changed (``counts`` entries are merged into the current ones)."""
        if "counts" in options:
            options["counts"] = {**self.counts, **dict(options["counts"])}  # type: ignore[arg-type]
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            raise ConfigError(f"{self.name}: unknown option {unknown[0]!r}; options: {', '.join(self.options())}")
        return replace(self, **options)

    def options(self) -> dict:
        """The settings as a JSON-ready dict."""
        settings = asdict(self)
        for key in ("ood_sources", "outlier_sources", "objects", "scale"):
            settings[key] = list(settings[key])
        return settings

    def dataset(self, split: str, seed: int = 0, root: str | Path | None = None,
                transforms: Transform | None = None) -> CanvasDataset:
        """The canvases of ``split``, made on the fly as items are read."""
        return CanvasDataset(CanvasMaker(self, root), split, seed, transforms)


def _check_settings(bench: CanvasBenchmark) -> None:
    """Each setting in its range; errors name the benchmark and the setting."""
    low, high = bench.objects
    if not (isinstance(bench.size, int) and bench.size >= 16):
        raise ConfigError(f"{bench.name}: size must be an integer of at least 16 pixels, got {bench.size!r}")
    if len(bench.objects) != 2 or not all(isinstance(n, int) for n in bench.objects) or not 1 <= low <= high:
        raise ConfigError(f"{bench.name}: objects must be (fewest, most) with 1 <= fewest <= most, got "
                          f"{bench.objects!r}")
    if len(bench.scale) != 2 or not 0 < bench.scale[0] <= bench.scale[1] <= 1:
        raise ConfigError(f"{bench.name}: scale must be (low, high) with 0 < low <= high <= 1, got {bench.scale!r}")
    if not 0 <= bench.max_overlap < 1:
        raise ConfigError(f"{bench.name}: max_overlap must be in [0, 1), got {bench.max_overlap!r}")
    bad = [split for split, count in bench.counts.items() if not (isinstance(count, int) and count >= 0)]
    if bad:
        raise ConfigError(f"{bench.name}: counts[{bad[0]!r}] must be a non-negative integer, got "
                          f"{bench.counts[bad[0]]!r}")


def _check_sources(bench: CanvasBenchmark) -> None:
    """ID, OOD and outlier sources and the background share no images."""
    if not bench.ood_sources or not bench.outlier_sources:
        raise ConfigError(f"{bench.name}: name at least one OOD source and one outlier source")
    roles = [("ID source", bench.id_source), ("background", bench.background)]
    roles += [("OOD source", name) for name in bench.ood_sources]
    roles += [("outlier source", name) for name in bench.outlier_sources]
    for i, (role_a, a) in enumerate(roles):
        for role_b, b in roles[i + 1:]:
            if overlaps(a, b) or overlaps(b, a):
                raise ConfigError(f"{bench.name}: {role_a} {a!r} and {role_b} {b!r} share images; each source "
                                  "must be used in one role only")


@dataclass
class Pool:
    """Object images of one source: the set, the positions that may be drawn, and the category of its items:
    ``category_id`` for all of them, or (when None) 1 + the item's label."""

    name: str
    split: str
    images: ImageSet
    positions: np.ndarray
    category_id: int | None = None

    def category(self, label: int) -> int:
        """The category id of an item with ``label``."""
        return self.category_id if self.category_id is not None else int(label) + 1


class CanvasMaker:
    """Makes the canvases of a benchmark from its sources under ``root`` (``$OODFORGE_DATA`` by default)."""

    def __init__(self, bench: CanvasBenchmark, root: str | Path | None = None) -> None:
        self.bench = bench
        self.root = root
        self._sets: dict[tuple[str, str], ImageSet] = {}
        self._categories: list[dict] | None = None
        self._pools: dict[str, list[Pool]] = {}

    def source(self, name: str, split: str, role: str) -> ImageSet:
        """A source dataset's split (loaded once); a source without that split names its role."""
        if (name, split) not in self._sets:
            try:
                images = load_dataset(name, split, self.root)
            except ConfigError as exc:
                raise ConfigError(f"{self.bench.name}: {role} {name!r}: {exc}") from None
            if not isinstance(images, ImageSet):
                raise ConfigError(f"{self.bench.name}: {role} {name!r} must be an in-memory dataset")
            self._sets[name, split] = images
        return self._sets[name, split]

    @property
    def categories(self) -> list[dict]:
        """COCO categories: the ID classes (ids 1..K), then one ``ood/<source>`` per OOD and outlier source."""
        if self._categories is None:
            bench = self.bench
            classes = self.source(bench.id_source, "train", "ID source").classes
            if not classes:
                raise ConfigError(f"{bench.name}: ID source {bench.id_source!r} has no class names")
            categories = [{"id": i + 1, "name": str(name), "supercategory": bench.id_source, "ood": False,
                           "source": bench.id_source} for i, name in enumerate(classes)]
            for role, names in (("ood", bench.ood_sources), ("outlier", bench.outlier_sources)):
                categories += [{"id": len(categories) + 1 + i, "name": f"ood/{name}", "supercategory": "ood",
                                "ood": True, "source": name, "role": role} for i, name in enumerate(names)]
            self._categories = categories
        return self._categories

    def _category_id(self, source: str) -> int:
        return next(c["id"] for c in self.categories if c["ood"] and c["source"] == source)

    def id_pool(self, part: str) -> Pool:
        """The ID objects of ``part``: fit (train split less the val positions), holdout (those) or test."""
        name = self.bench.id_source
        split = "test" if part == "test" else "train"
        images = self.source(name, split, "ID source")
        everything = np.arange(len(images))
        positions = {"fit": everything[everything % VAL_EVERY != VAL_EVERY - 1],
                     "holdout": everything[everything % VAL_EVERY == VAL_EVERY - 1], "test": everything}[part]
        return Pool(name, split, images, positions)

    def other_pools(self, role: str) -> list[Pool]:
        """The OOD (test splits) or training-outlier (train splits) object pools."""
        names, split = (self.bench.ood_sources, "test") if role == "ood" else (self.bench.outlier_sources, "train")
        pools = []
        for name in names:
            images = self.source(name, split, "OOD source" if role == "ood" else "outlier source")
            pools.append(Pool(name, split, images, np.arange(len(images)), self._category_id(name)))
        return pools

    def backgrounds(self, part: str) -> tuple[ImageSet, np.ndarray]:
        """The background images and the positions of the train or test part."""
        images = self.source(self.bench.background, "test", "background")
        everything = np.arange(len(images))
        is_test = everything % TEST_BACKGROUND_EVERY == TEST_BACKGROUND_EVERY - 1
        positions = everything[is_test] if part == "test" else everything[~is_test]
        if len(positions) == 0:
            raise ConfigError(f"{self.bench.name}: background {self.bench.background!r} has too few images")
        return images, positions

    def make(self, split: str, seed: int, index: int) -> Canvas:
        """Canvas ``index`` of ``split`` under ``seed``."""
        if split not in PLANS:
            raise ConfigError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        plan, bench = PLANS[split], self.bench
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        images, positions = self.backgrounds(plan.backgrounds)
        background = background_crop(images.images[positions[rng.integers(len(positions))]], bench.size, rng)
        id_pools = self._pools_of("id", plan.id_part)
        other_pools = self._pools_of("other", plan.others)
        for _ in range(LAYOUT_TRIES):
            count = int(rng.integers(bench.objects[0], bench.objects[1] + 1))
            roles = self._roles(plan.kind, count, rng)
            draws = [partial(draw_object, id_pools if role == "id" else other_pools) for role in roles]
            canvas = compose(background, draws, bench.scale, bench.max_overlap, rng)
            placed = {roles[slot] for slot in canvas.slots}
            if plan.kind != "mixed" or placed == {"id", "other"}:
                return canvas
        raise ConfigError(f"{bench.name}: objects of scale {bench.scale} do not fit on {bench.size}x{bench.size} "
                          f"canvases with max_overlap {bench.max_overlap}; lower the scale or raise the size")

    def _pools_of(self, role: str, part: str) -> list[Pool]:
        """The ID pool of ``part`` or the other pools of role ``part`` (none when ``part`` is empty), built once."""
        key = f"{role}:{part}"
        if key not in self._pools:
            if not part:
                self._pools[key] = []
            else:
                self._pools[key] = [self.id_pool(part)] if role == "id" else self.other_pools(part)
        return self._pools[key]

    @staticmethod
    def _roles(kind: str, count: int, rng: np.random.Generator) -> list[str]:
        """The role of each object: all id, all other, or (mixed) one of each then each at random."""
        if kind != "mixed":
            return ["id" if kind == "id" else "other"] * count
        return ["id", "other"] + ["id" if rng.random() < 0.5 else "other" for _ in range(max(0, count - 2))]


def draw_object(pools: list[Pool], rng: np.random.Generator) -> ObjectImage:
    """A random object image from a random one of ``pools``, with its category and origin."""
    pool = pools[int(rng.integers(len(pools)))]
    position = int(pool.positions[rng.integers(len(pool.positions))])
    label = int(pool.images.labels[position])
    origin = {"source": pool.name, "source_split": pool.split, "source_index": position, "source_label": label}
    return ObjectImage(pool.images.images[position], pool.category(label), origin)


class CanvasDataset(DetectionDataset):
    """The canvases of one split, made on the fly; equal, pixel for pixel, to the ones written to disk."""

    def __init__(self, maker: CanvasMaker, split: str, seed: int = 0, transforms: Transform | None = None) -> None:
        if split not in PLANS:
            raise ConfigError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        self.maker, self.split, self.seed, self.transforms = maker, split, seed, transforms
        self.count = maker.bench.counts[split]

    @property
    def categories(self) -> list[dict]:  # type: ignore[override]
        """The benchmark's COCO categories."""
        return self.maker.categories

    def __len__(self) -> int:
        return self.count

    def canvas(self, index: int) -> Canvas:
        """Canvas ``index`` with its per-object origins and alpha masks."""
        return self.maker.make(self.split, self.seed, index)

    def record(self, index: int) -> DetectionRecord:
        """Canvas ``index`` as image, boxes and category ids (image id = index + 1, as on disk)."""
        canvas = self.canvas(index)
        return DetectionRecord(canvas.image, canvas.boxes.astype(np.float64), canvas.category_ids, index + 1)


DETECTION_BENCHMARKS: Registry[CanvasBenchmark] = Registry("detection benchmark")


def _register(bench: CanvasBenchmark) -> None:
    DETECTION_BENCHMARKS.register(bench.name)(lambda: bench)


_register(CanvasBenchmark("mnist_canvas", description="MNIST digits on DTD textures; OOD: notMNIST letters and "
                                                      "Fashion-MNIST items; training outliers: CIFAR-10 patches"))
_register(CanvasBenchmark("fashion_canvas", id_source="fashion_mnist", ood_sources=("notmnist", "mnist"),
                          description="Fashion-MNIST items on DTD textures; OOD: notMNIST letters and MNIST digits; "
                                      "training outliers: CIFAR-10 patches"))


def get_detection_benchmark(name: str, **options: object) -> CanvasBenchmark:
    """The detection benchmark registered as ``name``, with ``options`` (settings of ``CanvasBenchmark``) changed."""
    bench = DETECTION_BENCHMARKS.create(name)
    return bench.with_options(**options) if options else bench
