"""ImageProcessor and post-processing on their own: buckets, padding, labels, configs, bad
input (against transformers' DeformableDetrImageProcessor, both backends:
tests/test_processing_vs_transformers.py)."""

from __future__ import annotations

import pathlib
import types

import numpy as np
import PIL.Image
import pytest

from deformable_detr_jax.processing.image_processor import (
    ImageError,
    ImageProcessor,
    bucket_sizes,
)
from deformable_detr_jax.processing.postprocessing import post_process_object_detection

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
PHOTOS = sorted(FIXTURES.glob("*.jpg"))
GRAYSCALE_PHOTO = FIXTURES / "000000000086.jpg"
HUB_CONFIG = {  # SenseTime/deformable-detr preprocessor_config.json, current form
    "do_normalize": True,
    "do_resize": True,
    "format": "coco_detection",
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DeformableDetrImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "size": {"shortest_edge": 800, "longest_edge": 1333},
}
LEGACY_CONFIG = {  # the older form of the same file
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "DeformableDetrFeatureExtractor",
    "format": "coco_detection",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "max_size": 1333,
    "size": 800,
}
SMALL = {"shortest_edge": 48, "longest_edge": 80}  # keeps the synthetic cases fast


def assert_batch_equal(ours: dict, reference: dict, atol: float = 1e-5):
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == reference["pixel_values"].shape
    np.testing.assert_allclose(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=atol)
    assert ours["pixel_mask"].shape == reference["pixel_mask"].shape
    np.testing.assert_array_equal(ours["pixel_mask"], reference["pixel_mask"].astype(bool))


def random_image(rng, height, width, channels=3, dtype=np.uint8):
    if dtype == np.uint8:
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return rng.uniform(0.0, 1.0, (height, width, channels)).astype(dtype)


def random_annotation(rng, image_id, height, width, num=12):
    """COCO boxes, some crowd, some past the border, some of zero width or height."""
    objects = []
    for i in range(num):
        x, y = rng.uniform(-0.2 * width, width), rng.uniform(-0.2 * height, height)
        w, h = rng.uniform(0, 0.6 * width), rng.uniform(0, 0.6 * height)
        if i % 5 == 3:
            w = 0.0
        objects.append(
            {
                "bbox": [float(x), float(y), float(w), float(h)],
                "category_id": int(rng.integers(1, 91)),
                "area": float(w * h * rng.uniform(0.5, 1.0)),
                "iscrowd": int(i % 4 == 1),
                "id": i,
            }
        )
    objects.append({"bbox": [1.0, 2.0, 3.0, 4.0], "category_id": 7, "area": 12.0})  # no iscrowd key
    return {"image_id": image_id, "annotations": objects}


# ----------------------------------------------------------------------------- real photos


def test_fixtures_include_grayscale_photo():
    assert len(PHOTOS) >= 3
    assert PIL.Image.open(GRAYSCALE_PHOTO).mode == "L"


def test_backends_differ_only_by_rounding():
    image = PIL.Image.open(PHOTOS[0])
    a = ImageProcessor()(image)["pixel_values"]
    b = ImageProcessor(resize_backend="pil")(image)["pixel_values"]
    assert np.abs(a - b).max() <= 1.01 / 255 / min(ImageProcessor().image_std)
    assert np.mean(np.abs(a - b) > 1e-5) < 0.02  # one grey level on ~1% of the values


def test_file_path_equals_pil_image():
    processor = ImageProcessor(size=SMALL)
    by_path = processor([PHOTOS[0], str(PHOTOS[1])])
    by_image = processor([PIL.Image.open(PHOTOS[0]), PIL.Image.open(PHOTOS[1])])
    np.testing.assert_array_equal(by_path["pixel_values"], by_image["pixel_values"])


# ----------------------------------------------------------------------------- synthetic images

ODD_SIZES = [(5, 7), (33, 101), (117, 13), (64, 64), (250, 251), (7, 300)]
SIZE_SETTINGS = [SMALL, {"height": 50, "width": 70}, {"max_height": 90, "max_width": 60}]


def test_batch_as_4d_array(rng):
    batch = random_image(rng, 2 * 30, 40).reshape(2, 30, 40, 3)
    processor = ImageProcessor(size=SMALL)
    np.testing.assert_array_equal(
        processor(batch)["pixel_values"], processor(list(batch))["pixel_values"]
    )


# ----------------------------------------------------------------------------- padding and buckets


def test_buckets_only_change_padding(rng):
    images = [random_image(rng, h, w) for h, w in [(37, 53), (90, 21), (64, 64)]]
    plain = ImageProcessor(size=SMALL)
    bucketed = plain.with_buckets(step=32)
    assert bucketed.buckets == (32, 64, 80)
    a, b = plain(images), bucketed(images)
    height, width = a["pixel_mask"].shape[1:]
    assert b["pixel_values"].shape[1:3] == (
        bucketed.buckets[np.searchsorted(bucketed.buckets, height)],
        bucketed.buckets[np.searchsorted(bucketed.buckets, width)],
    )
    np.testing.assert_array_equal(b["pixel_values"][:, :height, :width], a["pixel_values"])
    np.testing.assert_array_equal(b["pixel_mask"][:, :height, :width], a["pixel_mask"])
    assert not b["pixel_mask"][:, height:].any() and not b["pixel_mask"][:, :, width:].any()
    assert not b["pixel_values"][~b["pixel_mask"]].any()  # padding is zeros


def test_buckets_bound_the_number_of_shapes(rng):
    processor = ImageProcessor(size=SMALL).with_buckets(step=32)
    shapes = {
        processor(random_image(rng, int(h), int(w)))["pixel_values"].shape
        for h, w in rng.integers(5, 200, (40, 2))
    }
    assert len(shapes) <= 6


def test_bucket_sizes():
    assert bucket_sizes(1333) == (128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 1333)
    assert bucket_sizes(256, step=128) == (128, 256)
    assert ImageProcessor().with_buckets().buckets == bucket_sizes(1333)
    assert ImageProcessor(size={"height": 500, "width": 700}).with_buckets(200).buckets == (
        200,
        400,
        600,
        700,
    )


def test_side_past_the_largest_bucket_keeps_its_size(rng):
    processor = ImageProcessor(do_resize=False, buckets=(32, 64))
    assert processor(random_image(rng, 70, 20))["pixel_values"].shape == (1, 70, 32, 3)


def test_no_padding(rng):
    processor = ImageProcessor(size={"height": 30, "width": 40}, do_pad=False)
    out = processor([random_image(rng, 37, 53), random_image(rng, 20, 20)])
    assert out["pixel_values"].shape == (2, 30, 40, 3) and out["pixel_mask"].all()


# ----------------------------------------------------------------------------- annotations


def test_labels_do_not_depend_on_bucket(rng):
    images = [random_image(rng, 37, 53), random_image(rng, 90, 21)]
    annotations = [random_annotation(rng, i, *image.shape[:2]) for i, image in enumerate(images)]
    a = ImageProcessor(size=SMALL)(images, annotations)["labels"]
    b = ImageProcessor(size=SMALL).with_buckets(32)(images, annotations)["labels"]
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------- config files


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="size .* has keys"):
        ImageProcessor(size={"shortest_edge": 800})
    with pytest.raises(ValueError, match="resize_backend must be one of"):
        ImageProcessor(resize_backend="cv2")
    with pytest.raises(ValueError, match="bilinear"):
        ImageProcessor(resample=3)
    with pytest.raises(ValueError, match="image_mean needs 1 or 3 values"):
        ImageProcessor(image_mean=(0.5, 0.5))


# ----------------------------------------------------------------------------- post-processing


def tie_rows(detections, group):
    labels, boxes = detections["labels"][group].tolist(), detections["boxes"][group].tolist()
    return sorted(zip(labels, boxes, strict=True))


def assert_detections_equal(ours, reference):
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine["labels"].dtype == theirs["labels"].dtype
        assert mine["boxes"].dtype == theirs["boxes"].dtype == mine["scores"].dtype == np.float32
        # torch's vectorised float32 sigmoid is within 1 ulp of the correctly rounded one
        np.testing.assert_allclose(mine["scores"], theirs["scores"], rtol=2e-7, atol=0)
        # detections whose float32 scores tie may come in either order (torch.topk leaves it
        # open, ours ranks by logit): compare (label, box) rows tie group by tie group
        for score in np.unique(theirs["scores"]):
            group = theirs["scores"] == score
            assert tie_rows(mine, group) == tie_rows(theirs, group)
        assert np.mean(mine["labels"] == theirs["labels"]) > 0.95


def test_post_process_accepts_outputs_objects(rng):
    logits = rng.normal(0.0, 2.0, (2, 30, 5)).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, (2, 30, 4)).astype(np.float32)
    expected = post_process_object_detection(logits, boxes, threshold=0.2)
    for outputs in (
        types.SimpleNamespace(logits=logits, pred_boxes=boxes),
        {"logits": logits, "pred_boxes": boxes},
    ):
        assert_detections_equal(post_process_object_detection(outputs, threshold=0.2), expected)
    via_processor = ImageProcessor().post_process_object_detection(
        types.SimpleNamespace(logits=logits, pred_boxes=boxes), threshold=0.2
    )
    assert_detections_equal(via_processor, expected)


def test_post_process_errors(rng):
    logits = rng.normal(size=(2, 10, 3)).astype(np.float32)
    boxes = rng.uniform(size=(2, 10, 4)).astype(np.float32)
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
            post_process_object_detection(logits, boxes, threshold=threshold)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        post_process_object_detection(logits, boxes, top_k=0)
    with pytest.raises(ValueError, match="3 target sizes for a batch of 2"):
        post_process_object_detection(logits, boxes, target_sizes=[(1, 1)] * 3)
    with pytest.raises(ValueError, match="pred_boxes"):
        post_process_object_detection(logits, boxes[:, :, :2])
    with pytest.raises(TypeError, match="logits.*pred_boxes"):
        post_process_object_detection(types.SimpleNamespace(logits=logits))


# ----------------------------------------------------------------------------- bad input


def test_unreadable_and_empty_files(tmp_path, rng):
    good = random_image(rng, 20, 20)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(PHOTOS[0].read_bytes()[:2000])
    processor = ImageProcessor(size=SMALL)
    with pytest.raises(ImageError, match=r"image 1 \('.*empty\.jpg'\): the file is empty"):
        processor([good, tmp_path / "empty.jpg"])
    with pytest.raises(ImageError, match=r"image 0 \('.*text\.jpg'\): cannot be read as an image"):
        processor(str(tmp_path / "text.jpg"))
    with pytest.raises(ImageError, match=r"image 2 \('.*cut\.jpg'\): cannot be read as an image"):
        processor([good, good, tmp_path / "cut.jpg"])
    with pytest.raises(ImageError, match=r"image 0 \('.*missing\.jpg'\): no such file"):
        processor(tmp_path / "missing.jpg")


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 5, 3), np.uint8), r"image 1 has shape \(0, 5, 3\): zero height or width"),
        (np.zeros((5, 5, 3), np.int32), "image 1 has dtype int32; expected uint8"),
        (np.zeros((5, 5, 3), bool), "image 1 has dtype bool"),
        (np.zeros((5, 5, 2), np.uint8), r"image 1 has 2 channels \(shape \(5, 5, 2\)\)"),
        (np.zeros((3, 64, 64), np.uint8), "image 1 has 64 channels"),
        (np.zeros((5,), np.uint8), r"image 1 has shape \(5,\)"),
        (np.full((5, 5, 3), np.nan, np.float32), "image 1 contains NaN"),
        (
            np.full((5, 5, 4), 2.0, np.float32),
            r"image 1 is a float RGBA image .* needs values in \[0, 1\]",
        ),
        (PIL.Image.new("RGB", (0, 4)), "image 1 is empty"),
        (np.full((1, 3000, 3), 7, np.uint8), r"image 1: an image of .* \(1, 3000\) .* too extreme"),
    ],
)
def test_bad_images(rng, bad, message):
    with pytest.raises(ImageError, match=message):
        ImageProcessor(size=SMALL)([random_image(rng, 20, 20), bad])


def test_bad_batch_arguments(rng):
    image = random_image(rng, 20, 30)
    processor = ImageProcessor(size=SMALL)
    with pytest.raises(TypeError, match="image 0 has type dict"):
        processor({"pixels": image})
    with pytest.raises(ValueError, match="no images given"):
        processor([])
    with pytest.raises(ValueError, match="got 2 images but 1 annotations"):
        processor([image, image], [{"image_id": 0, "annotations": []}])
    with pytest.raises(ValueError, match="'image_id' and 'annotations'"):
        processor(image, {"annotations": []})
    with pytest.raises(
        ValueError, match=r"image 1 is 48 x 72 .* larger than the padded size 60 x 70"
    ):
        processor([random_image(rng, 20, 20), image], pad_to=(60, 70))
    with pytest.raises(ValueError, match="do_pad=False needs equally sized images"):
        ImageProcessor(size=SMALL, do_pad=False)([image, random_image(rng, 30, 20)])
    pil = ImageProcessor(size=SMALL, resize_backend="pil")
    with pytest.raises(
        ImageError, match=r"image 0: a float image with non-integer values must lie in \[0, 1\]"
    ):
        pil(random_image(rng, 20, 30, dtype=np.float32) * 300)
