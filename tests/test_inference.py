"""`Detector` end to end: shape buckets, compilations, bf16, loading, drawing, bad input
(detections equal to transformers': tests/test_inference_vs_transformers.py).

One small random model (TINY_BOTTLENECK backbone, 1 encoder + 2 decoder layers, 4 levels) and
images resized to shortest 128 / longest 192 keep the compiled programs few and small; the
detectors share `jax.jit`'s cache (same architecture), so most tests reuse programs.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from deformable_detr_jax import ImageError, ImageProcessor
from deformable_detr_jax.convert.errors import CheckpointFormatError
from deformable_detr_jax.inference.detections import PALETTE, Detections, draw_detections
from deformable_detr_jax.inference.detector import Detector, _chunk_sizes
from tests.random_models import TINY_BOTTLENECK, random_model, small_config

FIXTURES = sorted(pathlib.Path(__file__).parent.glob("fixtures/*.jpg"))
PHOTO_PORTRAIT = FIXTURES[0]  # 000000000086.jpg, 640 x 512 (height x width)
PHOTO_LANDSCAPE = FIXTURES[2]  # 000000000536.jpg, 336 x 448
NAMES = ("cat", "dog", "bicycle", "person", "car")
SIZE = {"shortest_edge": 128, "longest_edge": 192}
TINY = dict(encoder_layers=1, decoder_layers=2, id2label=dict(enumerate(NAMES)))
# The random model's scores sit near its class prior 0.01: about a dozen of the top 60 (12
# queries x 5 labels) pass 0.02 on each fixture photo.
THRESHOLD = 0.02


@functools.cache
def tiny_model(seed: int = 3, **fields):
    """This package's small model with random weights (no torch)."""
    return random_model(small_config(TINY_BOTTLENECK, **{**TINY, **fields}), seed=seed)


def small_processor(**kwargs) -> ImageProcessor:
    """Resizes as transformers' processor does without torchvision (PIL), to shortest 128."""
    return ImageProcessor(size=SIZE, resize_backend="pil", **kwargs)


def photo(path=PHOTO_PORTRAIT) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def raw_outputs(detector: Detector, image: np.ndarray, pad_to=None):
    """Sigmoid scores `[len_q, num_labels]` and boxes `[len_q, 4]` in pixels of `image`."""
    pad_to = pad_to or detector.bucket(image.shape[:2])
    batch = detector.processor.preprocess(image, pad_to=pad_to)
    logits, boxes = detector.forward(batch["pixel_values"], batch["pixel_mask"])
    height, width = image.shape[:2]
    scores = 1 / (1 + np.exp(-np.asarray(logits[0], np.float64)))
    return scores, np.asarray(boxes[0]) * np.array([width, height, width, height])


class CompileCounter:
    """Counts XLA backend compilations (every program: jitted or eager op) while active."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        jax.monitoring.unregister_event_duration_listener(self._listen)


# ----------------------------------------------------------------------------- parity


# ----------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("path", [PHOTO_PORTRAIT, PHOTO_LANDSCAPE], ids=lambda p: p.stem)
def test_detections_do_not_depend_on_the_bucket(path):
    """Padded to its bucket or to a larger canvas, an image's raw outputs equal its unpadded
    ones and so do its detections. With `padding_invariant=False` (transformers' computation
    for a padded batch) they move."""
    model = tiny_model()
    image = photo(path)
    unpadded = Detector(model, small_processor(), buckets=None)
    bucketed = Detector(model, small_processor())  # default: 128, 192 (and 128, shortest edge)
    bucket = bucketed.bucket(image.shape[:2])
    assert bucket != unpadded.bucket(image.shape[:2])  # the image is really padded
    ref_scores, ref_boxes = raw_outputs(unpadded, image)
    for pad_to in (bucket, (192, 192)):
        scores, boxes = raw_outputs(bucketed, image, pad_to=pad_to)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=2e-5, err_msg=str(pad_to))
        np.testing.assert_allclose(boxes, ref_boxes, rtol=0, atol=5e-3, err_msg=str(pad_to))
    leaky = Detector(model, small_processor(), padding_invariant=False)
    scores, _ = raw_outputs(leaky, image, pad_to=(192, 192))
    assert np.abs(scores - ref_scores).max() > 1e-3  # the padding does matter to this model

    found, alone = bucketed(image, threshold=THRESHOLD)[0], unpadded(image, threshold=THRESHOLD)[0]
    assert len(found) > 3
    np.testing.assert_array_equal(found.labels, alone.labels)
    np.testing.assert_allclose(found.scores, alone.scores, rtol=0, atol=2e-5)
    np.testing.assert_allclose(found.boxes, alone.boxes, rtol=0, atol=5e-3)  # pixels


def test_stream_of_sizes_compiles_once_per_bucket():
    """20 images of distinct sizes, one call each: programs <= buckets, counted at XLA."""
    model = tiny_model()
    detector = Detector(model, small_processor())
    rng = np.random.default_rng(0)
    source = photo(PHOTO_LANDSCAPE)
    images = []
    for i in range(20):  # crops of a tiled photo, alternating landscape and portrait
        long_side, short_side = 300 + 7 * i, 200 + 5 * i
        height, width = (short_side, long_side) if i % 2 else (long_side, short_side)
        crop = np.tile(source, (2, 2, 1))[:height, :width]  # 672 x 896 tiled photo
        images.append(crop ^ rng.integers(0, 2, (1, 1, 3), np.uint8))
    assert len({image.shape for image in images}) == 20
    buckets = {detector.bucket(image.shape[:2]) for image in images}
    assert buckets == {(128, 192), (192, 128)}

    counter = CompileCounter()
    with counter:
        jax.jit(lambda x: x * 2)(np.ones((3, 5, 7), np.float32))  # the counter does count
        assert counter.count == 1
        for image in images:
            (found,) = detector(image, threshold=THRESHOLD)
            assert found.image_size == image.shape[:2]
    assert counter.count - 1 <= len(buckets)
    assert set(detector.compiled_shapes) == {(1, *b) for b in buckets}


def test_batches_within_a_bucket_equal_single_images():
    model = tiny_model()
    detector = Detector(model, small_processor(), batch_size=2)
    portrait, landscape = photo(PHOTO_PORTRAIT), photo(PHOTO_LANDSCAPE)
    images = [portrait, landscape, portrait[:600, :500], portrait[::-1]]
    together = detector(images, threshold=THRESHOLD)
    assert (2, 192, 128) in detector.compiled_shapes  # three portraits: a batch of 2, then 1
    for image, found in zip(images, together):
        (alone,) = detector(image, threshold=THRESHOLD)
        np.testing.assert_array_equal(found.labels, alone.labels)
        np.testing.assert_allclose(found.scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(found.boxes, alone.boxes, atol=1e-3)


@pytest.mark.parametrize(
    "count, batch_size, expected",
    [
        (1, 4, [1]),
        (4, 4, [4]),
        (7, 4, [4, 2, 1]),
        (13, 4, [4, 4, 4, 1]),
        (6, 3, [3, 3]),
        (5, 3, [3, 2]),
    ],
)
def test_chunk_sizes(count, batch_size, expected):
    assert _chunk_sizes(count, batch_size) == expected


def test_bucket_settings():
    model = tiny_model()
    default = Detector(model, ImageProcessor()).processor.buckets
    assert 800 in default and 1333 in default and 1280 in default and 896 in default
    assert Detector(model, ImageProcessor()).bucket((800, 1216)) == (800, 1280)
    assert Detector(model, ImageProcessor(), buckets=None).bucket((800, 1216)) == (800, 1216)
    assert Detector(model, ImageProcessor(), buckets=(1000, 1400)).bucket((600, 900)) == (
        1000,
        1400,
    )
    assert Detector(model, ImageProcessor(buckets=(1024, 1536))).processor.buckets == (1024, 1536)
    fixed = ImageProcessor(pad_size=(1333, 1333))
    assert Detector(model, fixed).bucket((480, 640)) == (1333, 1333)
    assert Detector(model, small_processor(), buckets=None).bucket((20, 20)) == (128, 128)
    assert Detector(model, ImageProcessor(do_pad=False)).processor.do_pad  # padding is needed
    tiny = ImageProcessor(do_resize=False)
    assert Detector(model, tiny, buckets=None).bucket((20, 30)) == (32, 32)  # backbone minimum


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_close_to_float32():
    """bf16 parameters and activations (BatchStat and MSDA accumulation in float32). Measured on
    the four fixture photos: scores within 0.0018 and boxes within 2.0 px (0.3% of the 640-pixel
    side, about bfloat16's 8-bit mantissa) of float32; tolerances 0.01 and 1% of the side."""
    model = tiny_model()
    fp32 = Detector(model, small_processor())
    bf16 = Detector(model, small_processor(), dtype=jnp.bfloat16)
    params = jax.tree.leaves(bf16._params)
    assert params and all(p.dtype == jnp.bfloat16 for p in params)
    stats = [x for x in jax.tree.leaves(bf16._rest) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert stats and all(x.dtype == jnp.float32 for x in stats)  # frozen batch-norm statistics
    image = photo(PHOTO_PORTRAIT)
    scores32, boxes32 = raw_outputs(fp32, image)
    scores16, boxes16 = raw_outputs(bf16, image)
    assert np.abs(scores16 - scores32).max() < 0.01
    assert np.abs(boxes16 - boxes32).max() < 0.01 * max(image.shape)
    assert not np.array_equal(scores16, scores32)  # really ran in bfloat16
    found = bf16(image, threshold=THRESHOLD)[0]
    assert found.scores.dtype == np.float32 and found.boxes.dtype == np.float32


def test_dtype_validation():
    model = tiny_model()
    with pytest.raises(ValueError, match="dtype must be one of"):
        Detector(model, dtype=jnp.float16)
    assert Detector(model, dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="DeformableDetrForObjectDetection"):
        Detector(object())
    with pytest.raises(ValueError, match="batch_size"):
        Detector(model, batch_size=0)


# ----------------------------------------------------------------------------- loading


def test_from_pretrained_ours_and_hub_folders(tmp_path):
    from deformable_detr_jax.checkpoint import save_pretrained
    from deformable_detr_jax.convert import save_pytorch_checkpoint

    model = tiny_model()
    processor = small_processor()
    image = photo(PHOTO_PORTRAIT)
    expected = Detector(model, processor)(image, threshold=THRESHOLD)[0]

    save_pretrained(model, tmp_path / "ours", processor=processor)
    # the hub's layout (config.json + model.safetensors); as transformers writes it:
    # tests/test_inference_vs_transformers.py
    save_pytorch_checkpoint(model, tmp_path / "hub")
    processor.save_pretrained(tmp_path / "hub")
    for folder in ("ours", "hub"):
        detector = Detector.from_pretrained(tmp_path / folder)
        assert detector.processor.size == processor.size
        assert detector.processor.resize_backend == "pil"
        found = detector(image, threshold=THRESHOLD)[0]
        np.testing.assert_array_equal(found.labels, expected.labels, err_msg=folder)
        np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5, err_msg=folder)
        np.testing.assert_allclose(found.boxes, expected.boxes, atol=1e-3, err_msg=folder)
        assert found.label_names == expected.label_names

    bf16 = Detector.from_pretrained(tmp_path / "ours", dtype="bfloat16")
    assert bf16.dtype == jnp.bfloat16
    # no preprocessor_config.json: transformers' defaults (shortest 800), then default buckets
    (tmp_path / "hub" / "preprocessor_config.json").unlink()
    plain = Detector.from_pretrained(tmp_path / "hub", batch_size=2)
    assert plain.processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    assert plain.batch_size == 2 and 800 in plain.processor.buckets


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder or weights file at"):
        Detector.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError) as error:
        Detector.from_pretrained(tmp_path / "empty")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'empty'} holds no weights: expected model.safetensors")
    assert "found nothing" in message and "Pass the weights file itself" in message


# ----------------------------------------------------------------------------- drawing


def test_draw():
    model = tiny_model()
    detector = Detector(model, small_processor())
    image = photo(PHOTO_PORTRAIT)
    found = detector(image, threshold=THRESHOLD)[0]
    drawn = detector.draw(image, found)
    assert isinstance(drawn, PIL.Image.Image) and drawn.size == (image.shape[1], image.shape[0])
    pixels = np.asarray(drawn)
    assert not np.array_equal(pixels, image)
    np.testing.assert_array_equal(np.asarray(detector.draw(PHOTO_PORTRAIT, found)), pixels)
    # one box alone (the first that lies inside the image): its outline's bottom edge has the
    # label's colour right across
    height, width = image.shape[:2]
    inside = [
        i
        for i, (a, b, c, d) in enumerate(found.boxes)
        if a > 2 and b > 2 and c < width - 3 and d < height - 3 and c - a > 20
    ]
    assert inside, "no detection inside the image to draw alone"
    i = inside[0]
    one = Detections(
        found.boxes[i : i + 1],
        found.scores[i : i + 1],
        found.labels[i : i + 1],
        found.label_names[i : i + 1],
        found.image_size,
    )
    x0, _, x1, y1 = (int(v) for v in found.boxes[i])
    edge = np.asarray(draw_detections(image, one))[y1 - 1, x0 + 3 : x1 - 2]  # width-2 outline
    assert len(edge) > 10 and (edge == PALETTE[found.labels[i] % len(PALETTE)]).all()
    empty = Detections(
        np.zeros((0, 4), np.float32),
        np.zeros(0, np.float32),
        np.zeros(0, np.int64),
        (),
        image.shape[:2],
    )
    np.testing.assert_array_equal(np.asarray(draw_detections(image, empty)), image)
    with pytest.raises(ValueError, match="draw on the image that was detected"):
        detector.draw(image[:100], found)


def test_detections_api():
    found = Detections(
        np.array([[1, 2, 30, 40]], np.float32),
        np.array([0.9], np.float32),
        np.array([3]),
        ("person",),
        (50, 60),
    )
    assert len(found) == 1
    assert found.to_list() == [
        {
            "label": "person",
            "label_id": 3,
            "score": pytest.approx(0.9),
            "box": [1.0, 2.0, 30.0, 40.0],
        }
    ]
    assert "person" in str(found) and "1 detection(s) in a 50x60 image" in str(found)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda d: d / "empty.jpg", "file is empty"),
        (lambda d: d / "text.jpg", "cannot be read as an image"),
        (lambda d: d / "missing.jpg", "no such file"),
        (lambda d: np.zeros((0, 10, 3), np.uint8), "zero height or width"),
        (lambda d: np.ones((20, 30, 3), np.int32), "dtype int32"),
        (lambda d: np.ones((20, 30, 5), np.uint8), "5 channels"),
        (lambda d: np.ones((3, 20, 30), np.uint8), "30 channels"),
        (lambda d: PIL.Image.new("RGB", (0, 0)), "is empty"),
        (lambda d: np.ones((1, 4000, 3), np.uint8), "aspect ratio"),
    ],
)
def test_bad_images_name_the_image(tmp_path, make_bad, message):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a jpeg")
    model = tiny_model()
    detector = Detector(model, small_processor())
    bad = make_bad(tmp_path)
    good = np.ones((40, 40, 3), np.uint8)
    with pytest.raises(ImageError, match=message) as info:
        detector([good, good, bad], threshold=THRESHOLD)
    assert "image 2" in str(info.value)
    if isinstance(bad, pathlib.Path):
        assert str(bad) in str(info.value)
    assert detector.compiled_shapes == ()  # nothing ran


def test_bad_image_does_not_stop_the_others():
    model = tiny_model()
    detector = Detector(model, small_processor())
    image = photo(PHOTO_PORTRAIT)
    results = detector(
        [image, np.ones((5, 5, 2), np.uint8), image], threshold=THRESHOLD, on_error="return"
    )
    assert isinstance(results[1], ImageError) and "image 1" in str(results[1])
    assert isinstance(results[0], Detections) and isinstance(results[2], Detections)
    np.testing.assert_array_equal(results[0].scores, results[2].scores)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval(threshold):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        Detector(model)(np.ones((40, 40, 3), np.uint8), threshold=threshold)


def test_other_argument_errors():
    model = tiny_model()
    detector = Detector(model)
    with pytest.raises(ValueError, match="no images"):
        detector([])
    with pytest.raises(ValueError, match="on_error"):
        detector(np.ones((40, 40, 3), np.uint8), on_error="ignore")
    with pytest.raises(TypeError, match="image 0 has type dict"):
        detector({"image": 1})
    with pytest.raises(TypeError, match="padding_invariant must be True or False"):
        Detector(model, padding_invariant="yes")
