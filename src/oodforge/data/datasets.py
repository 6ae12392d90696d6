"""Dataset registry: ``name -> ImageSet`` read from ``$OODFORGE_DATA`` with the field's own loaders.

Every factory has the signature ``factory(root: Path, split: str, image_shape=None) -> ImageSet``.
Decoded archives and folders are cached as ``.npy`` under ``$OODFORGE_CACHE`` (default
``~/.cache/oodforge``) so a second run does not decode again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tarfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torchvision
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from oodforge.data.decoding import CorruptImageError, archive_error, decode_fitted, decode_image
from oodforge.data.imageset import ImageSet
from oodforge.data.manifest import cache_root
from oodforge.data.streaming import FileImageSet, unpack_tar
from oodforge.util.atomic import atomic_json, atomic_npy, remove_stale_temp_files
from oodforge.util.errors import ConfigError, MissingPathError
from oodforge.util.registry import Registry

DATASETS: Registry[ImageSet] = Registry("dataset")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SPLITS = ("train", "test")


class DatasetNotFoundError(MissingPathError):
    """A dataset's files are not where oodforge looked for them."""

    def __init__(self, name: str, folder: Path, detail: str = "", hint: bool = True) -> None:
        hint = "; set OODFORGE_DATA to the folder that holds it" if hint else ""
        super().__init__(f"dataset {name!r} not found in {folder}{': ' + detail if detail else ''}{hint}")


def data_root() -> Path:
    """``$OODFORGE_DATA``, else ``./data``."""
    return Path(os.environ.get("OODFORGE_DATA", "data")).expanduser()


STREAMING_MODES = ("auto", "always", "never")
STREAM_BYTES = 512 << 20  # auto mode streams folders and archives that would take more than this decoded
STREAM_COUNT = 100_000  # ... or that hold more images than this


def load_dataset(spec: str, split: str = "test", root: str | Path | None = None,
                 image_shape: tuple[int, int, int] | None = None, streaming: str = "auto",
                 resize: str = "stretch") -> ImageSet | FileImageSet:
    """Load a registered dataset, ``folder:<dir or .tar.gz/.zip[/inner/dir]>`` or ``synthetic:<dir>``.

    ``image_shape`` (H, W, C) is used by generated sets (noise) to match the ID images, and by folder
    specs, whose images are brought to it (``resize``: ``stretch`` or ``shorter_crop``) one by one as
    they are decoded. Folder specs are decoded into memory, or streamed from disk (``FileImageSet``)
    when ``streaming`` is ``always``, or ``auto`` and the images are many or large (``STREAM_BYTES``,
    ``STREAM_COUNT``).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if streaming not in STREAMING_MODES:
        raise ConfigError(f"streaming must be one of {STREAMING_MODES}, got {streaming!r}")
    if spec.startswith("folder:"):
        return image_folder(Path(spec.split(":", 1)[1]).expanduser(), name=spec, streaming=streaming,
                            shape=image_shape, resize=resize)
    if spec.startswith("synthetic:"):
        from oodforge.data.synthetic import load_synthetic

        return load_synthetic(Path(spec.split(":", 1)[1]))
    root = Path(root) if root is not None else data_root()
    return DATASETS.get(spec)(root=root, split=split, image_shape=image_shape)


# ---------------------------------------------------------------- decoding and caching


def _iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) of the image files in a .tar(.gz) or .zip archive, sorted by name."""
    return ((name, data) for name, data in sorted(_iter_all(path)) if is_image_name(name))


def _iter_all(path: Path) -> Iterator[tuple[str, bytes]]:
    """Every file of a folder, .zip or .tar(.gz) archive; tar archives are streamed in stored order."""
    if path.is_dir():
        for member in list_files(path, images_only=False):
            yield member, (path / member).read_bytes()
        return
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith("/"):
                    yield name, archive.read(name)
        return
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if member.isfile():
                    yield member.name, archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise archive_error(path, exc) from exc


def is_image_name(name: str) -> bool:
    """Whether a file or archive member name is an image by its suffix (macOS AppleDouble ``._*`` files are not)."""
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith("._")


def list_files(folder: Path, images_only: bool = True) -> list[str]:
    """Relative paths of the (image) files below ``folder``, sorted: the one listing in-memory and streamed sets use.

    Symlinked files and folders are followed, as torchvision's ImageFolder does; each real folder is
    read once, under its own name when it lies inside ``folder``, so a link to a folder read already (a
    loop among them) is skipped. Dangling or looping links, folders named like images and macOS
    AppleDouble files (``._*``) are skipped.
    """
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    pending, linked = [(folder, "")], []  # linked folders wait until every real one is read, so real names win
    while pending or linked:
        current, relative = pending.pop() if pending else linked.pop(0)
        stat = current.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        with os.scandir(current) as entries:
            ordered = sorted(entries, key=lambda entry: entry.name)
        folders = []
        for entry in ordered:
            try:
                if entry.is_dir():
                    (linked if entry.is_symlink() else folders).append((Path(entry.path), f"{relative}{entry.name}/"))
                elif entry.is_file() and not entry.name.startswith("._") and (
                        not images_only or is_image_name(entry.name)):
                    found.append(f"{relative}{entry.name}")
            except OSError as exc:
                if exc.errno != errno.ELOOP:  # a link that loops on itself is skipped; anything else is an error
                    raise
        pending.extend(reversed(folders))
    return sorted(found, key=lambda member: member.split("/"))


def iter_images(path: Path, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    """(relative name, bytes) of every image under ``prefix`` of a folder or archive, in sorted order."""
    if path.is_dir():
        return ((m, (path / m).read_bytes()) for m in _folder_members(path, prefix))
    return ((m, d) for m, d in _iter_archive(path) if m.startswith(prefix))


def _folder_members(path: Path, prefix: str) -> list[str]:
    """The image files of a folder under ``prefix`` (``list_files``), as paths relative to ``path``."""
    root = path / prefix if prefix else path
    return [f"{prefix}{member}" for member in list_files(root)] if root.is_dir() else []


def stack_uniform(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack images; grayscale joins RGB as three equal channels; if sizes differ, each is
    centre-cropped to a square and resized to the commonest side."""
    if len({a.shape[2] for a in arrays}) > 1:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    side = Counter(min(a.shape[:2]) for a in arrays).most_common(1)[0][0]
    channels = max(a.shape[2] for a in arrays)
    out = np.empty((len(arrays), side, side, channels), np.uint8)
    for i, array in enumerate(arrays):
        h, w = array.shape[:2]
        s = min(h, w)
        crop = array[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        image = Image.fromarray(crop[:, :, 0] if crop.shape[2] == 1 else crop)
        image = image.convert("RGB" if channels == 3 else "L").resize((side, side), Image.BILINEAR)
        resized = np.asarray(image)
        out[i] = resized[:, :, None] if resized.ndim == 2 else resized
    return out


def cached_arrays(key: str, source: Path, build: Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (images, labels, classes) from the cache, building and saving them on a miss.

    The cache entry is keyed by ``key`` and the source's size and modification time. A cache that
    cannot be written (full disk, read-only) warns and the built arrays are returned all the same.
    """
    folder = cache_root() / "datasets" / f"{key}-{_source_stamp(source)}"
    files = folder / "images.npy", folder / "labels.npy", folder / "classes.json"
    if all(f.is_file() for f in files):
        try:
            return np.load(files[0]), np.load(files[1]), json.loads(files[2].read_text())
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    images, labels, classes = build()
    remove_stale_temp_files(folder)
    try:
        atomic_npy(images, files[0])
        atomic_npy(labels, files[1])
        atomic_json(classes, files[2])
    except OSError as exc:  # full disk, read-only cache: the arrays are built, go on without the cache
        warnings.warn(f"dataset cache {folder} not written ({exc}); going on without it", stacklevel=2)
    return images, labels, classes


def _source_stamp(source: Path) -> str:
    """A hash of a file's, or of every file's in a folder, path, size, modification and status-change time and
    inode: a file replaced by another of the same size with its old modification time still changes it."""
    digest = hashlib.sha256()
    for member in [""] if source.is_file() else list_files(source, images_only=False):  # symlinks followed
        stat = (source / member).stat() if member else source.stat()
        digest.update(f"{member}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino};".encode())
    return digest.hexdigest()[:16]


def image_folder(path: Path, name: str | None = None, prefix: str = "", streaming: str = "never",
                 shape: tuple[int, int, int] | None = None, resize: str = "stretch") -> ImageSet | FileImageSet:
    """Read ``<class>/<image>`` folders (or a .tar.gz/.zip of them); labels follow sorted class names.

    As torchvision's ImageFolder, the class is the first folder below the top; images directly at
    the top are unlabelled (-1). ``path`` may continue inside an archive
    (``data.tar.gz/top/test``), and ``prefix`` keeps only members under that path. With ``shape``,
    each image is brought to it as it is decoded (as the streamed set does), so memory holds only
    images of that shape; without, images of differing sizes are centre-cropped to a common square.
    """
    name = name or path.name
    path, prefix = locate(path, prefix, name)
    if streaming == "always" or (streaming == "auto" and _is_large(path, prefix, shape)):
        images = streaming_folder(path, prefix, name)
        return images if shape is None else images.reshaped(shape, resize)

    def build() -> tuple[np.ndarray, np.ndarray, list[str]]:
        arrays, members = [], []
        for member, data in iter_images(path, prefix):  # read one file at a time
            source = str(path / member) if path.is_dir() else f"{path}:{member}"
            arrays.append(decode_fitted(data, source, shape, resize))
            members.append(member)
        if not arrays:
            raise DatasetNotFoundError(name, path, f"no image files under {prefix or 'its top level'}",
                                       hint=False)
        labels, classes = folder_labels([member[len(prefix):] for member in members])
        return stack_uniform(arrays), labels, classes

    fitted = "" if shape is None else f"-{'x'.join(map(str, shape))}-{resize}"
    images, labels, classes = cached_arrays(f"folder-{_slug(path)}-{_slug_text(prefix)}{fitted}", path, build)
    return ImageSet(name, images, labels, classes)


def locate(path: Path, prefix: str, name: str) -> tuple[Path, str]:
    """Split ``archive.tar.gz/inner/dir`` into (archive, "inner/dir/" + prefix); errors name the path."""
    if path.exists():
        return _folder_or_archive(path), prefix
    for parent in path.parents:
        if parent.is_file():
            return _folder_or_archive(parent), f"{path.relative_to(parent).as_posix()}/{prefix}"
        if parent.exists():
            break
    raise DatasetNotFoundError(name, path.parent, f"no folder or archive {path.name}", hint=False)


def _folder_or_archive(path: Path) -> Path:
    """``path`` when it is a folder, a zip or a tar archive; else one line saying what it must be."""
    if path.is_dir() or (path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))):
        return path
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise CorruptImageError(f"cannot read archive {path}: not a readable zip or tar archive")
    raise ConfigError(f"{path}: a folder: spec must name a folder or an archive (.zip, .tar, .tar.gz), "
                     "not another kind of file")


def folder_labels(members: list[str]) -> tuple[np.ndarray, list[str]]:
    """Labels from the first folder of each relative path (sorted class names); top-level files get -1."""
    class_names = [m.split("/", 1)[0] if "/" in m else None for m in members]
    classes = sorted({c for c in class_names if c is not None})
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] if c is not None else -1 for c in class_names], np.int64), classes


def _member_sizes(path: Path, prefix: str) -> list[tuple[str, int]] | None:
    """(member, bytes) of the image files of a folder or zip under ``prefix``; None for tar archives."""
    if path.is_dir():
        return [(member, (path / member).stat().st_size) for member in _folder_members(path, prefix)]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return sorted((i.filename, i.file_size) for i in archive.infolist()
                          if i.filename.startswith(prefix) and is_image_name(i.filename))
    return None


def _is_large(path: Path, prefix: str, shape: tuple[int, int, int] | None) -> bool:
    """Whether decoding into memory would take more than ``STREAM_BYTES`` (or there are > ``STREAM_COUNT``
    images): the count times the target shape when known, else ten times the compressed size."""
    sizes = _member_sizes(path, prefix)
    if sizes is None:  # a tar archive: no listing without reading it through
        return 10 * path.stat().st_size > STREAM_BYTES
    if len(sizes) > STREAM_COUNT:
        return True
    decoded = len(sizes) * int(np.prod(shape)) if shape else 10 * sum(size for _, size in sizes)
    return decoded > STREAM_BYTES


def streaming_folder(path: Path, prefix: str, name: str) -> FileImageSet:
    """A ``FileImageSet`` over a folder or zip (a tar archive is unpacked into the cache first).

    The first image is decoded at once, so a folder of undecodable files fails here, naming the file.
    """
    if not path.is_dir() and not zipfile.is_zipfile(path):
        path = unpack_tar(path, cache_root())
    sizes = _member_sizes(path, prefix)
    if not sizes:
        raise DatasetNotFoundError(name, path, f"no image files under {prefix or 'its top level'}", hint=False)
    members = [m for m, _ in sizes]
    labels, classes = folder_labels([m[len(prefix):] for m in members])
    images = FileImageSet(name, path, members, labels, classes)
    images.load(0)
    return images


def _slug(path: Path) -> str:
    return _slug_text(str(path.resolve()))[-80:]


def _slug_text(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _require(name: str, root: Path, *paths: Path) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetNotFoundError(name, root, "missing " + ", ".join(str(p.relative_to(root)) for p in missing))


# ---------------------------------------------------------------- registered datasets

Shape = tuple[int, int, int] | None


def _torchvision_idx(name: str, cls: type, folder: str, root: Path, split: str) -> ImageSet:
    """MNIST-style torchvision datasets; downloads only when the files are absent and the network allows."""
    train = split == "train"
    try:
        dataset = cls(str(root), train=train, download=False)
    except RuntimeError:
        try:
            dataset = cls(str(root), train=train, download=True)
        except Exception as exc:  # no network, read-only root, ...
            raise DatasetNotFoundError(name, root / folder / "raw", f"download failed ({exc})") from None
    images = dataset.data.numpy()[:, :, :, None]
    return ImageSet(name, images, dataset.targets.numpy().astype(np.int64), list(dataset.classes))


@DATASETS.register("mnist")
def mnist(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """MNIST digits (torchvision ``MNIST`` layout: ``MNIST/raw``)."""
    return _torchvision_idx("mnist", torchvision.datasets.MNIST, "MNIST", root, split)


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """Fashion-MNIST (torchvision ``FashionMNIST`` layout: ``FashionMNIST/raw``)."""
    return _torchvision_idx("fashion_mnist", torchvision.datasets.FashionMNIST, "FashionMNIST", root, split)


@DATASETS.register("notmnist")
def notmnist(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """notMNIST letters A-J, test split only (IDX files in ``notMNIST/raw``); no public download."""
    if split != "test":
        raise ConfigError("notmnist has only a test split")
    raw = root / "notMNIST" / "raw"
    images_file, labels_file = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    _require("notmnist", root, images_file, labels_file)
    images = read_image_file(str(images_file)).numpy()[:, :, :, None]
    labels = read_label_file(str(labels_file)).numpy().astype(np.int64)
    return ImageSet("notmnist", images, labels, list("ABCDEFGHIJ"))


@DATASETS.register("cifar10")
def cifar10(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """CIFAR-10: torchvision's ``cifar-10-batches-py`` when present, else ``cifar10-jpeg.tar.gz``."""
    if (root / "cifar-10-batches-py").is_dir():
        dataset = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=False)
        return ImageSet("cifar10", dataset.data, np.asarray(dataset.targets, np.int64), list(dataset.classes))
    for candidate in (root / "cifar10-jpeg.tar.gz", root / "cifar10_jpg"):
        if candidate.exists():
            return _renamed(image_folder(candidate, prefix=_archive_prefix(candidate, "cifar10_jpg", split)),
                            "cifar10")
    raise DatasetNotFoundError("cifar10", root, "neither cifar-10-batches-py nor cifar10-jpeg.tar.gz")


def _archive_prefix(path: Path, top: str, sub: str) -> str:
    return f"{sub}/" if path.is_dir() else f"{top}/{sub}/"


def _renamed(images: ImageSet, name: str) -> ImageSet:
    images.name = name
    return images


@DATASETS.register("tiny_imagenet")
def tiny_imagenet(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """Tiny ImageNet validation images ``val_0``-``val_9999`` (64x64, 200 classes); test split only."""
    if split != "test":
        raise ConfigError("tiny_imagenet provides only its validation images (split 'test')")
    path = root / "tiny-imagenet-200-val.tar.gz"
    if not path.exists():
        path = root / "tiny-imagenet-200"
    if not path.exists():
        raise DatasetNotFoundError("tiny_imagenet", root, "no tiny-imagenet-200-val.tar.gz or tiny-imagenet-200/")

    def build() -> tuple[np.ndarray, np.ndarray, list[str]]:
        annotations: dict[str, str] = {}
        images: dict[int, np.ndarray] = {}
        for member, data in _iter_all(path):
            base = Path(member).name
            if base == "val_annotations.txt":
                for line in data.decode().splitlines():
                    file, wnid = line.split("\t")[:2]
                    annotations[file] = wnid
            elif base.startswith("val_") and base.endswith(".JPEG") and int(base[4:-5]) < 10000:
                images[int(base[4:-5])] = decode_image(data, f"{path}:{member}")
        order = sorted(images)
        if len(order) != 10000 or not annotations:
            raise DatasetNotFoundError("tiny_imagenet", root, f"expected 10000 val images, found {len(order)}")
        wnids = [annotations[f"val_{i}.JPEG"] for i in order]
        classes = sorted(set(wnids))
        index = {c: i for i, c in enumerate(classes)}
        return stack_uniform([images[i] for i in order]), np.array([index[w] for w in wnids], np.int64), classes

    images, labels, classes = cached_arrays("tiny_imagenet_val", path, build)
    return ImageSet("tiny_imagenet", images, labels, classes)


@DATASETS.register("dtd")
def dtd(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """Describable Textures, the 10-class subset ``dtd-subset-128`` (archive or extracted folder).

    Images differ in size; they are centre-cropped to squares of the commonest shorter side (128).
    """
    for candidate in (root / "dtd-subset-128.tar.gz", root / "dtd-subset-128"):
        if candidate.exists():
            return _renamed(image_folder(candidate, prefix=_archive_prefix(candidate, "dtd-subset-128", "images")),
                            "dtd")
    raise DatasetNotFoundError("dtd", root, "no dtd-subset-128.tar.gz or dtd-subset-128/")


NOISE_SIZE = 10_000


def _noise(name: str, split: str, image_shape: Shape, draw: Callable[[np.random.Generator, tuple], np.ndarray]
           ) -> ImageSet:
    shape = image_shape or (32, 32, 3)
    rng = np.random.default_rng(0 if split == "test" else 1)
    pixels = draw(rng, (NOISE_SIZE, *shape))
    pixels *= 255.0  # in place: the same values as np.clip(np.rint(pixels * 255), 0, 255), without copies
    np.rint(pixels, out=pixels)
    np.clip(pixels, 0, 255, out=pixels)
    images = pixels.astype(np.uint8)
    return ImageSet(name, images, np.full(NOISE_SIZE, -1, np.int64))


@DATASETS.register("gaussian")
def gaussian(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """10,000 images of i.i.d. N(0.5, 0.25^2) pixels clipped to [0, 1], in the ID image shape."""
    return _noise("gaussian", split, image_shape, lambda rng, shape: rng.normal(0.5, 0.25, shape))


@DATASETS.register("uniform")
def uniform(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """10,000 images of i.i.d. U[0, 1] pixels, in the ID image shape."""
    return _noise("uniform", split, image_shape, lambda rng, shape: rng.uniform(0.0, 1.0, shape))


def _tiny_imagenet_half(name: str, first: bool, root: Path, split: str) -> ImageSet:
    full = tiny_imagenet(root, "test")
    keep = full.labels < 100 if first else full.labels >= 100
    images = full.subset(np.flatnonzero(keep), name)
    return images


@DATASETS.register("tiny_imagenet_a")
def tiny_imagenet_a(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """Tiny ImageNet val images of the first 100 classes (sorted wnids): a training-outlier pool."""
    return _tiny_imagenet_half("tiny_imagenet_a", True, root, split)


@DATASETS.register("tiny_imagenet_b")
def tiny_imagenet_b(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """Tiny ImageNet val images of the other 100 classes: the near-OOD test set disjoint from ``_a``."""
    return _tiny_imagenet_half("tiny_imagenet_b", False, root, split)


NATURAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "brick", "grass",
                  "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "clock")


# two disjoint halves of the photos: ``natural_patches_a`` for training outliers, ``natural_patches_b`` for
# validation, so that a model trained against outliers is still tuned and selected on photos it never saw
NATURAL_PHOTOS_B = ("chelsea", "astronaut", "camera", "moon", "grass")
NATURAL_PHOTOS_A = tuple(p for p in NATURAL_PHOTOS if p not in NATURAL_PHOTOS_B)


@DATASETS.register("natural_patches")
def natural_patches(root: Path, split: str, image_shape: Shape = None, count: int = 10_000,
                    photos: tuple[str, ...] = NATURAL_PHOTOS, name: str = "natural_patches") -> ImageSet:
    """Random square crops (32-160 px, resized to 64x64 RGB) of the photos bundled with scikit-image.

    A small outlier pool that needs no download; ``split`` picks the seed (train 1, test 0).
    """
    import skimage.data

    rng = np.random.default_rng(1 if split == "train" else 0)
    arrays = []
    for photo in photos:
        array = np.asarray(getattr(skimage.data, photo)())
        arrays.append(np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array[:, :, :3])
    out = np.empty((count, 64, 64, 3), np.uint8)
    for i in range(count):
        photo = arrays[rng.integers(len(arrays))]
        side = int(rng.integers(32, min(160, *photo.shape[:2]) + 1))
        top, left = (int(rng.integers(0, photo.shape[k] - side + 1)) for k in (0, 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((64, 64), Image.BILINEAR)
        out[i] = np.asarray(crop)
    return ImageSet(name, out, np.full(count, -1, np.int64))


@DATASETS.register("natural_patches_a")
def natural_patches_a(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """``natural_patches`` from the photos of ``NATURAL_PHOTOS_A`` only (a training-outlier pool)."""
    return natural_patches(root, split, image_shape, photos=NATURAL_PHOTOS_A, name="natural_patches_a")


@DATASETS.register("natural_patches_b")
def natural_patches_b(root: Path, split: str, image_shape: Shape = None) -> ImageSet:
    """``natural_patches`` from the photos of ``NATURAL_PHOTOS_B`` only (disjoint from ``natural_patches_a``)."""
    return natural_patches(root, split, image_shape, photos=NATURAL_PHOTOS_B, name="natural_patches_b")


OVERLAPS: dict[str, set[str]] = {
    "tiny_imagenet": {"tiny_imagenet_a", "tiny_imagenet_b"},
    "tiny_imagenet_a": {"tiny_imagenet"},
    "tiny_imagenet_b": {"tiny_imagenet"},
    "natural_patches": {"natural_patches_a", "natural_patches_b"},
    "natural_patches_a": {"natural_patches"},
    "natural_patches_b": {"natural_patches"},
}


def overlaps(a: str, b: str) -> bool:
    """Whether datasets ``a`` and ``b`` share images (same name, or known to overlap)."""
    return a == b or b in OVERLAPS.get(a, set())
