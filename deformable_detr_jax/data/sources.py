"""Random-access detection sources: TFDS coco/2017, COCO-json folders, YOLO folders.

Every source has `len(source)`, `source[index]`, `source.describe(index)` (a path or id for logs),
`num_labels` and `label_names`; `source[index]` returns a record

    {"image": (height, width, 3) uint8 RGB, "boxes": (n, 4) float32 cxcywh normalised to the image,
     "labels": (n,) int32 in [0, num_labels), "image_id": int}

and raises `processing.ImageError` for an image that cannot be used (unreadable, truncated, of
another size than its annotations say): the pipeline skips, counts and logs those. Everything that
can be checked without decoding images (paths, json structure, image ids, categories, class ids) is
checked in the constructor, so a bad setting fails at start-up with a message that names it.
Invalid boxes (NaN, negative or zero size, outside the image: `box_checks.py`) are dropped, counted
in `source.invalid_boxes` and logged with their file:line or image and annotation id, in the
constructor (TFDS: when the record is read, since that decodes the image); `strict=True` makes
them an `InvalidBoxError` instead.

Images are decoded as stored, without applying EXIF orientation: COCO's boxes refer to the stored
pixels (as in torchvision's `CocoDetection`, which DETR uses). The synthetic `ShapesSource` lives in
`shapes.py`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from deformable_detr_jax.box_format import cxcywh_to_xyxy, xyxy_to_cxcywh
from deformable_detr_jax.data.box_checks import InvalidBoxes, check_xywh, check_xyxy
from deformable_detr_jax.processing.image_processor import (
    ImageError,
    convert_coco_detection_annotation,
)

# The 80 COCO detection categories: names in the order of the TFDS / YOLO contiguous labels, and
# their COCO category ids (1..90 with gaps; the Hugging Face checkpoints use these ids, 91 labels).
COCO_NAMES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
COCO_CATEGORY_IDS = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
)
LABEL_MODES = ("contiguous", "category_id")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

logger = logging.getLogger(__name__)


def decode_image(data: bytes | str | os.PathLike, name: str) -> np.ndarray:
    """JPEG/PNG/... bytes or a file path -> `(height, width, 3)` uint8 RGB; ImageError if unusable."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) == 0:
                raise ImageError(f"{name}: empty image bytes")
            stream = io.BytesIO(data)
        else:
            stream = open(data, "rb")  # noqa: SIM115 (closed below)
        with stream, PIL.Image.open(stream) as image:
            image.load()
            array = np.asarray(image.convert("RGB"))
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        # missing files, UnidentifiedImageError and truncated files are OSErrors
        raise ImageError(
            f"{name}: cannot be read as an image ({type(err).__name__}: {err})"
        ) from err
    if array.ndim != 3 or min(array.shape[:2]) < 1:
        raise ImageError(f"{name}: decoded to an empty image of shape {array.shape}")
    return array


def _clip_normalised(boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip normalised xyxy boxes to [0, 1]; returns them as cxcywh and the kept (non-empty) mask."""
    xyxy = np.clip(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4), 0.0, 1.0)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy_to_cxcywh(xyxy[keep]).astype(np.float32), keep


def _require_dir(path: str | os.PathLike, setting: str, what: str) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{setting}={str(path)!r} does not exist; point it at {what}")
    if not path.is_dir():
        raise NotADirectoryError(f"{setting}={str(path)!r} is not a folder; point it at {what}")
    return path


# ----------------------------------------------------------------------------- COCO json


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
        self.images_dir = _require_dir(images_dir, "images_dir", "the folder of the image files")
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

        row = {image_id: i for i, image_id in enumerate(ids)}
        per_image: list[list[tuple]] = [[] for _ in images]
        self.crowd_boxes = 0
        unknown_images, unknown_categories = set(), set()
        for ann in data["annotations"]:
            try:
                image_id, category = int(ann["image_id"]), int(ann["category_id"])
                bbox = [float(v) for v in ann["bbox"]]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{where}: every annotation needs 'image_id', 'category_id' and 'bbox' "
                    f"[x, y, width, height] ({type(err).__name__}: {err}; in {ann!r:.200})"
                ) from err
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

        self._images = images
        self._annotations = [
            (
                np.asarray([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                np.asarray([a[1] for a in anns], dtype=np.int64),
                np.asarray([a[2] for a in anns], dtype=np.int64),
            )
            for anns in per_image
        ]
        sorted_ids = sorted(categories)
        if label_mode == "contiguous":
            self.category_ids = tuple(sorted_ids)
            self.label_names = tuple(categories[c] for c in sorted_ids)
        else:
            self.category_ids = tuple(range(max(sorted_ids) + 1))
            self.label_names = tuple(categories.get(c, "N/A") for c in self.category_ids)
        self.num_labels = len(self.category_ids)
        self._label_of = {c: i for i, c in enumerate(self.category_ids)}

        # a wrong images_dir shows at once: at least one of the first images must be there
        first = [self.images_dir / name for _, name, _, _ in images[:8]]
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


# ----------------------------------------------------------------------------- YOLO folders


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
        self.folder = _require_dir(
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
        boxes, keep = _clip_normalised(np.asarray(boxes, dtype=np.float32))
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


# ----------------------------------------------------------------------------- TFDS


class TfdsCocoSource:
    """`tfds.data_source("coco/2017:1.1.0")`: the prepared TFDS COCO (ArrayRecord), read without
    TensorFlow. The version is pinned on purpose: with a version, TFDS builds the reader from the
    prepared files' metadata; without one it runs the `coco` builder code, which imports TF.

    Prepare the data once where TensorFlow is installed: `tfds build coco/2017
    --file_format=array_record --data_dir=DIR`. Labels are TFDS's contiguous 0..79
    (`label_mode="contiguous"`) or the COCO category ids 1..90 (`"category_id"`, 91 labels, as the
    Hugging Face checkpoints). TFDS decodes the images (OpenCV when installed, else PIL); a record
    that fails to read or decode is an ImageError, so the pipeline skips it. Boxes are checked when
    a record is read (reading every record here would decode every image): an invalid one is
    dropped and logged with its record, image id and object index, counted in `invalid_boxes` of
    the process that read it, or an `InvalidBoxError` with `strict=True`.
    """

    def __init__(
        self,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        *,
        name: str = "coco/2017:1.1.0",
        label_mode: str = "contiguous",
        strict: bool = False,
    ):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if data_dir is not None and "://" not in str(data_dir):
            _require_dir(data_dir, "data_dir", "the TFDS data folder holding coco/2017/1.1.0")
        import tensorflow_datasets as tfds

        self.split, self.data_dir, self.name = split, data_dir, name
        try:
            self._data = tfds.data_source(
                name,
                split=split,
                data_dir=None if data_dir is None else os.fspath(data_dir),
            )
        except Exception as err:  # DatasetNotFoundError, unknown split, missing files, ...
            raise FileNotFoundError(
                f"cannot open TFDS {name} split {split!r} in data_dir={data_dir!r} "
                f"({type(err).__name__}: {str(err)[:300]}); prepare it with `tfds build coco/2017 "
                "--file_format=array_record --data_dir=DIR` (needs TensorFlow there) or use "
                "CocoJsonSource on the COCO json and images"
            ) from err
        if label_mode == "contiguous":
            self.category_ids = COCO_CATEGORY_IDS
            self.label_names = COCO_NAMES
            self._labels = np.arange(len(COCO_NAMES), dtype=np.int32)
        else:
            self.category_ids = tuple(range(max(COCO_CATEGORY_IDS) + 1))
            names = dict(zip(COCO_CATEGORY_IDS, COCO_NAMES))
            self.label_names = tuple(names.get(c, "N/A") for c in self.category_ids)
            self._labels = np.asarray(COCO_CATEGORY_IDS, dtype=np.int32)
        self.num_labels = len(self.label_names)
        self.invalid_boxes = InvalidBoxes(f"TFDS {name} {split}", strict=strict)

    def __len__(self) -> int:
        return len(self._data)

    def describe(self, index: int) -> str:
        return f"TFDS {self.name} {self.split}[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            example = self._data[int(index)]
            objects = example["objects"]
            # TFDS gives sequences as lists of arrays; (n, 4) ymin, xmin, ymax, xmax normalised
            bbox = np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4)
            label = np.asarray(objects["label"], dtype=np.int64).reshape(-1)
            crowd = np.asarray(objects["is_crowd"], dtype=bool).reshape(-1)
            image_id = int(np.asarray(example["image/id"]))
            data = example["image"]
        except Exception as err:  # an unreadable record is skipped like a corrupt image
            raise ImageError(f"{self.describe(index)}: unreadable record ({err})") from err
        if not len(bbox) == len(label) == len(crowd):
            raise ImageError(
                f"{self.describe(index)}: objects of unequal lengths (bbox {len(bbox)}, label "
                f"{len(label)}, is_crowd {len(crowd)})"
            )
        if label.size and (label.min() < 0 or label.max() >= len(self._labels)):
            raise ImageError(f"{self.describe(index)}: label outside 0..79: {label.tolist()}")
        image = np.asarray(data)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
            raise ImageError(
                f"{self.describe(index)} (image id {image_id}): decoded to {image.dtype} "
                f"{image.shape}, not an image"
            )
        if image.ndim == 2:  # a grayscale JPEG stored as it was
            image = image[..., None]
        image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        keep = ~crowd
        xyxy = bbox[:, [1, 0, 3, 2]]
        dropped = []
        for k in np.flatnonzero(keep):
            problem = check_xyxy(*(float(v) for v in xyxy[k]))
            if problem is not None:
                reason = f"{problem} (ymin, xmin, ymax, xmax {bbox[k].tolist()})"
                self.invalid_boxes.add(
                    f"{self.describe(index)} (image id {image_id}) object {k}", reason
                )
                dropped.append(f"object {k}: {reason}")
                keep[k] = False
        if dropped:
            logger.warning(
                "%s (image id %d): dropped %d invalid box(es), %d in this process so far "
                "(data.strict=True makes them errors): %s",
                self.describe(index),
                image_id,
                len(dropped),
                len(self.invalid_boxes),
                "; ".join(dropped),
            )
        boxes, valid = _clip_normalised(xyxy[keep])
        labels = self._labels[label[keep][valid]]
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": image_id}
