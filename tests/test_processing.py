"""ImageProcessor and post-processing against transformers' DeformableDetrImageProcessor.

transformers 5 has two implementations: `DeformableDetrImageProcessorPil` (always importable here)
and the torchvision one (the default when torchvision is installed; not a test dependency: the PyPI
torchvision wheel does not load next to the CPU torch build). So:
- `resize_backend="pil"` is compared with `DeformableDetrImageProcessorPil` end to end;
- `resize_backend="torchvision"` is compared with an oracle made of ATen's
  `interpolate(antialias=True)` (the call torchvision's resize makes on a CPU tensor) followed by
  transformers' own size rule, rescale, normalise and pad (`do_resize=False`), and directly with
  `DeformableDetrImageProcessor` where torchvision imports.
"""

from __future__ import annotations

import json
import pathlib
import types
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.models.deformable_detr import (
    image_processing_pil_deformable_detr as hf_pil_module,
)

from deformable_detr_jax.postprocessing import post_process_object_detection
from deformable_detr_jax.processing import (
    ImageError,
    ImageProcessor,
    bucket_sizes,
    convert_coco_detection_annotation,
)

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


def hf_pil(**kwargs):
    return transformers.DeformableDetrImageProcessorPil(do_convert_rgb=True, **kwargs)


def hf_torchvision(**kwargs):
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # missing, or a wheel built for another torch
        pytest.skip(f"torchvision unavailable ({type(err).__name__}); compared via the ATen oracle")
    processor = transformers.DeformableDetrImageProcessor(do_convert_rgb=True, **kwargs)
    assert processor.backend == "torchvision"
    return processor


def hf_run(processor, images, **kwargs) -> dict:
    """transformers' output as NHWC numpy."""
    out = processor(images, **kwargs)
    result = {}
    if "pixel_mask" in out:  # absent with do_pad=False, where sizes may differ
        result["pixel_values"] = np.stack([np.asarray(p) for p in out["pixel_values"]]).transpose(
            0, 2, 3, 1
        )
        result["pixel_mask"] = np.stack([np.asarray(m) for m in out["pixel_mask"]])
    if "labels" in out:
        result["labels"] = [{k: np.asarray(v) for k, v in label.items()} for label in out["labels"]]
    return result


def aten_oracle(images, size=None, **kwargs) -> dict:
    """What torchvision's processor computes: transformers' size rule + ATen's antialiased resize
    (the call `torchvision.transforms.v2.functional.resize` makes) + transformers' rescale,
    normalise and pad. `images` are RGB [height, width, 3] arrays."""
    size = size or {"shortest_edge": 800, "longest_edge": 1333}
    resized = []
    for image in images:
        new_size = get_size_with_aspect_ratio(
            image.shape[:2], size["shortest_edge"], size["longest_edge"]
        )
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()[None]
        if tuple(new_size) != image.shape[:2]:
            pixels = torch.nn.functional.interpolate(
                pixels, size=list(new_size), mode="bilinear", align_corners=False, antialias=True
            )
        resized.append(pixels[0].permute(1, 2, 0).numpy())
    return hf_run(hf_pil(do_resize=False, **kwargs), resized)


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


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


# ----------------------------------------------------------------------------- real photos


def test_fixtures_include_grayscale_photo():
    assert len(PHOTOS) >= 3
    assert PIL.Image.open(GRAYSCALE_PHOTO).mode == "L"


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.stem)
def test_photo_matches_transformers_pil(photo):
    image = PIL.Image.open(photo)
    assert_batch_equal(ImageProcessor(resize_backend="pil")(image), hf_run(hf_pil(), image))


def test_photo_batch_matches_transformers_pil():
    images = [PIL.Image.open(p) for p in PHOTOS]
    assert_batch_equal(ImageProcessor(resize_backend="pil")(images), hf_run(hf_pil(), images))


def test_photo_batch_matches_aten_oracle():
    images = [PIL.Image.open(p) for p in PHOTOS]
    arrays = [np.array(image.convert("RGB")) for image in images]
    assert_batch_equal(ImageProcessor()(images), aten_oracle(arrays))


def test_photo_batch_matches_transformers_torchvision():
    processor = hf_torchvision()
    images = [PIL.Image.open(p) for p in PHOTOS]
    assert_batch_equal(ImageProcessor()(images), hf_run(processor, images))


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


@pytest.mark.parametrize("size", SIZE_SETTINGS, ids=lambda s: "-".join(s))
def test_odd_sizes_match_transformers_pil(rng, size):
    images = [random_image(rng, h, w) for h, w in ODD_SIZES]
    ours = ImageProcessor(size=size, resize_backend="pil")(images)
    assert_batch_equal(ours, hf_run(hf_pil(size=size), images))


def test_odd_sizes_match_aten_oracle(rng):
    images = [random_image(rng, h, w) for h, w in ODD_SIZES]
    assert_batch_equal(ImageProcessor(size=SMALL)(images), aten_oracle(images, size=SMALL))


@pytest.mark.parametrize("size", SIZE_SETTINGS, ids=lambda s: "-".join(s))
def test_odd_sizes_match_transformers_torchvision(rng, size):
    processor = hf_torchvision(size=size)
    images = [random_image(rng, h, w) for h, w in ODD_SIZES]
    assert_batch_equal(ImageProcessor(size=size)(images), hf_run(processor, images))


@pytest.mark.parametrize(
    "in_size, out_size", [((37, 53), (80, 11)), ((300, 9), (41, 41)), ((6, 6), (6, 90))]
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_resize_matches_aten_interpolate(rng, in_size, out_size, dtype):
    from deformable_detr_jax.resize import resize_torchvision

    image = random_image(rng, *in_size, dtype=dtype)
    if dtype != np.uint8:
        image = image * 255
    pixels = torch.from_numpy(image).permute(2, 0, 1).contiguous()[None]
    expected = (
        torch.nn.functional.interpolate(
            pixels, size=list(out_size), mode="bilinear", align_corners=False, antialias=True
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    out = resize_torchvision(image, *out_size)
    assert out.dtype == expected.dtype
    if dtype == np.uint8:
        np.testing.assert_array_equal(out, expected)  # ATen's uint8 fixed point, bit for bit
    else:
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)


def test_grayscale_arrays_become_rgb(rng):
    gray = random_image(rng, 31, 45, channels=1)
    rgb = np.repeat(gray, 3, axis=-1)
    for backend in ("torchvision", "pil"):
        processor = ImageProcessor(size=SMALL, resize_backend=backend)
        expected = processor(rgb)
        np.testing.assert_array_equal(processor(gray)["pixel_values"], expected["pixel_values"])
        np.testing.assert_array_equal(
            processor(gray[..., 0])["pixel_values"], expected["pixel_values"]
        )
    assert_batch_equal(
        ImageProcessor(size=SMALL, resize_backend="pil")(gray), hf_run(hf_pil(size=SMALL), rgb)
    )


def test_rgba_pil_image_matches_transformers(rng):
    image = PIL.Image.fromarray(random_image(rng, 40, 57, channels=4), mode="RGBA")
    rgb = np.array(
        PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, (255,) * 4), image).convert(
            "RGB"
        )
    )
    assert_batch_equal(
        ImageProcessor(size=SMALL, resize_backend="pil")(image), hf_run(hf_pil(size=SMALL), image)
    )
    assert_batch_equal(ImageProcessor(size=SMALL)(image), aten_oracle([rgb], size=SMALL))


def test_rgba_arrays_match_transformers(rng):
    images = [
        random_image(rng, 40, 57, channels=4),
        random_image(rng, 33, 20, channels=4, dtype=np.float32),
    ]
    ours = ImageProcessor(size=SMALL, resize_backend="pil")(images[:1])
    assert_batch_equal(ours, hf_run(hf_pil(size=SMALL), images[:1]))
    ours = ImageProcessor(size=SMALL, resize_backend="pil", do_rescale=False)(images[1:])
    assert_batch_equal(ours, hf_run(hf_pil(size=SMALL, do_rescale=False), images[1:]))
    processor = hf_torchvision(size=SMALL)
    assert_batch_equal(ImageProcessor(size=SMALL)(images[:1]), hf_run(processor, images[:1]))
    ours = ImageProcessor(size=SMALL, do_rescale=False)(images[1:])
    assert_batch_equal(ours, hf_run(processor, images[1:], do_rescale=False))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_arrays_match_transformers(rng, dtype):
    unit = [random_image(rng, h, w, dtype=dtype) for h, w in [(37, 53), (90, 21)]]
    integral = [np.floor(image * 256).astype(dtype) for image in unit]  # 0..255 as floats
    pil = ImageProcessor(size=SMALL, resize_backend="pil", do_rescale=False)
    assert_batch_equal(pil(unit), hf_run(hf_pil(size=SMALL, do_rescale=False), unit))
    pil = ImageProcessor(size=SMALL, resize_backend="pil")
    assert_batch_equal(pil(integral), hf_run(hf_pil(size=SMALL), integral))
    # torchvision resizes floats as floats; ATen's float32 sums are FMA-contracted, so ~1 ulp
    ours = ImageProcessor(size=SMALL, do_rescale=False)(unit)
    assert_batch_equal(ours, aten_oracle(unit, size=SMALL, do_rescale=False))


def test_mixed_batch_matches_transformers_pil(rng):
    images = [
        PIL.Image.open(GRAYSCALE_PHOTO).resize((61, 77)),
        random_image(rng, 45, 30),
        np.floor(random_image(rng, 20, 90, dtype=np.float32) * 256),
        PIL.Image.fromarray(random_image(rng, 50, 50, channels=4), mode="RGBA"),
    ]
    ours = ImageProcessor(size=SMALL, resize_backend="pil")(images)
    assert_batch_equal(ours, hf_run(hf_pil(size=SMALL), images))


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


def test_pad_to_and_pad_size(rng):
    images = [random_image(rng, 37, 53), random_image(rng, 20, 20)]
    ours = ImageProcessor(size=SMALL)(images, pad_to=(100, 120))
    assert ours["pixel_values"].shape == (2, 100, 120, 3)
    reference = aten_oracle(images, size=SMALL, pad_size={"height": 100, "width": 120})
    assert_batch_equal(ours, reference)
    ours = ImageProcessor(size=SMALL, resize_backend="pil", pad_size={"height": 100, "width": 120})(
        images
    )
    assert_batch_equal(
        ours, hf_run(hf_pil(size=SMALL, pad_size={"height": 100, "width": 120}), images)
    )


def test_no_padding(rng):
    processor = ImageProcessor(size={"height": 30, "width": 40}, do_pad=False)
    out = processor([random_image(rng, 37, 53), random_image(rng, 20, 20)])
    assert out["pixel_values"].shape == (2, 30, 40, 3) and out["pixel_mask"].all()


# ----------------------------------------------------------------------------- annotations


def test_convert_coco_detection_annotation_matches_transformers(rng):
    height, width = 90, 120
    annotation = random_annotation(rng, 7, height, width)
    ours = convert_coco_detection_annotation(annotation, (height, width), normalize=False)
    image = np.zeros((3, height, width), dtype=np.uint8)
    reference = hf_pil_module.prepare_coco_detection_annotation(
        image, annotation, input_data_format="channels_first"
    )
    assert set(reference) <= set(ours)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    assert 0 < len(ours["boxes"]) < len(annotation["annotations"])  # crowd and empty boxes dropped


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("convert", [True, False])
def test_labels_match_transformers(rng, backend, convert):
    sizes = [(37, 53), (90, 21), (64, 64)]
    images = [random_image(rng, h, w) for h, w in sizes]
    annotations = [random_annotation(rng, i, h, w) for i, (h, w) in enumerate(sizes)]
    annotations[2]["annotations"] = []
    processor = ImageProcessor(size=SMALL, resize_backend=backend, do_convert_annotations=convert)
    ours = processor(images, annotations)["labels"]
    # without padding transformers' labels are defined like ours: relative to the resized image
    reference = hf_run(
        hf_pil(size=SMALL, do_convert_annotations=convert, do_pad=False),
        images,
        annotations=annotations,
    )
    for mine, theirs in zip(ours, reference["labels"], strict=True):
        assert set(mine) == set(theirs)
        for key in theirs:
            assert mine[key].dtype == theirs[key].dtype, key
            np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)
    # with padding transformers re-normalises boxes to the padded batch; ours stay put
    padded = hf_run(
        hf_pil(size=SMALL, do_convert_annotations=convert), images, annotations=annotations
    )
    for mine, theirs in zip(ours, padded["labels"], strict=True):
        scale_mine = np.tile(mine["size"][::-1], 2) if convert else 1
        scale_theirs = np.tile(theirs["size"][::-1], 2) if convert else 1
        np.testing.assert_allclose(
            mine["boxes"] * scale_mine, theirs["boxes"] * scale_theirs, rtol=1e-5, atol=1e-4
        )


def test_labels_do_not_depend_on_bucket(rng):
    images = [random_image(rng, 37, 53), random_image(rng, 90, 21)]
    annotations = [random_annotation(rng, i, *image.shape[:2]) for i, image in enumerate(images)]
    a = ImageProcessor(size=SMALL)(images, annotations)["labels"]
    b = ImageProcessor(size=SMALL).with_buckets(32)(images, annotations)["labels"]
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------- config files


def test_hub_and_legacy_configs():
    current, legacy = ImageProcessor.from_dict(HUB_CONFIG), ImageProcessor.from_dict(LEGACY_CONFIG)
    assert current == legacy == ImageProcessor()
    for config in (HUB_CONFIG, LEGACY_CONFIG):
        reference = transformers.DeformableDetrImageProcessorPil(
            **{
                k: v
                for k, v in config.items()
                if k not in ("image_processor_type", "feature_extractor_type")
            }
        )
        assert dict(reference.size) == ImageProcessor.from_dict(config).size
    assert ImageProcessor.from_dict({"pad_and_return_pixel_mask": False}).do_pad is False
    assert ImageProcessor.from_dict({"size": [300, 400]}).size == {"height": 300, "width": 400}
    assert ImageProcessor.from_dict({"do_normalize": False}).do_convert_annotations is False
    with pytest.warns(UserWarning, match="unknown preprocessor config keys.*mystery"):
        ImageProcessor.from_dict({"mystery": 1})


def test_from_pretrained_and_save_pretrained(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "preprocessor_config.json").write_text(json.dumps(LEGACY_CONFIG))
    assert ImageProcessor.from_pretrained(tmp_path / "hub") == ImageProcessor()
    assert (
        ImageProcessor.from_pretrained(tmp_path / "hub" / "preprocessor_config.json")
        == ImageProcessor()
    )
    processor = ImageProcessor(
        size={"max_height": 600, "max_width": 500}, resize_backend="pil", buckets=(256, 512, 600)
    )
    file = processor.save_pretrained(tmp_path / "saved")
    assert ImageProcessor.from_pretrained(tmp_path / "saved") == processor
    assert ImageProcessor.from_pretrained(file, do_pad=False).do_pad is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.DeformableDetrImageProcessorPil.from_pretrained(tmp_path / "saved")
    assert dict(reference.size) == processor.size  # transformers reads our file too


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


def hf_post_process(logits, boxes, **kwargs):
    outputs = types.SimpleNamespace(
        logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes)
    )
    results = hf_pil().post_process_object_detection(outputs, **kwargs)
    return [{k: v.numpy() for k, v in r.items()} for r in results]


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


@pytest.mark.parametrize(
    "threshold, top_k, target_sizes",
    [
        (0.5, 100, None),
        (0.3, 100, [(480, 640), (427, 640), (640, 512)]),
        (0.0, 50, "array"),
        (0.9, 10**6, "list"),
    ],
)
def test_post_process_matches_transformers(rng, threshold, top_k, target_sizes):
    logits = rng.normal(0.0, 2.0, (3, 60, 91)).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, (3, 60, 4)).astype(np.float32)
    if target_sizes == "array":
        target_sizes = rng.integers(100, 1500, (3, 2))
    elif target_sizes == "list":
        target_sizes = [tuple(int(s) for s in pair) for pair in rng.integers(100, 1500, (3, 2))]
    hf_sizes = (
        torch.from_numpy(target_sizes) if isinstance(target_sizes, np.ndarray) else target_sizes
    )
    reference = hf_post_process(
        logits, boxes, threshold=threshold, top_k=top_k, target_sizes=hf_sizes
    )
    ours = post_process_object_detection(
        logits, boxes, threshold=threshold, top_k=top_k, target_sizes=target_sizes
    )
    assert_detections_equal(ours, reference)
    assert all(len(r["scores"]) > 0 for r in ours)


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
