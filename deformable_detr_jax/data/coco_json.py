"""`CocoJsonSource`: a folder of images with a COCO `instances_*.json` (record format and checks:
`source_common.py`)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import numpy as np

from deformable_detr_jax.data.box_checks import InvalidBoxes, check_xywh
from deformable_detr_jax.data.source_common import LABEL_MODES, decode_image, require_dir
from deformable_detr_jax.processing.image_processor import (
    ImageError,
    convert_coco_detection_annotation,
)

logger = logging.getLogger(__name__)


class CocoJsonSource:
    """A folder of images with a COCO `instances_*.json` (`images`, `annotations`, `categories`).

    `label_mode="contiguous"` numbers the categories 0..K-1 in order of category id (`num_labels`
    K); `"category_id"` uses the ids themselves (`num_labels` = largest id + 1), as the original
    Deformable DETR and the Hugging Face COCO checkpoints (91 labels) do. `category_ids[label]`
    maps a label back to its COCO category id. Crowd boxes are dropped, as DETR does (counted in
    `crowd_boxes`); boxes are clipped to the image (`processing.convert_coco_detection_annotation`);
    invalid ones are dropped, counted and logged, or an `InvalidBoxError` with `strict=True`.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotations_json: str | os.PathLike,
        *,
        label_mode: str = "contiguous",
        strict: bool = False,
    ):
        self.images_dir = require_dir(images_dir, "images_dir", "the folder of the image files")
        path = pathlib.Path(annotations_json).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"annotations_json={str(path)!r} does not exist; point it at a COCO instances json "
                "(e.g. annotations/instances_train2017.json)"
            )
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        self.annotations_json = path
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"annotations_json={str(path)!r} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
        ):
            raise ValueError(
                f"annotations_json={str(path)!r} is not a COCO detection file: it needs the lists "
                "'images', 'annotations' and 'categories'"
            )
        self.invalid_boxes = InvalidBoxes(f"annotations_json={str(path)!r}", strict=strict)
        self._parse(data, label_mode)
        self.invalid_boxes.log()
        if self.crowd_boxes:
            logger.info(
                "annotations_json=%r: %d crowd boxes (iscrowd=1) are not trained on, as in DETR",
                str(path),
                self.crowd_boxes,
            )

    def _parse(self, data: dict[str, Any], label_mode: str) -> None:
        where = f"annotations_json={str(self.annotations_json)!r}"
        categories, images = _read_categories_and_images(data, where)
        per_image = self._group_annotations(data["annotations"], categories, images, where)
        self._images = images
        self._annotations = [
            (
                np.asarray([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),  # (n, 4) xywh
                np.asarray([a[1] for a in anns], dtype=np.int64),  # (n,) category ids
                np.asarray([a[2] for a in anns], dtype=np.int64),  # (n,) iscrowd
            )
            for anns in per_image
        ]
        self._number_labels(categories, label_mode)
        self._check_images_dir(where)

    def _group_annotations(
        self,
        annotations: list[Any],
        categories: dict[int, str],
        images: list[tuple[int, str, int, int]],
        where: str,
    ) -> list[list[tuple[list[float], int, int]]]:
        """The annotations' (bbox, category id, iscrowd) per image, in the order of `images`;
        invalid boxes dropped into `invalid_boxes`, crowd boxes counted in `crowd_boxes`."""
        row = {image_id: i for i, (image_id, _, _, _) in enumerate(images)}
        per_image: list[list[tuple]] = [[] for _ in images]
        self.crowd_boxes = 0
        unknown_images, unknown_categories = set(), set()
        for ann in annotations:
            image_id, category, bbox = _read_annotation(ann, where)
            if image_id not in row:
                unknown_images.add(image_id)
                continue
            if category not in categories:
                unknown_categories.add(category)
                continue
            if len(bbox) != 4:
                raise ValueError(
                    f"{where}: annotation {ann.get('id')} of image {image_id} has bbox {bbox}; "
                    "a bbox is [x, y, width, height]"
                )
            crowd = int(ann.get("iscrowd", 0))
            _, name, height, width = images[row[image_id]]
            problem = None if crowd else check_xywh(*bbox, width, height)
            if problem is not None:
                where_box = f"annotation id {ann.get('id')} of image id {image_id} ({name})"
                self.invalid_boxes.add(where_box, problem)
                continue
            self.crowd_boxes += crowd
            per_image[row[image_id]].append((bbox, category, crowd))
        _check_known(unknown_images, unknown_categories, categories, where)
        return per_image

    def _number_labels(self, categories: dict[int, str], label_mode: str) -> None:
        """`category_ids`, `label_names`, `num_labels` and the category id -> label map."""
        sorted_ids = sorted(categories)
        if label_mode == "contiguous":
            self.category_ids = tuple(sorted_ids)
            self.label_names = tuple(categories[c] for c in sorted_ids)
        else:
            self.category_ids = tuple(range(max(sorted_ids) + 1))
            self.label_names = tuple(categories.get(c, "N/A") for c in self.category_ids)
        self.num_labels = len(self.category_ids)
        self._label_of = {c: i for i, c in enumerate(self.category_ids)}

    def _check_images_dir(self, where: str) -> None:
        # a wrong images_dir shows at once: at least one of the first images must be there
        first = [self.images_dir / name for _, name, _, _ in self._images[:8]]
        if not any(p.is_file() for p in first):
            raise FileNotFoundError(
                f"none of the first {len(first)} images of {where} (e.g. {first[0].name!r}) is in "
                f"images_dir={str(self.images_dir)!r}; point images_dir at the folder holding "
                "the json's file_name entries"
            )

    def __len__(self) -> int:
        return len(self._images)

    def describe(self, index: int) -> str:
        image_id, name, _, _ = self._images[index]
        return f"image id {image_id} ({str(self.images_dir / name)!r})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, name, height, width = self._images[index]
        image = decode_image(self.images_dir / name, self.describe(index))
        if image.shape[:2] != (height, width):
            raise ImageError(
                f"{self.describe(index)} is {image.shape[0]} x {image.shape[1]} (height x width) "
                f"but annotations_json says {height} x {width}"
            )
        bbox, category, crowd = self._annotations[index]
        annotation = {
            "image_id": image_id,
            "annotations": [
                {"bbox": b, "category_id": c, "iscrowd": k, "area": 0.0}
                for b, c, k in zip(bbox, category, crowd)
            ],
        }
        target = convert_coco_detection_annotation(annotation, (height, width))
        labels = np.asarray([self._label_of[int(c)] for c in target["class_labels"]], np.int32)
        return {"image": image, "boxes": target["boxes"], "labels": labels, "image_id": image_id}


def _read_categories_and_images(
    data: dict[str, Any], where: str
) -> tuple[dict[int, str], list[tuple[int, str, int, int]]]:
    """The json's categories (id -> name) and images (id, file_name, height, width), checked."""
    try:
        categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        images = [
            (int(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))
            for im in data["images"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: every category needs 'id' (and 'name'), every image 'id', 'file_name', "
            f"'height' and 'width' ({type(err).__name__}: {err})"
        ) from err
    if not categories:
        raise ValueError(f"{where} has no categories")
    if min(categories) < 0:
        raise ValueError(f"{where} has a negative category id {min(categories)}")
    if not images:
        raise ValueError(f"{where} lists no images")
    ids = [im[0] for im in images]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where} lists some image ids twice")
    bad_sizes = [im[1] for im in images if im[2] < 1 or im[3] < 1]
    if bad_sizes:
        raise ValueError(f"{where}: images {bad_sizes[:5]} have a height or width below 1")
    return categories, images


def _read_annotation(ann: Any, where: str) -> tuple[int, int, list[float]]:
    """An annotation's image id, category id and bbox [x, y, width, height] (any length yet)."""
    try:
        image_id, category = int(ann["image_id"]), int(ann["category_id"])
        bbox = [float(v) for v in ann["bbox"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: every annotation needs 'image_id', 'category_id' and 'bbox' "
            f"[x, y, width, height] ({type(err).__name__}: {err}; in {ann!r:.200})"
        ) from err
    return image_id, category, bbox


def _check_known(
    unknown_images: set[int], unknown_categories: set[int], categories: dict[int, str], where: str
) -> None:
    """An error naming the annotations' image or category ids the json does not list."""
    if unknown_images:
        raise ValueError(
            f"{where}: {len(unknown_images)} image ids in 'annotations' are not in 'images' "
            f"(e.g. {sorted(unknown_images)[:5]}); the annotations do not belong to this image "
            "list: use the json that matches images_dir"
        )
    if unknown_categories:
        raise ValueError(
            f"{where}: annotations use category ids {sorted(unknown_categories)[:10]} that are "
            f"not in 'categories' (known: {sorted(categories)[:20]}); fix the json's categories"
        )
