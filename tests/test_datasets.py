"""Dataset loading: image folders and archives, decode cache, clear errors, IDX files, noise sets, real data."""

from __future__ import annotations

import io
import math
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from conftest import real_root
from oodforge.data import datasets
from oodforge.data.datasets import (
    DATASETS,
    CorruptImageError,
    DatasetNotFoundError,
    cache_root,
    data_root,
    load_dataset,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """Point the decode cache at a temporary folder so tests never write into the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OODFORGE_CACHE", str(cache))
    return cache


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array).save(path)


def make_folder(root: Path, images: dict[str, list[np.ndarray]]) -> Path:
    """Write ``<class>/<i>.png`` for every class; returns ``root``."""
    for class_name, arrays in images.items():
        for i, array in enumerate(arrays):
            write_png(root / class_name / f"{i}.png", array)
    return root


def random_images(count: int, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


# ---------------------------------------------------------------- image folders and archives


def two_class_folder(tmp_path: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    # "zebra" is written first but sorts last, so labels must come from sorted names, not from write order.
    images = {"zebra": random_images(3, (6, 5, 3), seed=1), "ant": random_images(2, (6, 5, 3), seed=2)}
    return make_folder(tmp_path / "pets", images), images


def test_image_folder_labels_follow_sorted_class_names_and_pixels_round_trip(tmp_path, tmp_cache) -> None:
    folder, images = two_class_folder(tmp_path)
    loaded = load_dataset(f"folder:{folder}")
    assert loaded.classes == ["ant", "zebra"]
    assert loaded.images.shape == (5, 6, 5, 3)
    assert loaded.images.dtype == np.uint8
    # files are read in sorted order: ant/0, ant/1, zebra/0, zebra/1, zebra/2
    np.testing.assert_array_equal(loaded.labels, [0, 0, 1, 1, 1])
    expected = np.stack(images["ant"] + images["zebra"])
    np.testing.assert_array_equal(loaded.images, expected)


def test_tar_gz_and_zip_archives_give_the_same_arrays_as_the_folder(tmp_path, tmp_cache) -> None:
    folder, _ = two_class_folder(tmp_path)
    files = sorted(p for p in folder.rglob("*.png"))
    tar_path, zip_path = tmp_path / "pets.tar.gz", tmp_path / "pets.zip"
    with tarfile.open(tar_path, "w:gz") as archive:
        for file in reversed(files):  # stored order differs from sorted order on purpose
            archive.add(file, arcname=str(file.relative_to(folder)))
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in reversed(files):
            archive.write(file, arcname=str(file.relative_to(folder)))
    from_folder = load_dataset(f"folder:{folder}")
    for archive_path in (tar_path, zip_path):
        loaded = load_dataset(f"folder:{archive_path}")
        np.testing.assert_array_equal(loaded.images, from_folder.images)
        np.testing.assert_array_equal(loaded.labels, from_folder.labels)
        assert loaded.classes == from_folder.classes


def test_grayscale_and_rgb_mixed_become_three_equal_channels(tmp_path, tmp_cache) -> None:
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
    rgb = random_images(1, (4, 4, 3), seed=3)[0]
    folder = make_folder(tmp_path / "mixed", {"a": [gray], "b": [rgb]})
    loaded = load_dataset(f"folder:{folder}")
    assert loaded.images.shape == (2, 4, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded.images[0, :, :, channel], gray[:, :, 0])
    np.testing.assert_array_equal(loaded.images[1], rgb)


def test_all_grayscale_folder_keeps_one_channel(tmp_path, tmp_cache) -> None:
    grays = random_images(2, (5, 5, 1), seed=4)
    loaded = load_dataset(f"folder:{make_folder(tmp_path / 'g', {'a': grays})}")
    assert loaded.images.shape == (2, 5, 5, 1)
    np.testing.assert_array_equal(loaded.images, np.stack(grays))


def test_different_sizes_are_centre_cropped_to_squares_of_the_commonest_side(tmp_path, tmp_cache) -> None:
    squares = random_images(2, (8, 8, 3), seed=5)  # commonest shorter side: 8
    wide = random_images(1, (8, 12, 3), seed=6)[0]  # centre crop keeps columns 2..9
    tall = random_images(1, (14, 8, 3), seed=7)[0]  # centre crop keeps rows 3..10
    big = np.full((16, 16, 3), (200, 30, 90), np.uint8)  # resized 16 -> 8, a constant stays constant
    folder = make_folder(tmp_path / "sizes", {"a": squares, "b": [wide], "c": [tall], "d": [big]})
    loaded = load_dataset(f"folder:{folder}")
    assert loaded.images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(loaded.images[0], squares[0])
    np.testing.assert_array_equal(loaded.images[1], squares[1])
    np.testing.assert_array_equal(loaded.images[2], wide[:, 2:10])
    np.testing.assert_array_equal(loaded.images[3], tall[3:11, :])
    np.testing.assert_array_equal(loaded.images[4], np.full((8, 8, 3), (200, 30, 90), np.uint8))
    np.testing.assert_array_equal(loaded.labels, [0, 0, 1, 2, 3])


def test_second_load_comes_from_the_cache_without_decoding(tmp_path, tmp_cache, monkeypatch) -> None:
    folder, _ = two_class_folder(tmp_path)
    first = load_dataset(f"folder:{folder}")
    entries = list((tmp_cache / "datasets").iterdir())
    assert len(entries) == 1
    assert {p.name for p in entries[0].iterdir()} == {"images.npy", "labels.npy", "classes.json"}

    def no_decoding(data: bytes, source: str, *args) -> np.ndarray:
        raise AssertionError(f"decoded {source} although the cache holds it")

    monkeypatch.setattr(datasets, "decode_image", no_decoding)
    monkeypatch.setattr(datasets, "decode_fitted", no_decoding)
    second = load_dataset(f"folder:{folder}")
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.classes == first.classes


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, tmp_cache) -> None:
    folder, _ = two_class_folder(tmp_path)
    first = load_dataset(f"folder:{folder}")
    (entry,) = (tmp_cache / "datasets").iterdir()
    (entry / "images.npy").write_bytes(b"not an npy file")
    second = load_dataset(f"folder:{folder}")
    np.testing.assert_array_equal(second.images, first.images)


def test_adding_an_image_inside_a_class_folder_invalidates_the_cache(tmp_path, tmp_cache) -> None:
    folder, _ = two_class_folder(tmp_path)
    assert len(load_dataset(f"folder:{folder}")) == 5
    write_png(folder / "ant" / "9.png", random_images(1, (6, 5, 3), seed=9)[0])
    assert len(load_dataset(f"folder:{folder}")) == 6


def test_corrupt_image_raises_an_error_naming_the_file(tmp_path, tmp_cache) -> None:
    folder, _ = two_class_folder(tmp_path)
    (folder / "ant" / "x.png").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CorruptImageError, match=r"x\.png"):
        load_dataset(f"folder:{folder}")
    assert not (tmp_cache / "datasets").exists() or not any((tmp_cache / "datasets").rglob("images.npy"))


def test_decode_image_names_the_source_and_keeps_png_pixels() -> None:
    rgb = random_images(1, (3, 4, 3), seed=8)[0]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    np.testing.assert_array_equal(datasets.decode_image(buffer.getvalue(), "mem.png"), rgb)
    with pytest.raises(CorruptImageError, match=r"archive\.zip:a/bad\.png"):
        datasets.decode_image(b"\x89PNG broken", "archive.zip:a/bad.png")


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    values = np.array([[0, 1000], [40000, 65535]], np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    decoded = datasets.decode_image(buffer.getvalue(), "deep.png")
    assert decoded.shape == (2, 2, 1)
    np.testing.assert_allclose(decoded[:, :, 0], values / 257.0, atol=1.0)


def test_missing_folder_raises_dataset_not_found(tmp_path, tmp_cache) -> None:
    """An explicit folder spec names the folder (the OODFORGE_DATA hint is only for registered datasets)."""
    with pytest.raises(DatasetNotFoundError, match="no folder or archive absent") as error:
        load_dataset(f"folder:{tmp_path / 'absent'}")
    assert "OODFORGE_DATA" not in str(error.value)
    with pytest.raises(DatasetNotFoundError, match="OODFORGE_DATA"):
        load_dataset("cifar10", root=tmp_path)


def test_folder_without_images_raises_dataset_not_found(tmp_path, tmp_cache) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


# ---------------------------------------------------------------- registered datasets: errors


def test_missing_mnist_names_the_dataset_the_folder_and_the_variable(tmp_path, monkeypatch) -> None:
    def no_network(self) -> None:
        raise OSError("network unavailable")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "test", root=tmp_path)
    message = str(info.value)
    assert "'mnist'" in message
    assert str(tmp_path) in message
    assert "OODFORGE_DATA" in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("name", ["notmnist", "cifar10", "tiny_imagenet", "dtd"])
def test_missing_archive_datasets_name_dataset_folder_and_variable(name, tmp_path, tmp_cache) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "test", root=tmp_path)
    message = str(info.value)
    assert repr(name) in message and str(tmp_path) in message and "OODFORGE_DATA" in message


def test_unknown_dataset_name_lists_the_known_names() -> None:
    with pytest.raises(KeyError) as info:
        load_dataset("svhn_not_here")
    message = str(info.value)
    assert "svhn_not_here" in message
    for known in ("mnist", "fashion_mnist", "notmnist", "cifar10", "tiny_imagenet", "dtd", "gaussian", "uniform"):
        assert known in message
        assert known in DATASETS


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        load_dataset("gaussian", "validation")


def test_data_and_cache_roots_follow_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OODFORGE_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("OODFORGE_CACHE", str(tmp_path / "c"))
    assert data_root() == tmp_path / "d"
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("OODFORGE_DATA")
    monkeypatch.delenv("OODFORGE_CACHE")
    assert data_root() == Path("data")
    assert cache_root() == Path.home() / ".cache" / "oodforge"


# ---------------------------------------------------------------- notMNIST from hand-written IDX files


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic 0x000008NN (uint8 data, NN dims), big-endian int32 dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_notmnist_reads_idx_files(tmp_path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 3], np.uint8)
    raw = tmp_path / "notMNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", images)
    write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x01"
    loaded = load_dataset("notmnist", "test", root=tmp_path)
    assert loaded.images.shape == (4, 28, 28, 1)
    np.testing.assert_array_equal(loaded.images[:, :, :, 0], images)
    np.testing.assert_array_equal(loaded.labels, [3, 0, 9, 3])
    assert loaded.labels.dtype == np.int64
    assert loaded.classes == list("ABCDEFGHIJ")
    with pytest.raises(ValueError, match="test split"):
        load_dataset("notmnist", "train", root=tmp_path)


def test_notmnist_with_only_the_image_file_names_the_missing_label_file(tmp_path) -> None:
    write_idx(tmp_path / "notMNIST" / "raw" / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("notmnist", "test", root=tmp_path)


# ---------------------------------------------------------------- noise sets


def clipped_normal_std(sigma: float, clip: float) -> float:
    """Std of N(0, sigma^2) clipped to [-clip, clip] (clip = c * sigma)."""
    c = clip / sigma
    pdf = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    inside = math.erf(c / math.sqrt(2))
    tail = 1 - (1 + math.erf(c / math.sqrt(2))) / 2
    return sigma * math.sqrt(inside - 2 * c * pdf + 2 * c * c * tail)


@pytest.mark.parametrize("name", ["gaussian", "uniform"])
def test_noise_follows_image_shape_and_is_deterministic(name, tmp_path) -> None:
    first = load_dataset(name, "test", root=tmp_path, image_shape=(8, 6, 1))
    again = load_dataset(name, "test", root=tmp_path, image_shape=(8, 6, 1))
    train = load_dataset(name, "train", root=tmp_path, image_shape=(8, 6, 1))
    assert first.images.shape == (10_000, 8, 6, 1)
    assert first.images.dtype == np.uint8
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.array_equal(first.images, train.images)
    assert (first.labels == -1).all() and first.name == name
    rgb = load_dataset(name, "test", root=tmp_path, image_shape=(4, 4, 3))
    assert rgb.images.shape == (10_000, 4, 4, 3)


def test_noise_statistics(tmp_path) -> None:
    gauss = load_dataset("gaussian", "test", root=tmp_path, image_shape=(8, 8, 1)).images / 255.0
    unif = load_dataset("uniform", "test", root=tmp_path, image_shape=(8, 8, 1)).images / 255.0
    # 640,000 pixels: standard errors of mean and std are below 0.0004
    assert gauss.mean() == pytest.approx(0.5, abs=0.003)
    assert gauss.std() == pytest.approx(clipped_normal_std(0.25, 0.5), abs=0.003)  # ~0.2398
    assert gauss.min() == 0.0 and gauss.max() == 1.0
    assert unif.mean() == pytest.approx(0.5, abs=0.003)
    assert unif.std() == pytest.approx(1 / math.sqrt(12), abs=0.003)  # 0.2887
    assert unif.min() == 0.0 and unif.max() == 1.0


def test_noise_default_shape_is_cifar_sized(tmp_path) -> None:
    assert load_dataset("uniform", "test", root=tmp_path).images.shape == (10_000, 32, 32, 3)


# ---------------------------------------------------------------- real data (OODFORGE_DATA)




def test_real_fashion_mnist() -> None:
    root = real_root("FashionMNIST/raw")
    train, test = load_dataset("fashion_mnist", "train", root), load_dataset("fashion_mnist", "test", root)
    assert train.images.shape == (60_000, 28, 28, 1)
    assert test.images.shape == (10_000, 28, 28, 1)
    assert train.images.mean() / 255.0 == pytest.approx(0.2860, abs=0.001)
    assert len(train.classes) == 10
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))


def test_real_mnist() -> None:
    root = real_root("MNIST/raw")
    train, test = load_dataset("mnist", "train", root), load_dataset("mnist", "test", root)
    assert train.images.shape == (60_000, 28, 28, 1)
    assert test.images.shape == (10_000, 28, 28, 1)
    assert set(np.unique(test.labels)) == set(range(10))


def test_real_notmnist() -> None:
    root = real_root("notMNIST/raw")
    test = load_dataset("notmnist", "test", root)
    assert test.images.shape == (10_000, 28, 28, 1)
    assert set(np.unique(test.labels)) <= set(range(10))


def test_real_cifar10() -> None:
    root = real_root("cifar10-jpeg.tar.gz")
    train, test = load_dataset("cifar10", "train", root), load_dataset("cifar10", "test", root)
    assert train.images.shape == (50_000, 32, 32, 3)
    assert test.images.shape == (10_000, 32, 32, 3)
    assert train.classes == CIFAR10_CLASSES and test.classes == CIFAR10_CLASSES
    assert train.name == test.name == "cifar10"
    np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))
    means = test.images.reshape(-1, 3).mean(axis=0) / 255.0
    np.testing.assert_allclose(means, [0.491, 0.482, 0.447], atol=0.01)


def test_real_tiny_imagenet() -> None:
    root = real_root("tiny-imagenet-200-val.tar.gz")
    test = load_dataset("tiny_imagenet", "test", root)
    assert test.images.shape == (10_000, 64, 64, 3)
    assert len(test.classes) == 200
    assert set(np.unique(test.labels)) == set(range(200))


def test_real_dtd() -> None:
    root = real_root("dtd-subset-128.tar.gz")
    test = load_dataset("dtd", "test", root)
    assert test.images.shape == (1200, 128, 128, 3)
    assert test.classes == ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed",
                            "cracked", "crosshatched", "crystalline"]
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 120))


def test_balanced_head_takes_classes_in_turn_even_when_files_are_sorted_by_class():
    from oodforge.data.imageset import ImageSet

    labels = np.repeat(np.arange(3), 4)  # sorted by class: 0 0 0 0 1 1 1 1 2 2 2 2
    images = ImageSet("s", np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1), labels, ["a", "b", "c"])
    head = images.balanced_head(7)
    assert head.images.ravel().tolist() == [0, 1, 2, 4, 5, 8, 9]  # ranks 0, 0, 0, 1, 1, 1 then class 0's rank 2
    assert np.bincount(head.labels).tolist() == [3, 2, 2]
    assert len(images.balanced_head(50)) == 12
    shuffled = ImageSet("u", images.images[::-1].copy(), labels[::-1].copy(), images.classes)
    assert np.bincount(shuffled.balanced_head(6).labels).tolist() == [2, 2, 2]
