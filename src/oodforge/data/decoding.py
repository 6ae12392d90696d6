"""Decoding image bytes and fitting images to a benchmark's shape, shared by in-memory and streamed sets."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from oodforge.util.errors import DataError


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""


def archive_error(archive: object, exc: BaseException) -> CorruptImageError:
    """One line naming an archive that cannot be read, with the first line of the reader's complaint."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
    return CorruptImageError(f"cannot read archive {archive}: {reason}")


def decode_pil(data: bytes, source: str) -> Image.Image:
    """Decode image bytes to a PIL image in mode ``RGB`` or ``L``; errors name ``source``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bits
                wide = np.asarray(image, dtype=np.float64)
                scaled = np.clip(np.rint(wide / (257.0 if wide.max() <= 65535 else 16843009.0)), 0, 255)
                return Image.fromarray(scaled.astype(np.uint8), "L")
            return image.convert("L" if image.mode in ("L", "1", "LA") else "RGB")
    except Image.DecompressionBombError as exc:  # not an OSError: would otherwise escape unnamed
        raise CorruptImageError(f"cannot decode image {source}: it is larger than PIL's size limit "
                                f"({str(exc).rstrip('.')})") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CorruptImageError(f"cannot decode image {source}: {exc}") from exc


def as_array(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, C) array of an ``L`` or ``RGB`` image (writable)."""
    array = np.array(image)
    return array[:, :, None] if array.ndim == 2 else array


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Decode image bytes to uint8 (H, W, C) RGB or (H, W, 1) grayscale; errors name ``source``."""
    return as_array(decode_pil(data, source))


def fit_image(image: Image.Image, shape: tuple[int, int, int], resize: str = "stretch") -> np.ndarray:
    """A PIL image converted to ``shape`` = (H, W, C): channels (gray <-> RGB), then resized (antialiased).

    ``stretch`` resizes to (H, W) directly; ``shorter_crop`` resizes the shorter side to H and
    centre-crops H x W (torchvision's ``Resize(H)`` + ``CenterCrop``).
    """
    height, width, channels = shape
    image = image.convert("RGB" if channels == 3 else "L")
    if image.size != (width, height):
        if resize == "stretch":
            image = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
        else:
            w, h = image.size
            scale = height / min(w, h)
            size = (max(width, round(w * scale)), max(height, round(h * scale)))
            image = image.resize(size, Image.BILINEAR)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            image = image.crop((left, top, left + width, top + height))
    return as_array(image)


def decode_fitted(data: bytes, source: str, shape: tuple[int, int, int] | None, resize: str = "stretch"
                  ) -> np.ndarray:
    """Decode, and bring to ``shape`` when given, in one step (no full-size array is kept)."""
    image = decode_pil(data, source)
    return as_array(image) if shape is None else fit_image(image, shape, resize)
