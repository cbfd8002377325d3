"""`Detector` against transformers' processor + model + post-processing on the same random
weights: unpadded, bucketed (padding masked) and loaded from a folder transformers wrote."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from deformable_detr_jax import DeformableDetrConfig, convert_state_dict
from deformable_detr_jax.inference.detector import Detector
from tests import hf_reference as ref
from tests.random_models import SMALL, TINY_BOTTLENECK
from tests.test_inference import (
    NAMES,
    PHOTO_LANDSCAPE,
    PHOTO_PORTRAIT,
    SIZE,
    TINY,
    photo,
    small_processor,
)

pytestmark = pytest.mark.torch

# The random transformers model's scores sit around 0.5 (0.45..0.57): half of the top-100
# pass 0.5.
THRESHOLD = 0.5


def tiny_hf_config(**kwargs):
    return ref.hf_config(depth_layout=TINY_BOTTLENECK, **{**SMALL, **TINY, **kwargs})


@functools.cache
def tiny_models(seed: int = 3):
    """(transformers model, this package's model) holding the same random weights."""
    hf_model = ref.random_hf_model(tiny_hf_config(), seed=seed)
    config = DeformableDetrConfig.from_hf(hf_model.config.to_dict())
    return hf_model, convert_state_dict(ref.state_dict_numpy(hf_model), config)


def transformers_detections(image: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """transformers' processor + model + post-processing on one image (no padding)."""
    import torch
    from transformers.models.deformable_detr import DeformableDetrImageProcessor

    hf_model, _ = tiny_models()
    processor = DeformableDetrImageProcessor(size=SIZE)
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = hf_model(**inputs)
    (found,) = processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[image.shape[:2]]
    )
    return {k: v.numpy() for k, v in found.items()}


def test_detections_equal_transformers():
    """No buckets: each image runs unpadded, exactly as transformers runs it alone; a batch of
    mixed sizes gives each image its own detections, in input order."""
    _, model = tiny_models()
    detector = Detector(model, small_processor(), buckets=None)
    images = [photo(PHOTO_PORTRAIT), photo(PHOTO_LANDSCAPE)]
    ours = detector(images, threshold=THRESHOLD)
    for image, found in zip(images, ours):
        theirs = transformers_detections(image, THRESHOLD)
        assert len(found) > 3
        assert found.image_size == image.shape[:2]
        np.testing.assert_array_equal(found.labels, theirs["labels"])
        np.testing.assert_allclose(found.scores, theirs["scores"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(found.boxes, theirs["boxes"], rtol=0, atol=5e-3)  # pixels
        assert found.label_names == tuple(NAMES[i] for i in found.labels)
    assert set(detector.compiled_shapes) == {(1, 160, 128), (1, 128, 170)}


@pytest.mark.parametrize("path", [PHOTO_PORTRAIT, PHOTO_LANDSCAPE], ids=lambda p: p.stem)
def test_bucketed_detections_equal_transformers_on_the_image_alone(path):
    _, model = tiny_models()
    image = photo(path)
    detector = Detector(model, small_processor())
    unpadded = Detector(model, small_processor(), buckets=None)
    assert detector.bucket(image.shape[:2]) != unpadded.bucket(image.shape[:2])  # padded
    found = detector(image, threshold=THRESHOLD)[0]
    theirs = transformers_detections(image, THRESHOLD)
    assert len(found) > 3
    np.testing.assert_array_equal(found.labels, theirs["labels"])
    np.testing.assert_allclose(found.scores, theirs["scores"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(found.boxes, theirs["boxes"], rtol=0, atol=5e-3)  # pixels


def test_from_pretrained_folder_written_by_transformers(tmp_path):
    hf_model, model = tiny_models()
    processor = small_processor()
    image = photo(PHOTO_PORTRAIT)
    expected = Detector(model, processor)(image, threshold=THRESHOLD)[0]
    hf_model.save_pretrained(tmp_path / "hub")  # config.json + model.safetensors
    processor.save_pretrained(tmp_path / "hub")
    found = Detector.from_pretrained(tmp_path / "hub")(image, threshold=THRESHOLD)[0]
    np.testing.assert_array_equal(found.labels, expected.labels)
    np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(found.boxes, expected.boxes, atol=1e-3)
    assert found.label_names == expected.label_names
