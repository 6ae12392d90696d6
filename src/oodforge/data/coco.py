"""COCO-format detection data: read a folder of images + a COCO JSON file, checked at the door, as a dataset.

The file is checked whole when it is loaded, before any training: malformed JSON, a missing key, an image file
that is missing or whose size differs from the file's ``width``/``height``, an annotation of an unknown image or
category, an empty box or a box outside its image each stop with one ``CocoFormatError`` line naming the file.
A box may reach past the image edge by at most ``BOX_TOLERANCE`` pixels (rounding in labelling tools); such a box
is clipped to the image. Crowd annotations (``iscrowd: 1``) are checked, then left out of the targets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from oodforge.data.decoding import CorruptImageError, as_array, decode_pil
from oodforge.data.detection import DetectionDataset, DetectionRecord, Transform, xyxy_to_xywh
from oodforge.util.errors import ConfigError, MissingPathError

ANNOTATIONS = "annotations.json"  # the COCO file a folder holds, beside its ``images/`` folder
IMAGES = "images"
BOX_TOLERANCE = 1.0


class CocoFormatError(ConfigError):
    """A COCO annotation file (or one of its images) that cannot be used; the message names the file."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def read_coco_json(path: Path) -> dict:
    """The COCO document in ``path``: an object with ``images``, ``annotations`` and ``categories`` lists."""
    if not path.is_file():
        raise MissingPathError(f"COCO annotation file not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CocoFormatError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CocoFormatError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
                              ) from None
    if not isinstance(document, dict):
        raise CocoFormatError(f"{path}: a COCO file must hold a JSON object, got {type(document).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise CocoFormatError(f"{path}: no {key!r} list")
    return document


def check_categories(document: dict, path: Path) -> dict[int, dict]:
    """Category id -> category; each needs an integer ``id`` (given once) and a ``name``."""
    categories: dict[int, dict] = {}
    for position, category in enumerate(document["categories"]):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or "name" not in category:
            raise CocoFormatError(f"{path}: category {position} needs an integer 'id' and a 'name'")
        if category["id"] in categories:
            raise CocoFormatError(f"{path}: category id {category['id']} is given twice")
        categories[category["id"]] = category
    if not categories:
        raise CocoFormatError(f"{path}: the 'categories' list is empty")
    return categories


def check_images(document: dict, path: Path, folder: Path) -> dict[int, dict]:
    """Image id -> image entry; each needs ``id``, ``file_name``, ``width`` and ``height``, and its file must be
    under ``folder`` with that size."""
    images: dict[int, dict] = {}
    for position, image in enumerate(document["images"]):
        if not (isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str)
                and _is_int(image.get("width")) and _is_int(image.get("height"))
                and image["width"] > 0 and image["height"] > 0):
            raise CocoFormatError(f"{path}: image {position} needs an integer 'id', a 'file_name' and positive "
                                  "integer 'width' and 'height'")
        if image["id"] in images:
            raise CocoFormatError(f"{path}: image id {image['id']} is given twice")
        images[image["id"]] = image
    missing = [image for image in images.values() if not (folder / image["file_name"]).is_file()]
    if missing:
        raise CocoFormatError(f"{path}: {len(missing)} of {len(images)} image files not found in {folder}, the "
                              f"first {missing[0]['file_name']!r} (image id {missing[0]['id']})")
    for image in images.values():
        _check_size(image, path, folder)
    return images


def _check_size(image: dict, path: Path, folder: Path) -> None:
    """The image file's size (read from its header) must be the entry's ``width`` x ``height``."""
    file = folder / image["file_name"]
    try:
        with Image.open(file) as opened:
            size = opened.size
    except (UnidentifiedImageError, OSError) as exc:
        raise CocoFormatError(f"{path}: image {image['file_name']!r} cannot be read: {exc}") from None
    if size != (image["width"], image["height"]):
        raise CocoFormatError(f"{path}: image {image['file_name']!r} is {size[0]}x{size[1]} pixels, but the file "
                              f"says {image['width']}x{image['height']}")


def check_annotations(document: dict, path: Path, images: dict[int, dict], categories: dict[int, dict]
                      ) -> dict[int, list[tuple[list[float], int]]]:
    """Image id -> [(xyxy box clipped to the image, category id)] of the non-crowd annotations, every one checked."""
    found: dict[int, list[tuple[list[float], int]]] = {image_id: [] for image_id in images}
    for position, annotation in enumerate(document["annotations"]):
        name = f"annotation {annotation.get('id', position)}" if isinstance(annotation, dict) else \
            f"annotation {position}"
        if not isinstance(annotation, dict):
            raise CocoFormatError(f"{path}: {name} is not a JSON object")
        image = images.get(annotation.get("image_id")) if _is_int(annotation.get("image_id")) else None
        if image is None:
            raise CocoFormatError(f"{path}: {name} refers to image id {annotation.get('image_id')!r}, which is "
                                  "not in 'images'")
        category = annotation.get("category_id")
        if not _is_int(category) or category not in categories:
            raise CocoFormatError(f"{path}: {name} (image {image['file_name']!r}) has category id {category!r}, "
                                  f"which is not in 'categories' (ids {sorted(categories)})")
        box = check_box(annotation.get("bbox"), image, f"{path}: {name} (image {image['file_name']!r})")
        if annotation.get("iscrowd", 0) not in (0, 1):
            raise CocoFormatError(f"{path}: {name}: 'iscrowd' must be 0 or 1, got {annotation['iscrowd']!r}")
        if annotation.get("iscrowd", 0) == 0:
            found[image["id"]].append((box, category))
    return found


def check_box(bbox: object, image: dict, where: str) -> list[float]:
    """A COCO ``[x, y, w, h]`` inside ``image`` (give or take ``BOX_TOLERANCE``) as an xyxy box clipped to it."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise CocoFormatError(f"{where}: 'bbox' must be four numbers [x, y, width, height], got {bbox!r}")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise CocoFormatError(f"{where}: bbox {bbox} has no area (width and height must be positive)")
    width, height = image["width"], image["height"]
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        raise CocoFormatError(f"{where}: bbox {bbox} reaches outside the {width}x{height} image")
    box = [max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise CocoFormatError(f"{where}: bbox {bbox} lies outside the {width}x{height} image")
    return box


def locate_coco(path: str | Path, images: str | Path | None = None) -> tuple[Path, Path]:
    """(COCO file, image folder) of ``path``: a COCO JSON file, or a folder holding ``annotations.json``.

    The image folder is ``images`` when given, else ``images/`` beside the COCO file when it exists, else the
    COCO file's own folder; ``file_name`` entries are relative to it.
    """
    path = Path(path).expanduser()
    annotation_file = path / ANNOTATIONS if path.is_dir() else path
    if not annotation_file.is_file():
        where = f"no {ANNOTATIONS} in folder {path}" if path.is_dir() else f"not found: {path}"
        raise MissingPathError(f"COCO annotation file {where}")
    if images is not None:
        folder = Path(images).expanduser()
        if not folder.is_dir():
            raise MissingPathError(f"image folder not found: {folder}")
        return annotation_file, folder
    beside = annotation_file.parent / IMAGES
    return annotation_file, beside if beside.is_dir() else annotation_file.parent


class CocoDataset(DetectionDataset):
    """The images and boxes of a checked COCO file; images are decoded from disk as items are read."""

    def __init__(self, annotation_file: Path, image_folder: Path, document: dict,
                 transforms: Transform | None = None) -> None:
        self.annotation_file = annotation_file
        self.image_folder = image_folder
        self.categories = document["categories"]
        self.images = document["images"]
        self._objects = document["objects"]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def record(self, index: int) -> DetectionRecord:
        """The decoded image, boxes and category ids of the ``index``-th entry of ``images``."""
        entry = self.images[index]
        file = self.image_folder / entry["file_name"]
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise CorruptImageError(f"cannot read image {file}: {exc.strerror or exc}") from None
        image = as_array(decode_pil(data, str(file)).convert("RGB"))
        objects = self._objects[entry["id"]]
        boxes = np.asarray([box for box, _ in objects], np.float64).reshape(-1, 4)
        return DetectionRecord(image, boxes, np.asarray([c for _, c in objects], np.int64), int(entry["id"]))


def load_coco(path: str | Path, images: str | Path | None = None, transforms: Transform | None = None
              ) -> CocoDataset:
    """A COCO-format folder (``annotations.json`` + ``images/``) or JSON file as a checked detection dataset."""
    annotation_file, folder = locate_coco(path, images)
    document = read_coco_json(annotation_file)
    categories = check_categories(document, annotation_file)
    image_entries = check_images(document, annotation_file, folder)
    objects = check_annotations(document, annotation_file, image_entries, categories)
    checked = {"categories": list(categories.values()), "images": list(image_entries.values()), "objects": objects}
    return CocoDataset(annotation_file, folder, checked, transforms)


def coco_annotation(annotation_id: int, image_id: int, box: np.ndarray, category_id: int, **extra: object) -> dict:
    """One COCO annotation of an xyxy ``box``: ``bbox`` [x, y, w, h], ``area`` w * h, ``iscrowd`` 0, and ``extra``."""
    x, y, w, h = (v.item() for v in xyxy_to_xywh(np.asarray(box))[0])
    bbox = [int(v) if float(v).is_integer() else float(v) for v in (x, y, w, h)]
    return {"id": annotation_id, "image_id": image_id, "category_id": int(category_id), "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": 0, **extra}


def coco_document(description: str, images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    """A COCO detection document (no dates or versions in it, so the same content gives the same bytes)."""
    return {"info": {"description": description}, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}
