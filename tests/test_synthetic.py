"""Synthetic sets on disk: write/load round trip, manifest, grid PNG, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from oodforge.data.imageset import ImageSet
from oodforge.data.synthetic import (
    SyntheticSet,
    SyntheticSetError,
    load_synthetic,
    sample_grid,
    write_synthetic,
)

CLASSES = ["tee", "trouser", "bag"]


def interpolated_set(count: int = 12, channels: int = 1) -> SyntheticSet:
    rng = np.random.default_rng(0)
    first = rng.integers(0, 3, count)
    pairs = np.stack([first, (first + rng.integers(1, 3, count)) % 3], axis=1).astype(np.int64)
    extra = {"pairs": pairs, "alphas": rng.uniform(0.3, 0.7, count).astype(np.float32)}
    manifest = {"kind": "interpolated", "model_hash": "abc123", "seed": 7, "guidance": 2.0, "steps": 50,
                "alpha_range": [0.3, 0.7]}
    images = rng.integers(0, 256, (count, 16, 16, channels), dtype=np.uint8)
    return SyntheticSet("interp", images, np.full(count, -1, np.int64), CLASSES, manifest, extra)


def test_round_trip_with_manifest_and_extras(tmp_path) -> None:
    original = interpolated_set()
    folder = write_synthetic(tmp_path / "interp", original, original.manifest, original.extra)
    loaded = load_synthetic(folder)
    np.testing.assert_array_equal(loaded.images, original.images)
    np.testing.assert_array_equal(loaded.labels, original.labels)
    np.testing.assert_array_equal(loaded.extra["pairs"], original.extra["pairs"])
    np.testing.assert_array_equal(loaded.extra["alphas"], original.extra["alphas"])
    assert loaded.classes == CLASSES and loaded.name == "interp" and isinstance(loaded, ImageSet)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "interpolated" and manifest["model_hash"] == "abc123"
    assert manifest["count"] == 12 and manifest["seed"] == 7 and manifest["alpha_range"] == [0.3, 0.7]
    assert manifest["created_by"].startswith("oodforge ") and manifest["extras"] == ["alphas", "pairs"]
    assert loaded.manifest == manifest
    assert Image.open(folder / "grid.png").format == "PNG"


def test_plain_id_set_round_trip(tmp_path) -> None:
    images = ImageSet("id", np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 0, 1, 1, 2, 2]), CLASSES)
    folder = write_synthetic(tmp_path / "id", images, {"kind": "id", "seed": 0})
    loaded = load_synthetic(folder)
    assert loaded.extra == {} and loaded.image_shape == (8, 8, 3)
    np.testing.assert_array_equal(loaded.labels, images.labels)
    assert not (folder / "pairs.npy").exists()


def test_write_validates_kind_and_extras(tmp_path) -> None:
    images = interpolated_set()
    with pytest.raises(ValueError, match="kind"):
        write_synthetic(tmp_path / "a", images, {"seed": 0})
    with pytest.raises(ValueError, match="alphas"):
        write_synthetic(tmp_path / "b", images, {"kind": "interpolated"}, {"alphas": np.zeros(3)})


def test_load_errors_name_the_folder(tmp_path) -> None:
    with pytest.raises(SyntheticSetError, match="nowhere"):
        load_synthetic(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SyntheticSetError, match="empty.*manifest.json"):
        load_synthetic(empty)
    original = interpolated_set()
    folder = write_synthetic(tmp_path / "broken", original, original.manifest, original.extra, grid=False)
    (folder / "images.npy").write_bytes(b"garbage")
    with pytest.raises(SyntheticSetError, match="broken.*images.npy"):
        load_synthetic(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(SyntheticSetError, match="broken.*manifest.json"):
        load_synthetic(folder)


def test_grid_rows_by_label_and_by_pair(tmp_path) -> None:
    labels = np.repeat(np.arange(3), 5)
    id_set = ImageSet("id", np.full((15, 16, 16, 1), 128, np.uint8), labels, CLASSES)
    by_label = Image.open(sample_grid(id_set, tmp_path / "id.png", columns=4))
    by_pair = Image.open(sample_grid(interpolated_set(channels=3), tmp_path / "pair.png", columns=4))
    assert by_label.format == by_pair.format == "PNG"
    assert by_label.size[0] > 50 and by_label.size[1] > 50
    with pytest.raises(ValueError, match="pairs"):
        sample_grid(id_set, tmp_path / "bad.png", rows_by="pair")
