"""`YoloFolderSource`: a YOLO-format folder, `images/<split>` and `labels/<split>` (record format
and checks: `source_common.py`)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from deformable_detr_jax.box_format import cxcywh_to_xyxy
from deformable_detr_jax.data.box_checks import InvalidBoxes, check_xyxy
from deformable_detr_jax.data.source_common import (
    IMAGE_SUFFIXES,
    clip_normalised,
    decode_image,
    require_dir,
)


def _read_names(folder: pathlib.Path) -> tuple[str, ...] | None:
    """Class names from `names.yaml` / `data.yaml` / `dataset.yaml` (`names:` a list or a dict
    index -> name), or `classes.txt` (one per line); None when there is none."""
    for file in ("names.yaml", "data.yaml", "dataset.yaml"):
        path = folder / file
        if path.is_file():
            import yaml  # PyYAML; only needed for YOLO folders

            names = (yaml.safe_load(path.read_text()) or {}).get("names")
            if isinstance(names, dict):
                keys = sorted(int(k) for k in names)
                if keys != list(range(len(keys))):
                    raise ValueError(f"{path}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
                return tuple(str(names[k]) for k in keys)
            if isinstance(names, list):
                return tuple(str(n) for n in names)
            raise ValueError(f"{path} has no 'names' list or dict")
    if (folder / "classes.txt").is_file():
        return tuple(
            n.strip() for n in (folder / "classes.txt").read_text().splitlines() if n.strip()
        )
    return None


class YoloFolderSource:
    """A YOLO-format folder: `images/<split>/*.jpg` and `labels/<split>/<stem>.txt` with lines
    `class cx cy w h` normalised to the image (polygon lines `class x1 y1 x2 y2 ...` become their
    bounding box); class names from `names.yaml` (or `names=`). A missing or empty label file
    means no objects. All label files are read and checked here, at construction: a malformed
    line or a class outside the names is an error, an invalid box is dropped, counted and logged
    as `file:line` (an `InvalidBoxError` with `strict=True`)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        split: str = "train2017",
        *,
        names: Sequence[str] | None = None,
        strict: bool = False,
    ):
        self.folder = require_dir(
            folder, "folder", "a YOLO folder (images/<split>, labels/<split>)"
        )
        images_dir = self.folder / "images" / split
        if not images_dir.is_dir():
            found = sorted(p.name for p in (self.folder / "images").glob("*") if p.is_dir())
            raise FileNotFoundError(
                f"no images/{split} in folder={str(self.folder)!r}; set split to one of {found}"
            )
        self.split = split
        self.label_names = tuple(names) if names is not None else _read_names(self.folder)
        if not self.label_names:
            raise FileNotFoundError(
                f"no class names for folder={str(self.folder)!r}: add names.yaml ('names: [...]') "
                "or pass names=[...]"
            )
        self.num_labels = len(self.label_names)
        self._files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
        labels_dir = self.folder / "labels" / split
        self.invalid_boxes = InvalidBoxes(f"YOLO labels {str(labels_dir)!r}", strict=strict)
        self._targets = [self._read_labels(labels_dir / f"{p.stem}.txt") for p in self._files]
        self.invalid_boxes.log()
        self._image_ids = [
            int(p.stem) if p.stem.isdigit() else i for i, p in enumerate(self._files)
        ]

    def _read_labels(self, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
        labels, boxes = [], []
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    values = [float(v) for v in fields]
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not numbers: {line!r}") from err
                label = values[0]
                if len(values) == 5:
                    xyxy = cxcywh_to_xyxy(np.asarray(values[1:])).tolist()
                elif len(values) >= 7 and len(values) % 2 == 1:  # polygon
                    xs, ys = values[1::2], values[2::2]
                    xyxy = [min(xs), min(ys), max(xs), max(ys)]
                else:
                    raise ValueError(
                        f"{path}:{number}: expected 'class cx cy w h' (or a polygon), got {line!r}"
                    )
                if label != int(label) or not 0 <= label < self.num_labels:
                    raise ValueError(
                        f"{path}:{number}: class {fields[0]} is not in 0..{self.num_labels - 1} "
                        f"(the {self.num_labels} names); fix the label or the class names"
                    )
                problem = check_xyxy(*xyxy)
                if problem is not None:
                    self.invalid_boxes.add(f"{path}:{number}", f"{problem} ({line.strip()!r})")
                    continue
                labels.append(int(label))
                boxes.append(xyxy)
        boxes, keep = clip_normalised(np.asarray(boxes, dtype=np.float32))
        return boxes, np.asarray(labels, dtype=np.int32)[keep]

    def __len__(self) -> int:
        return len(self._files)

    def describe(self, index: int) -> str:
        return repr(str(self._files[index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = decode_image(self._files[index], self.describe(index))
        boxes, labels = self._targets[index]
        return {
            "image": image,
            "boxes": boxes,
            "labels": labels,
            "image_id": self._image_ids[index],
        }
