"""The one image decoder of every image-file source: Pillow.

JPEG (Ravi & Larochelle's MiniImageNet, image folders), PNG (tieredImageNet's PNG-bytes
pickles, Omniglot, image folders) and any other format Pillow reads are decoded by
:func:`decode_image`, always with the same library, so one file gives the same pixels
whichever dataset reads it. Pillow decodes JPEG with the libjpeg(-turbo) it ships
(:data:`DECODER` names the versions). Images whose size differs from the wanted size are
resized with Pillow's Lanczos filter (as MAML's ``proc_images.py`` resized MiniImageNet to
84 x 84); images of the wanted size are used as decoded, unresampled.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

from l2l_adversarial.data.errors import DatasetFileError

__all__ = ["DECODER", "decode_image"]

#: The decoder, by name and version: Pillow and the JPEG library it was built with.
_TURBO = features.version_feature("libjpeg_turbo")
DECODER = (
    f"Pillow {PIL.__version__} (JPEG: "
    + (f"libjpeg-turbo {_TURBO}" if _TURBO else f"libjpeg {features.version_codec('jpg')}")
    + f"; PNG: zlib {features.version_codec('zlib')})"
)

#: File name endings read as images by folder datasets (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def decode_image(
    source: bytes | np.ndarray | str | os.PathLike[str],
    *,
    size: tuple[int, int] | None,
    mode: str = "RGB",
    where: str,
    hint: str = "",
) -> np.ndarray:
    """Decode one image to a uint8 C x H x W array (C = 3 for ``"RGB"``, 1 for ``"L"``).

    ``source``: a path, or the encoded bytes (bytes or a uint8 array, as in tieredImageNet's
    pickles). ``size`` is (height, width); None keeps the decoded size. ``where`` names the
    image in errors; ``hint`` ends them.
    """
    try:
        if isinstance(source, str | os.PathLike):
            handle: io.BytesIO | Path = Path(source)
        else:
            buffer = source.tobytes() if isinstance(source, np.ndarray) else bytes(source)
            handle = io.BytesIO(buffer)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                image.load()
                converted = image.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as err:
        raise DatasetFileError(
            f"{where} is not a readable image ({type(err).__name__}: {err}): a truncated, "
            f"empty or non-image file. Replace or delete it. {hint}".rstrip()
        ) from err
    if size is not None and converted.size != (size[1], size[0]):
        converted = converted.resize((size[1], size[0]), resample=Image.Resampling.LANCZOS)
    array = np.asarray(converted, dtype=np.uint8)
    if array.ndim == 2:
        return array[None].copy()
    return np.ascontiguousarray(array.transpose(2, 0, 1))
