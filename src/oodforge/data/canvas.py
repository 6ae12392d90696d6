"""Compose one detection canvas: a background crop with objects pasted on it, each with its tight box.

Two kinds of object: **strokes** (a grayscale image such as an MNIST digit) are alpha-blended in one colour with
alpha = pixel intensity / 255, and their box is tight around the pasted pixels whose alpha is above
``ALPHA_THRESHOLD``; **patches** (an RGB image such as a CIFAR-10 photo) are pasted opaque, and their box is the
patch. Boxes are ``(x0, y0, x1, y1)`` in pixels, the end exclusive: the object covers columns ``x0 .. x1 - 1``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

ALPHA_THRESHOLD = 0.1  # a stroke pixel belongs to its object's box when its alpha (intensity / 255) is above this
PLACEMENT_TRIES = 50  # positions and sizes tried for one object before it is left out of a crowded canvas
MIN_SIDE = 4  # the smallest pasted square, in pixels


@dataclass(frozen=True)
class ObjectImage:
    """One source image to paste: uint8 (h, w, 1) strokes or (h, w, 3) patch, its category and where it came from."""

    pixels: np.ndarray
    category_id: int
    origin: dict = field(default_factory=dict)

    @property
    def is_strokes(self) -> bool:
        """Whether the image is grayscale strokes (alpha-blended) rather than an RGB patch (opaque)."""
        return self.pixels.shape[2] == 1


@dataclass
class Canvas:
    """A composed canvas: uint8 (S, S, 3) image, int64 (N, 4) xyxy boxes, int64 (N,) category ids, and per
    object its origin and its pasted alpha over the whole canvas (float32 (S, S))."""

    image: np.ndarray
    boxes: np.ndarray
    category_ids: np.ndarray
    origins: list[dict]
    alphas: list[np.ndarray]
    slots: list[int]  # which of the requested objects were placed (a crowded canvas may leave some out)


def background_crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (half to all of the shorter side) of ``texture`` resized to ``size`` x ``size`` RGB."""
    if texture.shape[2] == 1:
        texture = np.repeat(texture, 3, axis=2)
    height, width = texture.shape[:2]
    shorter = min(height, width)
    side = int(rng.integers(max(1, shorter // 2), shorter + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(texture[top:top + side, left:left + side]))
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def resized(pixels: np.ndarray, side: int) -> np.ndarray:
    """``pixels`` (h, w, C) uint8 resized to (side, side, C) with bilinear filtering."""
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    array = np.asarray(image.resize((side, side), Image.BILINEAR))
    return array[:, :, None] if array.ndim == 2 else array


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (ends exclusive) of the True pixels of a 2-D mask; None when none is True."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright RGB colour (float32 in [0, 255]): hue uniform, saturation 0.5-1, value 0.7-1."""
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0)
    return np.asarray(colorsys.hsv_to_rgb(hue, saturation, value), np.float32) * 255.0


def object_layer(item: ObjectImage, side: int, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha float32 (side, side), RGB float32 (side, side, 3)) of ``item`` pasted at ``side`` pixels."""
    pixels = resized(item.pixels, side)
    if item.is_strokes:
        alpha = pixels[:, :, 0].astype(np.float32) / 255.0
        return alpha, np.broadcast_to(colour, (side, side, 3))
    return np.ones((side, side), np.float32), pixels.astype(np.float32)


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two xyxy boxes."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def compose(background: np.ndarray, draws: list[Callable[[np.random.Generator], ObjectImage]],
            scale: tuple[float, float], max_overlap: float, rng: np.random.Generator) -> Canvas:
    """Paste one object from each of ``draws`` on ``background`` (uint8 (S, S, 3)) at random places and sizes.

    An object's side is ``scale`` (a range of fractions of S); the pasted squares of two objects overlap by at most
    ``max_overlap`` (IoU), and an object that finds no such place in ``PLACEMENT_TRIES`` tries is left out.
    """
    size = background.shape[0]
    canvas = background.astype(np.float32)
    squares, boxes, categories, origins, alphas, slots = [], [], [], [], [], []
    for slot, draw in enumerate(draws):
        item = draw(rng)
        colour = random_colour(rng)
        for _ in range(PLACEMENT_TRIES):
            side = min(size, max(MIN_SIDE, round(float(rng.uniform(*scale)) * size)))
            top, left = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            square = (left, top, left + side, top + side)
            if any(overlap(square, other) > max_overlap for other in squares):
                continue
            alpha, layer = object_layer(item, side, colour)
            box = tight_box(alpha > ALPHA_THRESHOLD)
            if box is None:  # strokes too faint at this size: try another
                continue
            region = canvas[top:top + side, left:left + side]
            region += alpha[:, :, None] * (layer - region)
            full = np.zeros((size, size), np.float32)
            full[top:top + side, left:left + side] = alpha
            squares.append(square)
            boxes.append((box[0] + left, box[1] + top, box[2] + left, box[3] + top))
            categories.append(item.category_id)
            origins.append(item.origin)
            alphas.append(full)
            slots.append(slot)
            break
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Canvas(image, np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(categories, np.int64),
                  origins, alphas, slots)
