"""Detection data: canvas composition, the canvas benchmarks on real image sets, the COCO writer and loader."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import real_root
from oodforge.data.canvas import ALPHA_THRESHOLD, ObjectImage, compose, tight_box
from oodforge.data.canvas_benchmark import (
    DETECTION_BENCHMARKS,
    SPLITS,
    TEST_BACKGROUND_EVERY,
    VAL_EVERY,
    CanvasBenchmark,
    get_detection_benchmark,
)
from oodforge.data.canvas_writer import write_canvas_benchmark
from oodforge.data.coco import CocoFormatError, load_coco
from oodforge.data.detection import collate_detection
from oodforge.util.errors import ConfigError, UnknownNameError

NEEDED = ("MNIST", "FashionMNIST", "notMNIST", "dtd-subset-128.tar.gz", "cifar10-jpeg.tar.gz")
SMALL = {"train": 12, "val": 6, "test_id": 6, "test_ood": 6, "test_mixed": 8, "train_outliers": 6}


# ------------------------------------------------------------------------------------------ composition


def test_tight_box_of_a_hand_drawn_mask() -> None:
    mask = np.zeros((10, 12), bool)
    mask[3, 4] = mask[7, 9] = True
    assert tight_box(mask) == (4, 3, 10, 8)  # columns 4..9, rows 3..7, ends exclusive
    assert tight_box(np.zeros((5, 5), bool)) is None


def test_compose_blends_strokes_by_intensity_and_boxes_them_tightly() -> None:
    """A 16x16 stroke image pasted at scale 1 on a flat 16x16 canvas: no resizing, so every value is known."""
    strokes = np.zeros((16, 16, 1), np.uint8)
    strokes[4:9, 6:8] = 255  # full strength
    strokes[10, 2] = 20  # faint: alpha 0.078, below the threshold, so outside the box
    strokes[12, 3] = 30  # alpha 0.118, above it
    background = np.full((16, 16, 3), 100, np.uint8)
    item = ObjectImage(strokes, category_id=7, origin={"source": "hand"})
    canvas = compose(background, [lambda rng: item], (1.0, 1.0), 0.0, np.random.default_rng(0))
    assert canvas.slots == [0] and canvas.category_ids.tolist() == [7] and canvas.origins == [{"source": "hand"}]
    assert canvas.boxes.tolist() == [[3, 4, 8, 13]]  # x 3..7 (the faint pixel at x 2 is left out), y 4..12
    colour = canvas.image[5, 6].astype(int)  # full-strength stroke: exactly the colour
    assert (canvas.image[4:9, 6:8] == canvas.image[5, 6]).all() and colour.max() >= 0.7 * 255 - 1
    for (y, x), value in {(10, 2): 20, (12, 3): 30, (0, 0): 0}.items():
        alpha = value / 255
        expected = np.rint(alpha * colour + (1 - alpha) * 100)
        assert np.abs(canvas.image[y, x].astype(int) - expected).max() <= 1
    assert np.allclose(canvas.alphas[0], strokes[:, :, 0] / 255.0)


def test_compose_pastes_patches_opaque_and_keeps_squares_apart() -> None:
    patch = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    background = np.zeros((64, 64, 3), np.uint8)
    draws = [lambda rng: ObjectImage(patch, 1)] * 6
    canvas = compose(background, draws, (0.125, 0.125), 0.0, np.random.default_rng(3))
    assert len(canvas.boxes) == 6
    for x0, y0, x1, y1 in canvas.boxes:
        assert (x1 - x0, y1 - y0) == (8, 8)
        assert np.array_equal(canvas.image[y0:y1, x0:x1], patch)  # scale 8/64 of 64 = the patch's own size
    boxes = canvas.boxes
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i], boxes[j]
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])  # disjoint


def test_a_crowded_canvas_leaves_out_what_does_not_fit() -> None:
    patch = np.full((4, 4, 3), 200, np.uint8)
    canvas = compose(np.zeros((16, 16, 3), np.uint8), [lambda rng: ObjectImage(patch, 1)] * 3, (1.0, 1.0), 0.0,
                     np.random.default_rng(0))
    assert canvas.slots == [0] and canvas.boxes.tolist() == [[0, 0, 16, 16]]


# ------------------------------------------------------------------------------------------ settings


def test_registry_and_settings_are_checked_at_the_door() -> None:
    assert {"mnist_canvas", "fashion_canvas"} <= set(DETECTION_BENCHMARKS.names())
    bench = get_detection_benchmark("mnist_canvas", size=96, counts={"train": 5})
    assert bench.size == 96 and bench.counts["train"] == 5 and bench.counts["val"] == 500
    with pytest.raises(UnknownNameError, match="unknown detection benchmark 'nope'"):
        get_detection_benchmark("nope")
    with pytest.raises(ConfigError, match="ID source 'mnist' and OOD source 'mnist' share images"):
        CanvasBenchmark("x", ood_sources=("mnist",))
    with pytest.raises(ConfigError, match="OOD source 'natural_patches' and outlier source 'natural_patches_a'"):
        CanvasBenchmark("x", ood_sources=("natural_patches",), outlier_sources=("natural_patches_a",))
    with pytest.raises(ConfigError, match="unknown split 'test' in counts"):
        bench.with_options(counts={"test": 3})
    with pytest.raises(ConfigError, match="scale must be"):
        bench.with_options(scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="objects must be"):
        bench.with_options(objects=(0, 3))
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        bench.with_options(colour="red")


# ------------------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def small_bench() -> CanvasBenchmark:
    real_root(*NEEDED)
    return get_detection_benchmark("mnist_canvas", size=64, counts=SMALL)


@pytest.fixture(scope="module")
def written(small_bench: CanvasBenchmark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_canvas_benchmark(small_bench, tmp_path_factory.mktemp("canvas") / "bench", seed=5)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_canvases(small_bench, written, tmp_path) -> None:
    again = _files(write_canvas_benchmark(small_bench, tmp_path / "again", seed=5))
    first = _files(written)
    assert len(first) == sum(SMALL.values()) + len(SPLITS) + 1  # PNGs, a COCO file per split, benchmark.json
    assert again == first
    other = _files(write_canvas_benchmark(small_bench, tmp_path / "other", seed=6))
    assert other.keys() == first.keys()
    pngs = [name for name in first if name.endswith(".png")]
    assert sum(other[name] != first[name] for name in pngs) == len(pngs)
    assert other["train/annotations.json"] != first["train/annotations.json"]


def test_the_layout_and_the_coco_fields(written, small_bench) -> None:
    manifest = json.loads((written / "benchmark.json").read_text())
    assert manifest["benchmark"] == "mnist_canvas" and manifest["seed"] == 5
    assert manifest["alpha_threshold"] == ALPHA_THRESHOLD and manifest["settings"]["size"] == 64
    categories = manifest["categories"]
    assert [c["name"] for c in categories[10:]] == ["ood/notmnist", "ood/fashion_mnist", "ood/cifar10"]
    assert [c["id"] for c in categories] == list(range(1, 14)) and [c["ood"] for c in categories] == [False] * 10 + [
        True] * 3
    for split in SPLITS:
        document = json.loads((written / split / "annotations.json").read_text())
        assert document["categories"] == categories
        assert len(document["images"]) == SMALL[split] == manifest["splits"][split]["count"]
        for image in document["images"]:
            assert (written / split / "images" / image["file_name"]).is_file()
            assert Image.open(written / split / "images" / image["file_name"]).size == (64, 64)
        for annotation in document["annotations"]:
            x, y, w, h = annotation["bbox"]
            assert annotation["area"] == w * h and annotation["iscrowd"] == 0
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64


def test_sources_stay_in_their_splits(written, small_bench) -> None:
    """No OOD or outlier source in train/val; no outlier source in test; train and val share no source image."""
    documents = {s: json.loads((written / s / "annotations.json").read_text()) for s in SPLITS}
    sources = {s: {a["source"] for a in d["annotations"]} for s, d in documents.items()}
    assert sources["train"] == sources["val"] == sources["test_id"] == {"mnist"}
    assert sources["test_ood"] <= {"notmnist", "fashion_mnist"} and sources["test_mixed"] <= {
        "mnist", "notmnist", "fashion_mnist"}
    assert sources["train_outliers"] <= {"mnist", "cifar10"} and "cifar10" in sources["train_outliers"]
    ood_ids = {c["id"] for c in documents["train"]["categories"] if c["ood"]}
    for split in ("train", "val", "test_id"):
        assert not any(a["category_id"] in ood_ids for a in documents[split]["annotations"])
    splits_of = {s: {a["source_split"] for a in d["annotations"]} for s, d in documents.items()}
    assert splits_of["train"] == splits_of["val"] == splits_of["train_outliers"] == {"train"}
    assert splits_of["test_id"] == splits_of["test_ood"] == splits_of["test_mixed"] == {"test"}
    assert all(a["source_index"] % VAL_EVERY != VAL_EVERY - 1 for a in documents["train"]["annotations"])
    assert all(a["source_index"] % VAL_EVERY == VAL_EVERY - 1 for a in documents["val"]["annotations"])
    for image in documents["test_mixed"]["images"]:  # a mixed canvas holds both kinds
        kinds = {a["category_id"] in ood_ids for a in documents["test_mixed"]["annotations"]
                 if a["image_id"] == image["id"]}
        assert kinds == {True, False}


def test_boxes_are_inside_the_canvas_and_tight_around_the_pasted_alpha(small_bench) -> None:
    for split in ("train", "test_ood", "test_mixed", "train_outliers"):
        dataset = small_bench.dataset(split, seed=5)
        for index in range(len(dataset)):
            canvas = dataset.canvas(index)
            assert 1 <= len(canvas.boxes) <= 5
            for (x0, y0, x1, y1), alpha, origin in zip(canvas.boxes, canvas.alphas, canvas.origins, strict=True):
                assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
                mask = alpha > ALPHA_THRESHOLD
                inside = np.zeros_like(mask)
                inside[y0:y1, x0:x1] = True
                assert not (mask & ~inside).any()  # nothing above the threshold outside the box
                for edge in (mask[y0, x0:x1], mask[y1 - 1, x0:x1], mask[y0:y1, x0], mask[y0:y1, x1 - 1]):
                    assert edge.any()  # each edge of the box touches the object: tight
                if origin["source"] == "cifar10":  # a patch: opaque over exactly its box
                    assert (alpha[y0:y1, x0:x1] == 1).all() and alpha.sum() == (x1 - x0) * (y1 - y0)


def test_test_canvases_use_other_backgrounds_than_training_canvases(small_bench) -> None:
    maker = small_bench.dataset("train").maker
    train_images, train_positions = maker.backgrounds("train")
    _, test_positions = maker.backgrounds("test")
    assert len(train_positions) + len(test_positions) == len(train_images) == 1200
    assert set(train_positions).isdisjoint(test_positions)
    assert (test_positions % TEST_BACKGROUND_EVERY == TEST_BACKGROUND_EVERY - 1).all()


def test_the_datasets_targets_equal_the_json_and_the_pngs(written, small_bench) -> None:
    for split in ("val", "test_mixed", "train_outliers"):
        document = json.loads((written / split / "annotations.json").read_text())
        fly, disk = small_bench.dataset(split, seed=5), load_coco(written / split)
        assert len(fly) == len(disk) == len(document["images"])
        for index, image in enumerate(document["images"]):
            annotations = [a for a in document["annotations"] if a["image_id"] == image["id"]]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                                 dtype=torch.float32)
            labels = torch.tensor([a["category_id"] for a in annotations])  # ids 1..13 are the labels
            png = np.array(Image.open(written / split / "images" / image["file_name"]))
            for tensor, target in (fly[index], disk[index]):
                assert torch.equal(target["boxes"], boxes) and torch.equal(target["labels"], labels)
                assert target["image_id"] == image["id"]
                assert target["ood"].tolist() == [label > 10 for label in labels.tolist()]
                assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
                assert torch.equal((tensor * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(png))


def test_an_on_the_fly_dataset_pickles_for_worker_processes(small_bench) -> None:
    dataset = small_bench.dataset("test_mixed", seed=5)
    image, target = dataset[3]
    copy = pickle.loads(pickle.dumps(dataset))
    copy_image, copy_target = copy[3]
    assert torch.equal(copy_image, image) and torch.equal(copy_target["boxes"], target["boxes"])


def test_a_torchvision_detector_trains_on_a_batch(small_bench) -> None:
    torchvision = pytest.importorskip("torchvision")
    dataset = small_bench.dataset("test_mixed", seed=5)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=len(dataset.classes))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_the_writer_refuses_a_folder_in_use_and_replaces_a_benchmark(small_bench, written, tmp_path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        write_canvas_benchmark(small_bench, tmp_path / "notes")
    with pytest.raises(ConfigError, match="holds no benchmark.json"):
        write_canvas_benchmark(small_bench, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    small = small_bench.with_options(counts=dict.fromkeys(SPLITS, 1))
    target = write_canvas_benchmark(small, tmp_path / "b", seed=1)
    write_canvas_benchmark(small.with_options(counts={"train": 2}), target, seed=1, overwrite=True)
    assert len(list((target / "train" / "images").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder left


# ------------------------------------------------------------------------------------------ COCO loader errors


def _coco_folder(folder: Path) -> Path:
    """A valid two-image COCO folder: annotations.json + images/."""
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(folder / "images" / "a.png")
    Image.new("RGB", (20, 20), (200, 20, 30)).save(folder / "images" / "b.png")
    document = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                           {"id": 2, "file_name": "b.png", "width": 20, "height": 20}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 20], "iscrowd": 0},
                                {"id": 2, "image_id": 2, "category_id": 7, "bbox": [0, 0, 20, 20], "iscrowd": 0},
                                {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2], "iscrowd": 1}],
                "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "ufo", "ood": True}]}
    (folder / "annotations.json").write_text(json.dumps(document))
    return folder / "annotations.json"


def test_a_valid_coco_folder_loads(tmp_path) -> None:
    _coco_folder(tmp_path)
    dataset = load_coco(tmp_path)
    assert len(dataset) == 2 and dataset.classes == ["__background__", "cat", "ufo"]
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and torch.allclose(image[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    assert target["boxes"].tolist() == [[5, 5, 15, 25]] and target["labels"].tolist() == [1]
    _, second = dataset[1]  # the crowd annotation is left out; category 7 is label 2 and OOD
    assert second["labels"].tolist() == [2] and second["ood"].tolist() == [True]


def _break(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("case, expected", [
    ("missing image", "1 of 2 image files not found in .*images, the first 'b.png' \\(image id 2\\)"),
    ("box outside", "annotation 1 \\(image 'a.png'\\): bbox \\[35, 5, 10, 20\\] reaches outside the 40x30 image"),
    ("unknown category", "annotation 2 \\(image 'b.png'\\) has category id 9, which is not in 'categories'"),
    ("malformed JSON", "not valid JSON: Expecting ',' delimiter at line 1"),
])
def test_a_bad_coco_file_is_one_error_naming_it(tmp_path, case: str, expected: str) -> None:
    path = _coco_folder(tmp_path)
    if case == "missing image":
        (tmp_path / "images" / "b.png").unlink()
    elif case == "box outside":
        _break(path, lambda d: d["annotations"][0].update(bbox=[35, 5, 10, 20]))
    elif case == "unknown category":
        _break(path, lambda d: d["annotations"][1].update(category_id=9))
    else:
        path.write_text(path.read_text()[:-30].replace('"width": 40,', '"width": 40'))
    with pytest.raises(CocoFormatError, match=expected) as caught:
        load_coco(tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and message.startswith(f"{path}: ") and "\n" not in message


def test_other_coco_problems_name_the_file_too(tmp_path) -> None:
    path = _coco_folder(tmp_path)
    problems = {
        "a box of no area": (lambda d: d["annotations"][0].update(bbox=[1, 1, 0, 3]), "has no area"),
        "a box a pixel over the edge": (lambda d: d["annotations"][0].update(bbox=[30.5, 0, 10, 30]), None),
        "an unknown image": (lambda d: d["annotations"][0].update(image_id=5), "refers to image id 5"),
        "a size that differs from the file": (lambda d: d["images"][0].update(width=41), "is 40x30 pixels, but"),
        "no categories": (lambda d: d.pop("categories"), "no 'categories' list"),
    }
    original = path.read_text()
    for change, expected in problems.values():
        path.write_text(original)
        _break(path, change)
        if expected is None:  # within the 1-pixel tolerance: clipped to the image
            assert load_coco(tmp_path)[0][1]["boxes"].tolist() == [[30.5, 0, 40, 30]]
            continue
        with pytest.raises(CocoFormatError, match=expected) as caught:
            load_coco(path)
        assert str(caught.value).startswith(f"{path}: ")
