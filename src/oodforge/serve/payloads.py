"""Reading a predict request: images as multipart files (field ``file``, repeatable) or JSON
``{"images": [base64, ...]}``, each decoded with a pixel limit and brought to the guard's input. Anything wrong is
a ``RequestError`` with an HTTP status and a one-line message naming the image."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from oodforge.data.decoding import fit_image
from oodforge.deploy.inputs import Preprocessing


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def images_from_json(body: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of ``{"images": [base64, ...]}``."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RequestError(400, 'the JSON body must be an object {"images": [base64 strings]}')
    out = []
    for i, item in enumerate(data["images"]):
        if not isinstance(item, str):
            raise RequestError(400, f"image {i}: expected a base64 string, got {type(item).__name__}")
        try:
            out.append((str(i), base64.b64decode(item, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"image {i}: not valid base64") from None
    return out


def decode(data: bytes, name: str, prep: Preprocessing, max_pixels: int) -> Tensor:
    """One image's bytes -> float (C, H, W) in [0, 1] at the guard's size; refused past ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(413, f"image {name}: {width} x {height} pixels is more than the limit of "
                                        f"{max_pixels}")
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, f"image {name}: too many pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).split(" <_io")[0] if "cannot identify" in str(exc) else str(exc).splitlines()[0]
        raise RequestError(400, f"image {name}: not an image that can be decoded ({reason})") from None
    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
    pixels = fit_image(image, prep.image_shape, prep.resize)
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(255.0)
