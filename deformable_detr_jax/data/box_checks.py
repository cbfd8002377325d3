"""Invalid boxes in the annotations: found, counted and logged where they are, or errors (`strict`).

A box is invalid when it has a NaN or infinite coordinate, a negative or zero width or height, or
no area left once clipped to the image (it lies outside). Such a box cannot be a training target;
the sources drop it, but never silently: each one is counted and named (`file:line`, or image and
annotation id) in `InvalidBoxes`, whose `log()` says how many there are and lists the first ones.
With `strict=True` the first invalid box found is an `InvalidBoxError` instead. Boxes partly
outside the image are clipped to it, as COCO and transformers do: that is not invalid.

    check_xywh(x, y, w, h, width, height)   COCO pixels (x, y top-left)
    check_xyxy(x0, y0, x1, y1)              normalised corners in [0, 1] (YOLO, TFDS)

return None for a valid box, else the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

LISTED = 10  # invalid boxes named one by one in the log; the rest are counted


class DataError(ValueError):
    """The data cannot be used as it is; the message names the file or record and what to do."""


class InvalidBoxError(DataError):
    """An invalid box with `strict=True`."""


def _clipped_extent(low: float, high: float, limit: float) -> float:
    # float32, as the clipping the sources apply (processing.convert_coco_detection_annotation)
    low32, high32, limit32 = np.float32(low), np.float32(high), np.float32(limit)
    return float(np.clip(high32, 0, limit32) - np.clip(low32, 0, limit32))


def check_xywh(x: float, y: float, w: float, h: float, width: float, height: float) -> str | None:
    """Why a COCO `[x, y, w, h]` pixel box in a `width` x `height` image is invalid, or None."""
    values = (x, y, w, h)
    if not all(math.isfinite(float(v)) for v in values):
        return f"a coordinate is not finite ({list(values)})"
    if w < 0 or h < 0:
        return f"negative {'width' if w < 0 else 'height'} ({list(values)})"
    if w == 0 or h == 0:
        return f"zero {'width' if w == 0 else 'height'}: no area ({list(values)})"
    x1, y1 = np.float32(x) + np.float32(w), np.float32(y) + np.float32(h)
    if _clipped_extent(x, x1, width) <= 0 or _clipped_extent(y, y1, height) <= 0:
        return f"outside the {width:g} x {height:g} image ({list(values)})"
    return None


def check_xyxy(x0: float, y0: float, x1: float, y1: float) -> str | None:
    """Why a box with normalised corners is invalid, or None."""
    values = (x0, y0, x1, y1)
    if not all(math.isfinite(float(v)) for v in values):
        return "a coordinate is not finite"
    if x1 < x0 or y1 < y0:
        return f"negative {'width' if x1 < x0 else 'height'}"
    if x1 == x0 or y1 == y0:
        return f"zero {'width' if x1 == x0 else 'height'}: no area"
    if _clipped_extent(x0, x1, 1.0) <= 0 or _clipped_extent(y0, y1, 1.0) <= 0:
        return "outside the image"
    return None


@dataclasses.dataclass
class InvalidBoxes:
    """The invalid boxes a source found: `found` is a list of `(where, reason)`.

    Args:
      what: the source, for the log line (e.g. `annotations_json='train.json'`).
      strict: raise `InvalidBoxError` at the first one instead of counting it.
    """

    what: str
    strict: bool = False
    found: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        if self.strict:
            raise InvalidBoxError(
                f"{where}: invalid box: {reason}. Fix the annotation, or set data.strict=False "
                "(strict=False) to drop invalid boxes (each is counted and logged)"
            )
        self.found.append((where, reason))

    def __len__(self) -> int:
        return len(self.found)

    def log(self) -> None:
        """One warning: how many, the first `LISTED` of them one per line."""
        if not self.found:
            return
        lines = [f"  {where}: {reason}" for where, reason in self.found[:LISTED]]
        if len(self.found) > LISTED:
            lines.append(f"  ... and {len(self.found) - LISTED} more")
        logger.warning(
            "%s: dropped %d invalid box(es) (set data.strict=True to make them errors):\n%s",
            self.what,
            len(self.found),
            "\n".join(lines),
        )
