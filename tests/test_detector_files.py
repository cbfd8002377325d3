"""`Detector.from_pretrained` on a single weights file (the architecture read off the weights,
the default processor settings with a warning), on folders without weights (one typed error),
and the `save_pytorch_checkpoint` round trip keeping the processor settings (`.bin` and `.pth`
files, written with torch: tests/test_detector_torch_files.py).

The expected outputs are those of the model in memory (`tests/test_hub.py`'s tiny model).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from deformable_detr_jax import Detector, import_pytorch_checkpoint
from deformable_detr_jax.cli.predict import main as predict
from deformable_detr_jax.convert import CheckpointError, save_pytorch_checkpoint
from tests.test_hub import expected, image, outputs, tiny_model, tiny_processor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model in transformers' layout, with its processor settings."""
    folder = tmp_path_factory.mktemp("files") / "model"
    save_pytorch_checkpoint(tiny_model(), folder, processor=tiny_processor())
    return folder


def assert_outputs_equal(detector: Detector, seed: int = 5) -> None:
    for got, want in zip(outputs(detector), expected(seed)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_safetensors_file_alone(folder):
    with pytest.warns(UserWarning) as warned:
        plain = Detector.from_pretrained(folder / "model.safetensors", compile_cache=None)
    (warning,) = [w for w in warned if "default pre-processing" in str(w.message)]
    message = str(warning.message)
    assert message.startswith(f"{folder / 'model.safetensors'} is a weights file without ")
    assert "{'shortest_edge': 800, 'longest_edge': 1333}" in message
    assert "mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)" in message
    assert plain.processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    # the architecture read off the weights: the folder's outputs (its labels have no names)
    detector = Detector.from_pretrained(
        folder / "model.safetensors", processor=tiny_processor(), compile_cache=None
    )
    assert_outputs_equal(detector)
    assert detector.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert detector.config.num_labels == 5 and detector.config.decoder_layers == 2


def test_the_round_trip_keeps_the_processor(folder, tmp_path):
    """The README recipe: a folder in, a transformers folder out, a Detector on it resizing as
    on the source folder and detecting the same."""
    source = Detector.from_pretrained(folder, compile_cache=None)
    checkpoint = import_pytorch_checkpoint(folder)
    assert checkpoint.processor == tiny_processor()
    save_pytorch_checkpoint(checkpoint.model, tmp_path / "hf", processor=checkpoint.processor)
    again = Detector.from_pretrained(tmp_path / "hf", compile_cache=None)
    assert again.processor == source.processor
    assert again.bucket(image().shape[:2]) == source.bucket(image().shape[:2])
    assert_outputs_equal(again)
    want = source(image(), threshold=0.02)[0]
    got = again(image(), threshold=0.02)[0]
    assert got.label_names == want.label_names and len(got.scores) > 0
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=0, atol=1e-4)

    # without a processor: transformers' DeformableDetrImageProcessor defaults are written
    save_pytorch_checkpoint(tiny_model(), tmp_path / "default")
    written = json.loads((tmp_path / "default" / "preprocessor_config.json").read_text())
    assert written["size"] == {"shortest_edge": 800, "longest_edge": 1333}
    assert written["image_mean"] == [0.485, 0.456, 0.406]
    assert written["image_std"] == [0.229, 0.224, 0.225]
    assert written["rescale_factor"] == pytest.approx(1 / 255)
    assert written["do_resize"] and written["do_normalize"] and written["do_pad"]
    assert written["image_processor_type"] == "DeformableDetrImageProcessor"


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"config.json": "{}"},
        {"preprocessor_config.json": "{}", "README.md": "# a model"},
        {"model.safetensors.index.json": '{"weight_map": {"a": "model-1.safetensors"}}'},
        {"model.safetensors": "not a checkpoint"},
    ],
    ids=["empty", "config-only", "processor-only", "missing-shard", "not-weights"],
)
def test_a_folder_without_weights_is_one_typed_error(files, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    with pytest.raises(CheckpointError) as error:
        Detector.from_pretrained(model)
    message = str(error.value)
    assert "\n" not in message and str(model) in message, message
    assert predict(["--model", str(model), "image.png"]) == 2
    captured = capsys.readouterr()
    want = f"error: cannot load the model from {str(model)!r}: {message}"
    assert captured.err.strip().splitlines() == [want], captured.err
    if not files:
        assert message.startswith(f"{model} holds no weights: expected model.safetensors")


def test_an_orbax_folder_without_config(tmp_path):
    model = tmp_path / "model"
    (model / "params").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="written by save_pretrained") as error:
        Detector.from_pretrained(model)
    assert "\n" not in str(error.value)
