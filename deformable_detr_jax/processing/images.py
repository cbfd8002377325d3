"""Any image a user hands over (path, PIL image, array; gray, RGBA, 16-bit) -> an RGB uint8 array,
or one `ImageError` naming the image and what is wrong. NumPy and PIL only."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

ImageLike = Union[PIL.Image.Image, np.ndarray, str, os.PathLike]  # noqa: UP007 (py3.10 alias)


class ImageError(ValueError):
    """An input image that cannot be used: unreadable or empty file, bad shape, dtype, channels."""


def describe_image(index: int, image: Any) -> str:
    """How errors name an input image: `"image 3"`, or `"image 3 ('cat.jpg')"` for a path."""
    if isinstance(image, (str, os.PathLike)):
        return f"image {index} ({os.fspath(image)!r})"
    return f"image {index}"


def _open(path: str | os.PathLike, name: str) -> PIL.Image.Image:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageError(f"{name}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)  # as transformers.image_utils.load_image
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        # UnidentifiedImageError and truncated files are OSErrors
        raise ImageError(
            f"{name}: cannot be read as an image ({type(err).__name__}: {err})"
        ) from err


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """`transformers.image_transforms.convert_to_rgb`: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return np.array(image.convert("RGB"))


def _rgba_to_rgb(image: np.ndarray, backend: str) -> np.ndarray:
    """Composite an RGBA array onto white as the chosen transformers backend does."""
    is_float = np.issubdtype(image.dtype, np.floating)
    if backend == "torchvision":  # TorchvisionBackend.convert_to_rgb: float32, x 255.999 truncated
        pixels = image.astype(np.float32)
        if not is_float:
            pixels = pixels * np.float32(1 / 255)
        alpha = pixels[..., 3:]
        rgb = pixels[..., :3] * alpha + (np.float32(1) - alpha)
        if is_float:
            return rgb.astype(image.dtype)
        return (rgb * np.float32(255 + 1.0 - 1e-3)).astype(np.uint8)
    white = 1.0 if is_float else 255  # image_transforms.convert_to_rgb: float64 blend, rounded
    alpha = image[..., 3:4] / white
    rgb = alpha * image[..., :3] + (1 - alpha) * white
    return rgb.astype(image.dtype) if is_float else np.round(rgb).astype(image.dtype)


def to_rgb_array(image: Any, name: str, backend: str) -> np.ndarray:
    """One input image as a `[height, width, 3]` uint8 or float array, checked."""
    if isinstance(image, (str, os.PathLike)):
        image = _open(image, name)
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ImageError(f"{name} is empty: PIL size (width, height) = {image.size}")
        return _pil_to_rgb(image)
    if not (isinstance(image, np.ndarray) or hasattr(image, "__array__")):
        raise TypeError(
            f"{name} has type {type(image).__name__}; expected a PIL image, a numpy array "
            "[height, width(, channels)] or a file path"
        )
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ImageError(
            f"{name} has shape {array.shape}; expected [height, width] or [height, width, channels]"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name} has shape {array.shape}: zero height or width")
    if array.dtype not in (np.uint8, np.float16, np.float32, np.float64):
        raise ImageError(
            f"{name} has dtype {array.dtype}; expected uint8 (0..255) or float16/32/64"
        )
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels not in (1, 3, 4):
        raise ImageError(
            f"{name} has {channels} channels (shape {array.shape}); expected 1 (grayscale), "
            "3 (RGB) or 4 (RGBA) on the last axis: arrays are [height, width, channels]"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageError(f"{name} contains NaN or infinite values")
        if channels == 4 and (array.min() < 0.0 or array.max() > 1.0):
            raise ImageError(
                f"{name} is a float RGBA image with values in [{array.min()}, {array.max()}]; "
                "its alpha compositing needs values in [0, 1]"
            )
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        return _rgba_to_rgb(array, backend)
    return array


def as_image_list(images: Any) -> list[Any]:
    """One image, a list of them or a `[bs, height, width, channels]` batch -> a list of images.

    Raises:
      ValueError: an empty list.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given (empty list)")
        return list(images)
    if getattr(images, "ndim", None) == 4 and hasattr(images, "__array__"):
        return list(np.asarray(images))  # a [bs, height, width, channels] batch
    return [images]
