"""Image resizing that reproduces the two backends of transformers' DeformableDetrImageProcessor.

transformers 5 ships the processor twice: `DeformableDetrImageProcessor` (the default whenever
torchvision is installed) resizes with torchvision's `resize(antialias=True)`, and
`DeformableDetrImageProcessorPil` (what the same name falls back to without torchvision) resizes
with `PIL.Image.resize(BILINEAR)`. The two disagree by one grey level on about 0.1-1% of the
values of a uint8 photo, so this file offers both:

- `"torchvision"`: a numpy port of ATen's antialiased bilinear resampling
  (`aten/src/ATen/native/cpu/UpSampleKernel.cpp`: `_compute_indices_min_size_weights_aa`, and for
  uint8 `_compute_index_ranges_int16_weights` with the Pillow-SIMD fixed-point passes that the
  AVX2, AVX-512 and NEON kernels run; bit-exact). Horizontal pass first, then vertical, as ATen
  does. Float images use ATen's weights in the image's float dtype (equal up to the rounding of
  the sums, which ATen contracts into FMAs).
- `"pil"`: the exact PIL call transformers' PIL backend makes, including its quantisation of float
  images to uint8 around the resize (`transformers.image_transforms.resize`).

Images here are channels-last `[height, width, 3]`.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image

BILINEAR = int(PIL.Image.Resampling.BILINEAR)
BACKENDS = ("torchvision", "pil")


# ----------------------------------------------------------------------------- output sizes


def size_for_shortest_longest(
    image_size: tuple[int, int], shortest_edge: int, longest_edge: int | None
) -> tuple[int, int]:
    """(height, width) with the short side `shortest_edge`, the long side at most `longest_edge`.

    `transformers.image_transforms.get_size_with_aspect_ratio`, rounding included.
    """
    height, width = image_size
    size = shortest_edge
    raw_size = None
    if longest_edge is not None:
        min_original = float(min(height, width))
        max_original = float(max(height, width))
        if max_original / min_original * size > longest_edge:
            raw_size = longest_edge * min_original / max_original
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        new_width = size
        new_height = int((raw_size if raw_size is not None else size) * height / width)
    else:
        new_height = size
        new_width = int((raw_size if raw_size is not None else size) * width / height)
    return new_height, new_width


def size_for_max_height_width(
    image_size: tuple[int, int], max_height: int, max_width: int
) -> tuple[int, int]:
    """Largest (height, width) with the image's aspect ratio inside `max_height` x `max_width`.

    `transformers.image_utils.get_image_size_for_max_height_width` (it also upsizes small images).
    """
    height, width = image_size
    scale = min(max_height / height, max_width / width)
    return int(height * scale), int(width * scale)


def output_size(image_size: tuple[int, int], size: dict[str, int]) -> tuple[int, int]:
    """Resized (height, width) of an image of `image_size` under a processor `size` dict."""
    if "shortest_edge" in size:
        new = size_for_shortest_longest(image_size, size["shortest_edge"], size.get("longest_edge"))
    elif "max_height" in size:
        new = size_for_max_height_width(image_size, size["max_height"], size["max_width"])
    else:
        new = (size["height"], size["width"])
    if min(new) < 1:
        raise ValueError(
            f"an image of (height, width) {tuple(image_size)} resizes to {new} under size={size}: "
            "its aspect ratio is too extreme for this size setting"
        )
    return new


# ----------------------------------------------------------------------------- torchvision (ATen)


def _aa_bilinear_weights(
    in_size: int, out_size: int, dtype=np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights `[out_size, ksize]` of ATen's antialiased triangle filter.

    `_compute_indices_min_size_weights_aa<scalar_t>` with align_corners=False and no explicit scale
    (torchvision passes the output size), in ATen's mix of `scalar_t` (float32 for float32 images,
    float64 for float64 and uint8 images) and double arithmetic. Taps past `xsize` get weight 0 and
    a clamped index so that they can be gathered unconditionally.
    """
    f = np.dtype(dtype).type
    scale = f(in_size) / f(out_size)
    support = scale if scale >= 1.0 else f(1.0)  # interp_size 2 * 0.5, widened when downsampling
    invscale = f(1.0 / float(scale)) if scale >= 1.0 else f(1.0)
    ksize = int(math.ceil(support)) * 2 + 1
    center = (float(scale) * (np.arange(out_size, dtype=np.float64) + 0.5)).astype(f)
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xmax = ((center + support).astype(np.float64) + 0.5).astype(np.int64)
    xsize = np.clip(np.minimum(xmax, in_size) - xmin, 0, ksize)
    taps = np.arange(ksize)
    # (out_size, ksize) filter argument, then the triangle 1 - |x| (computed in double, stored as f)
    x = ((taps[None, :] + xmin[:, None]).astype(f) - center[:, None]).astype(np.float64) + 0.5
    x = np.abs((x * float(invscale)).astype(f))
    weights = np.where(x < 1.0, (1.0 - x.astype(np.float64)).astype(f), f(0.0))
    weights = np.where(taps[None, :] < xsize[:, None], weights, f(0.0))
    total = np.zeros(out_size, dtype=f)
    for j in range(ksize):  # ATen sums the taps in order; keep its rounding
        total = total + weights[:, j]
    safe_total = np.where(total == 0.0, f(1.0), total)
    weights = np.where(total[:, None] != 0.0, weights / safe_total[:, None], weights)
    index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1)
    return index, weights


def _int16_weights(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """ATen's `_compute_index_ranges_int16_weights`: int16 weights with Pillow-SIMD's precision."""
    max_weight = float(weights.max())
    precision = 0
    while precision < 22:
        if int(0.5 + max_weight * (1 << (precision + 1))) >= (1 << 15):
            break
        precision += 1
    scaled = weights * (1 << precision)
    rounded = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    return rounded.astype(np.int32), precision


def _resample_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass along `axis` (0: height, 1: width) of a `[height, width, 3]` image.

    uint8: Pillow-SIMD fixed point as in ATen's uint8 kernels. float32/float64: ATen's
    `basic_loop_aa_*` sum of taps in the image dtype.
    """
    broadcast = (slice(None), None, None) if axis == 0 else (None, slice(None), None)
    if image.dtype == np.uint8:
        index, weights = _aa_bilinear_weights(image.shape[axis], out_size, np.float64)
        int_weights, precision = _int16_weights(weights)
        shape = list(image.shape)
        shape[axis] = out_size
        acc = np.full(shape, 1 << (precision - 1), dtype=np.int32)
        for j in range(index.shape[1]):
            acc += (
                np.take(image, index[:, j], axis=axis).astype(np.int32)
                * int_weights[:, j][broadcast]
            )
        return np.clip(acc >> precision, 0, 255).astype(np.uint8)
    index, weights = _aa_bilinear_weights(image.shape[axis], out_size, image.dtype)
    acc = np.take(image, index[:, 0], axis=axis) * weights[:, 0][broadcast]
    for j in range(1, index.shape[1]):
        acc += np.take(image, index[:, j], axis=axis) * weights[:, j][broadcast]
    return acc


def resize_torchvision(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`torchvision.transforms.v2.functional.resize(antialias=True, BILINEAR)` on a CPU tensor.

    uint8 in, uint8 out (ATen's native uint8 path, taken on x86 with AVX2/AVX-512 and on ARM);
    float in, same float dtype out (float16 is resampled in float32 and cast back, as torchvision
    does).
    """
    in_height, in_width = image.shape[:2]
    if (in_height, in_width) == (height, width):
        return image
    dtype = image.dtype
    out = image.astype(np.float32) if dtype == np.float16 else image
    if width != in_width:
        out = _resample_axis(out, 1, width)
    if height != in_height:
        out = _resample_axis(out, 0, height)
    return out.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- PIL


def _pil_needs_rescale(image: np.ndarray) -> bool:
    """`transformers.image_transforms._rescale_for_pil_conversion`: are floats in [0, 1] (x255)?"""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(
            "the image has values outside [0, 255] "
            f"([{image.min()}, {image.max()}]) and cannot be resized with PIL"
        )
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(
        "a float image with non-integer values must lie in [0, 1] to be resized with PIL, "
        f"got [{image.min()}, {image.max()}]"
    )


def resize_pil(image: np.ndarray, height: int, width: int, resample: int = BILINEAR) -> np.ndarray:
    """`transformers.image_transforms.resize`: PIL resize of the image as uint8.

    Float images are quantised to uint8 for PIL (x255 first when they lie in [0, 1], then truncated)
    and come back as float32 (/255 again), exactly as transformers' PIL backend does. The result is
    uint8 for uint8 input, float32 otherwise.
    """
    rescale = _pil_needs_rescale(image)
    pixels = image
    if rescale:
        pixels = (pixels.astype(np.float64) * 255).astype(np.float32)
    pil = PIL.Image.fromarray(pixels.astype(np.uint8))
    out = np.array(pil.resize((width, height), resample=resample))
    if rescale:
        return (out.astype(np.float64) * (1 / 255)).astype(np.float32)
    if image.dtype != np.uint8:
        return out.astype(np.float32)
    return out


def resize(image: np.ndarray, height: int, width: int, *, backend: str, resample: int = BILINEAR):
    """Resize a `[height, width, 3]` image the way the chosen transformers backend does."""
    if backend == "torchvision":
        if resample != BILINEAR:
            raise ValueError(
                f"backend 'torchvision' resizes bilinearly only, got resample={resample}"
            )
        return resize_torchvision(image, height, width)
    if backend == "pil":
        return resize_pil(image, height, width, resample)
    raise ValueError(f"unknown resize backend {backend!r}; expected one of {BACKENDS}")
