"""What a `Detector` returns for one image (`Detections`) and how it is drawn (`draw_detections`).

NumPy and PIL only.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from deformable_detr_jax.processing.image_processor import ImageError, ImageLike, ImageProcessor


@dataclasses.dataclass(frozen=True)
class Detections:
    """Detections in one image, highest score first.

    Attributes:
      boxes: `[n, 4]` float32 (x0, y0, x1, y1) in pixels of the input image (not clipped to it,
        as transformers).
      scores: `[n]` float32 in (threshold, 1].
      labels: `[n]` int64 class ids.
      label_names: `n` names from the config's `id2label` (`"LABEL_{id}"` where it has none).
      image_size: (height, width) of the input image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready `[{"label", "label_id", "score", "box": [x0, y0, x1, y1]}, ...]`."""
        return [
            {
                "label": name,
                "label_id": int(label),
                "score": float(score),
                "box": [float(v) for v in box],
            }
            for name, label, score, box in zip(
                self.label_names, self.labels, self.scores, self.boxes
            )
        ]

    def __str__(self) -> str:
        lines = [f"{len(self)} detection(s) in a {self.image_size[0]}x{self.image_size[1]} image"]
        for item in self.to_list():
            box = ", ".join(f"{v:.1f}" for v in item["box"])
            lines.append(f"  {item['label']:<16s} {item['score']:.3f}  [{box}]")
        return "\n".join(lines)


# Distinct colours (Tableau 10 + a few), picked by label id.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 128),
    (128, 128, 0),
    (0, 128, 128),
    (128, 0, 128),
    (255, 215, 0),
)


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return PIL.ImageFont.load_default()


def draw_detections(
    image: ImageLike,
    detections: Detections,
    *,
    line_width: int | None = None,
    font_size: int | None = None,
) -> PIL.Image.Image:
    """A copy of `image` (PIL, `[height, width, 3]` array with uint8 or 0..255 float values, or a
    path) with each detection's box and "label score" drawn on it. Line width and font size scale
    with the image unless given."""
    if isinstance(image, (str, os.PathLike)):
        image = ImageProcessor().load_image(image)
    if isinstance(image, PIL.Image.Image):
        canvas = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ImageError(f"draw needs a [height, width, 3] RGB image, got shape {array.shape}")
        canvas = PIL.Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if not isinstance(detections, Detections):
        raise TypeError(f"detections must be a Detections, got {type(detections).__name__}")
    if (canvas.height, canvas.width) != tuple(detections.image_size):
        raise ValueError(
            f"the image is {canvas.height}x{canvas.width} (height x width) but the detections "
            f"were made on a {detections.image_size[0]}x{detections.image_size[1]} image; draw "
            "on the image that was detected"
        )
    side = max(canvas.size)
    line_width = line_width or max(1, round(side / 400))
    font = _font(font_size or max(10, round(side / 60)))
    draw = PIL.ImageDraw.Draw(canvas)
    for box, score, label, name in zip(
        detections.boxes, detections.scores, detections.labels, detections.label_names
    ):
        color = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = sorted((min(max(x0, 0), canvas.width - 1), min(max(x1, 0), canvas.width - 1)))
        y0, y1 = sorted((min(max(y0, 0), canvas.height - 1), min(max(y1, 0), canvas.height - 1)))
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line_width)
        text = f"{name} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        height = bottom - top
        ty = y0 - height - 2 if y0 - height - 2 >= 0 else y0  # above the box, else inside
        draw.rectangle((x0, ty, x0 + right - left + 4, ty + height + 2), fill=color)
        draw.text((x0 + 2, ty + 1 - (top - y0)), text, fill=(255, 255, 255), font=font)
    return canvas
