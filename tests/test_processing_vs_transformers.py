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
import types
import warnings

import numpy as np
import PIL.Image
import pytest

from deformable_detr_jax.processing.image_processor import (
    ImageProcessor,
    convert_coco_detection_annotation,
)
from deformable_detr_jax.processing.postprocessing import post_process_object_detection
from tests.test_processing import (
    GRAYSCALE_PHOTO,
    HUB_CONFIG,
    LEGACY_CONFIG,
    ODD_SIZES,
    PHOTOS,
    SIZE_SETTINGS,
    SMALL,
    assert_batch_equal,
    assert_detections_equal,
    random_annotation,
    random_image,
)

pytestmark = pytest.mark.torch


def hf_pil(**kwargs):
    import transformers

    return transformers.DeformableDetrImageProcessorPil(do_convert_rgb=True, **kwargs)


def hf_torchvision(**kwargs):
    import transformers

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
    import torch
    from transformers.image_transforms import get_size_with_aspect_ratio

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
    import torch

    from deformable_detr_jax.processing.resize import resize_torchvision

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


def test_convert_coco_detection_annotation_matches_transformers(rng):
    from transformers.models.deformable_detr import (
        image_processing_pil_deformable_detr as hf_pil_module,
    )

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


def test_hub_and_legacy_configs():
    import transformers

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
    import transformers

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


def hf_post_process(logits, boxes, **kwargs):
    import torch

    outputs = types.SimpleNamespace(
        logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes)
    )
    results = hf_pil().post_process_object_detection(outputs, **kwargs)
    return [{k: v.numpy() for k, v in r.items()} for r in results]


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
    import torch

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
