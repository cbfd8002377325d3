"""What the detection sources share: the record they return, image decoding, COCO's categories.

Every source (`coco_json.py`, `yolo.py`, `tfds_coco.py`, `hf_datasets.py`, the synthetic
`shapes.py`) has `len(source)`, `source[index]`, `source.describe(index)` (a path or id for
logs), `num_labels` and `label_names`; `source[index]` returns a record

    {"image": (height, width, 3) uint8 RGB, "boxes": (n, 4) float32 cxcywh normalised to the image,
     "labels": (n,) int32 in [0, num_labels), "image_id": int}

and raises `processing.ImageError` for an image that cannot be used (unreadable, truncated, of
another size than its annotations say): the pipeline skips, counts and logs those. Everything that
can be checked without decoding images (paths, json structure, image ids, categories, class ids) is
checked in the constructor, so a bad setting fails at start-up with a message that names it.
Invalid boxes (NaN, negative or zero size, outside the image: `box_checks.py`) are dropped, counted
in `source.invalid_boxes` and logged with their file:line or image and annotation id, in the
constructor (TFDS, and Hugging Face datasets without `width` / `height` columns: when the record
is read, since that decodes the image); `strict=True` makes them an `InvalidBoxError` instead.

Images are decoded as stored, without applying EXIF orientation: COCO's boxes refer to the stored
pixels (as in torchvision's `CocoDetection`, which DETR uses). Hugging Face datasets are the
exception: decoded as `datasets` decodes them (EXIF applied), the pixels their boxes refer to.
"""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import PIL.Image

from deformable_detr_jax.box_format import xyxy_to_cxcywh
from deformable_detr_jax.processing.image_processor import ImageError

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


def clip_normalised(boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip normalised xyxy boxes to [0, 1]; returns them as cxcywh and the kept (non-empty) mask."""
    xyxy = np.clip(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4), 0.0, 1.0)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return xyxy_to_cxcywh(xyxy[keep]).astype(np.float32), keep


def require_dir(path: str | os.PathLike, setting: str, what: str) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{setting}={str(path)!r} does not exist; point it at {what}")
    if not path.is_dir():
        raise NotADirectoryError(f"{setting}={str(path)!r} is not a folder; point it at {what}")
    return path
