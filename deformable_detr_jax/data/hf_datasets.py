"""`HfDatasetsSource`: a Hugging Face `datasets` dataset in the layout of transformers'
object-detection task guide (its cppe-5), from a `save_to_disk` folder or a hub id (record format
and checks: `source_common.py`).

Each example holds `image` (a `datasets.Image` feature) and `objects`: `bbox` (COCO
`[x, y, width, height]` in pixels) and `category` (`ClassLabel` ids; its names are the label
names), optionally `id` and `area`. `objects` is a dict of lists (the guide's `Sequence({...})`)
or a list of dicts (`List({...})`). Optional columns beside them: `image_id` (the evaluation's
image ids when they are unique int32s >= 0, else the row numbers), `width` and `height`.

The annotations are read here, never the images: a missing column, a category outside the names,
a split that is not there fail at construction. With `width` and `height` every box is checked
here too, as `CocoJsonSource` does (an image of another size is skipped when read); without them
a box is checked when its image is read, as `TfdsCocoSource` does. Invalid boxes are dropped,
counted in `invalid_boxes` and logged (`strict=True`: an `InvalidBoxError`); boxes are clipped to
the image (`processing.convert_coco_detection_annotation`). Images are decoded as `datasets`
decodes them (EXIF orientation applied: the pixels the guide draws the boxes on), then to RGB;
one that cannot be decoded is an `ImageError`, which the pipeline skips and counts.

`datasets` is an optional dependency, imported only when a source is made.
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any

import numpy as np
import PIL.Image

from deformable_detr_jax.data.box_checks import DataError, InvalidBoxes, check_xywh
from deformable_detr_jax.processing.image_processor import (
    ImageError,
    convert_coco_detection_annotation,
)

logger = logging.getLogger(__name__)

INSTALL = 'pip install "deformable_detr_jax[datasets]"'
# a hub dataset id: "name" or "owner/name"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
GUIDE = (
    "the layout of the transformers object-detection guide's cppe-5: 'image', and 'objects' with "
    "'bbox' ([x, y, width, height] pixels) and 'category' (ClassLabel ids)"
)
INT32_MAX = 2**31 - 1


def import_datasets():
    """The `datasets` module, or an ImportError saying how to install it."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"Hugging Face datasets as a data source need the datasets package: {INSTALL} (or "
            f'pip install "datasets>=4") ({type(err).__name__}: {err})'
        ) from err
    return datasets


def open_split(path: str, split: str, revision: str | None = None):
    """The `datasets.Dataset` of `split` in `path`: a folder (`save_to_disk`, or data files that
    `datasets.load_dataset` reads) or a hub dataset id at `revision` (a branch, tag or commit)."""
    datasets = import_datasets()
    where = f"path={path!r}"
    local = pathlib.Path(path).expanduser()
    if local.is_dir():
        if revision:
            raise ValueError(
                f"revision={revision!r} is for a hub dataset id, but {where} is a local folder; "
                "leave the revision empty"
            )
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = _load_dataset(datasets, str(local), None, where)
    elif local.exists() or not HUB_ID.match(path):
        raise FileNotFoundError(
            f"{where} is neither a folder nor a Hugging Face Hub dataset id; point it at a folder "
            "written by save_to_disk, or a hub id such as 'cppe-5' or 'owner/name'"
        )
    else:
        loaded = _load_dataset(datasets, path, revision, where)
    return _pick_split(loaded, split, where)


def _load_dataset(datasets, name: str, revision: str | None, where: str):
    try:
        return datasets.load_dataset(name, revision=revision or None)
    except Exception as err:  # not found, no network, unreadable data files, ...
        text = " ".join(str(err).split())[:300]
        raise FileNotFoundError(
            f"{where} is no folder here, and datasets.load_dataset({name!r}) failed "
            f"({type(err).__name__}: {text}); point it at a folder written by save_to_disk or at "
            "a hub dataset id this machine can download"
        ) from err


def _pick_split(loaded, split: str, where: str):
    if hasattr(loaded, "keys"):  # a DatasetDict
        if split not in loaded:
            raise ValueError(
                f"{where} has no split {split!r}; its splits are {sorted(loaded.keys())}"
            )
        return loaded[split]
    # one Dataset (Dataset.save_to_disk): its own split name, "train" when it has none
    own = "train" if loaded.split is None else str(loaded.split)
    if split != own:
        raise ValueError(
            f"{where} holds one split, {own!r}, not {split!r}: use the split {own!r}, or save a "
            f"DatasetDict with a {split!r} split"
        )
    return loaded


def label_names(features, where: str) -> tuple[str, ...]:
    """The names of `objects`' `category` ClassLabel (dict of lists or list of dicts)."""
    objects = features["objects"]
    inner = getattr(objects, "feature", objects)  # a List / Sequence of a dict -> the dict
    if not isinstance(inner, dict) or "bbox" not in inner or "category" not in inner:
        has = sorted(inner) if isinstance(inner, dict) else type(inner).__name__
        raise DataError(f"{where}: 'objects' has {has}; an example needs {GUIDE}")
    category = inner["category"]
    category = getattr(category, "feature", category)  # a List of ClassLabel -> the ClassLabel
    names = getattr(category, "names", None)
    if not names:
        raise DataError(
            f"{where}: objects.category is {category!r}, not a ClassLabel with names; cast it to "
            "datasets.ClassLabel(names=[...]) (Dataset.cast) to name the labels"
        )
    return tuple(str(n) for n in names)


def read_objects(value: Any, where: str) -> tuple[list, list]:
    """One example's (bboxes, categories) from a dict of lists or a list of dicts."""
    try:
        if value is None:
            return [], []
        if isinstance(value, dict):
            bboxes, categories = list(value["bbox"] or ()), list(value["category"] or ())
        else:
            bboxes = [obj["bbox"] for obj in value]
            categories = [obj["category"] for obj in value]
    except (KeyError, TypeError) as err:
        raise DataError(
            f"{where}: objects {value!r:.200} lack 'bbox' and 'category' ({err})"
        ) from err
    if len(bboxes) != len(categories):
        raise DataError(
            f"{where}: objects have {len(bboxes)} bbox but {len(categories)} category "
            "entries; each object needs both"
        )
    for k, bbox in enumerate(bboxes):
        if bbox is None or len(bbox) != 4 or any(v is None for v in bbox):
            raise DataError(
                f"{where}: object {k} has bbox {bbox!r}; a bbox is [x, y, width, height]"
            )
    return bboxes, categories


def image_ids(values: list | None, count: int, where: str) -> np.ndarray:
    """The `image_id` column when its ids are unique int32s >= 0, else the row numbers."""
    if values is not None:
        ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
        if ints and len(set(values)) == count and all(0 <= v <= INT32_MAX for v in values):
            return np.asarray(values, dtype=np.int64)
        logger.info(
            "%s: the image_id column does not hold unique int32 ids >= 0; each image's id is "
            "its row number",
            where,
        )
    return np.arange(count, dtype=np.int64)


class HfDatasetsSource:
    """One split of a Hugging Face `datasets` dataset in the object-detection guide's layout
    (module docstring); labels are the `category` ClassLabel ids, `label_names` its names.

    Args:
      path: a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (or of data
        files `datasets.load_dataset` reads), or a hub dataset id (`"cppe-5"`, `"owner/name"`).
      split: the split; a single saved `Dataset` has one, its own name ("train" without one).
      revision: a hub id's branch, tag or commit (None: the default branch).
      strict: an invalid box is an `InvalidBoxError` instead of dropped and counted.
    """

    def __init__(
        self, path: str, split: str = "train", *, revision: str | None = None, strict=False
    ):
        datasets = import_datasets()
        self.path, self.split = str(path), split
        self.where = f"Hugging Face dataset {self.path!r} split {split!r}"
        self.rows = f"Hugging Face dataset {self.path!r} {split}"  # + [row]
        dataset = open_split(self.path, split, revision)
        columns = list(dataset.column_names)
        missing = [c for c in ("image", "objects") if c not in columns]
        if missing:
            raise DataError(
                f"{self.where} has no column {' or '.join(map(repr, missing))}; its columns are "
                f"{columns}; an example needs {GUIDE}"
            )
        if not isinstance(dataset.features["image"], datasets.Image):
            raise DataError(
                f"{self.where}: column 'image' is {dataset.features['image']!r}, not a "
                "datasets.Image; cast it with dataset.cast_column('image', datasets.Image())"
            )
        if len(dataset) == 0:
            raise DataError(f"{self.where} has no examples")
        self.label_names = label_names(dataset.features, self.where)
        self.num_labels = len(self.label_names)
        self.invalid_boxes = InvalidBoxes(self.where, strict=strict)
        self._read_annotations(dataset, columns)
        self.invalid_boxes.log()
        # read the image column undecoded ({"bytes", "path"}); __getitem__ decodes it
        self._decoder = datasets.Image(mode=dataset.features["image"].mode)
        self._images = dataset.select_columns(["image"]).cast_column(
            "image", datasets.Image(decode=False)
        )

    def _read_annotations(self, dataset, columns: list[str]) -> None:
        """Every example's boxes and labels (checked where the image size is known), the sizes
        (None where unknown) and the image ids."""
        wanted = ["objects"] + [c for c in ("width", "height", "image_id") if c in columns]
        table = dataset.select_columns(wanted).with_format(None)[:]
        count = len(table["objects"])
        widths = table.get("width") or [None] * count
        heights = table.get("height") or [None] * count
        self._sizes: list[tuple[int, int] | None] = []
        self._targets: list[tuple[np.ndarray, np.ndarray]] = []
        outside: dict[int, int] = {}  # category id outside the names -> first row
        for row in range(count):
            bboxes, categories = read_objects(table["objects"][row], f"{self.rows}[{row}]")
            for c in categories:
                if c is None or not 0 <= int(c) < self.num_labels:
                    outside.setdefault(c, row)
            known = widths[row] is not None and heights[row] is not None
            size = (int(heights[row]), int(widths[row])) if known else None
            self._sizes.append(size)
            xywh = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
            labels = np.asarray([-1 if c is None else c for c in categories], np.int64)
            if size is not None:
                xywh, labels, _ = self._valid(row, xywh, labels, size)
            self._targets.append((xywh.astype(np.float32), labels))
        if outside:
            shown = ", ".join(f"{c} ({self.split}[{r}])" for c, r in list(outside.items())[:5])
            raise DataError(
                f"{self.where}: objects.category ids {shown} are outside the {self.num_labels} "
                f"label names {list(self.label_names)}; fix those categories or drop the rows"
            )
        self._image_ids = image_ids(table.get("image_id"), count, self.where)

    def _valid(
        self, row: int, xywh: np.ndarray, labels: np.ndarray, size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The valid boxes of row `row` in an image of `size` (height, width); each invalid one
        goes to `invalid_boxes` (and its reason to the returned list)."""
        keep, reasons = np.ones(len(xywh), dtype=bool), []
        for k, box in enumerate(xywh):
            problem = check_xywh(*(float(v) for v in box), size[1], size[0])
            if problem is not None:
                self.invalid_boxes.add(f"{self.rows}[{row}] object {k}", problem)
                reasons.append(f"object {k}: {problem}")
                keep[k] = False
        return xywh[keep], labels[keep], reasons

    def __len__(self) -> int:
        return len(self._targets)

    def describe(self, index: int) -> str:
        return f"{self.rows}[{index}] (image id {int(self._image_ids[index])})"

    def decode(self, index: int) -> np.ndarray:
        """Row `index`'s image as `datasets` decodes it, as (height, width, 3) uint8 RGB."""
        value = self._images[index]["image"]
        if not value or (value.get("bytes") is None and value.get("path") is None):
            raise ImageError(f"{self.describe(index)}: no image (neither bytes nor a path)")
        try:
            with self._decoder.decode_example(value) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
            raise ImageError(
                f"{self.describe(index)}: cannot be read as an image ({type(err).__name__}: {err})"
            ) from err
        if array.ndim != 3 or min(array.shape[:2]) < 1:
            raise ImageError(f"{self.describe(index)}: decoded to an empty image {array.shape}")
        return array

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = self.decode(index)
        height, width = image.shape[:2]
        xywh, labels = self._targets[index]
        size = self._sizes[index]
        if size is not None and size != (height, width):
            raise ImageError(
                f"{self.describe(index)} is {height} x {width} (height x width) but its height "
                f"and width columns say {size[0]} x {size[1]}"
            )
        if size is None:  # no width / height columns: the boxes are checked now
            xywh, labels, dropped = self._valid(index, xywh, labels, (height, width))
            if dropped:
                logger.warning(
                    "%s: dropped %d invalid box(es), %d in this process so far "
                    "(data.strict=True makes them errors): %s",
                    self.describe(index),
                    len(dropped),
                    len(self.invalid_boxes),
                    "; ".join(dropped),
                )
        annotation = {
            "image_id": int(self._image_ids[index]),
            "annotations": [
                {"bbox": b, "category_id": c, "iscrowd": 0, "area": 0.0}
                for b, c in zip(xywh, labels)
            ],
        }
        target = convert_coco_detection_annotation(annotation, (height, width))
        return {
            "image": image,
            "boxes": target["boxes"],
            "labels": target["class_labels"].astype(np.int32),
            "image_id": int(self._image_ids[index]),
        }
