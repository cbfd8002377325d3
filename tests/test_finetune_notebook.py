"""examples/finetune.ipynb runs top to bottom (nbclient, a fresh kernel): a small random model
saved in transformers' layout (3 labels) is fine-tuned on 5 COCO classes of coco128 at 128 pixels,
evaluated, drawn, exported and reloaded.

coco128 is `../shared/data/coco128` where it exists (CI, developer machines); elsewhere the test
builds a four-image copy of it from `tests/fixtures/` (the photos, `coco128/labels`,
`coco128/names.yaml`)."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shutil

import nbclient  # test dependencies: nbclient, nbformat, ipykernel (the "python3" kernel)
import nbformat

from deformable_detr_jax import save_pytorch_checkpoint
from tests.random_models import random_model, small_config

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOK = ROOT / "examples" / "finetune.ipynb"
COCO128 = ROOT.parent / "shared" / "data" / "coco128"
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
STEPS = 40
CLASSES = "person, car, cup, chair, book"  # the notebook's new label set
# shapes_tiny's backbone (the model `make demo` trains), single-scale, 1 + 1 layers: the fresh
# kernel compiles the train step in seconds
START = small_config(
    ((1, 1, 1, 1), "basic", (32, 64, 128, 256)),
    encoder_layers=1,
    decoder_layers=1,
    num_feature_levels=1,
    num_queries=16,
    with_box_refine=True,
    num_labels=3,
    id2label={0: "circle", 1: "square", 2: "triangle"},
)


def coco128(tmp_path: pathlib.Path) -> pathlib.Path:
    """The shared coco128 folder, or a copy of its four images in tests/fixtures."""
    if COCO128.is_dir():
        return COCO128
    folder = tmp_path / "coco128"
    shutil.copytree(FIXTURES / "coco128", folder)
    (folder / "images" / "train2017").mkdir(parents=True)
    for label in (folder / "labels" / "train2017").glob("*.txt"):
        image = f"{label.stem}.jpg"
        shutil.copyfile(FIXTURES / image, folder / "images" / "train2017" / image)
    return folder


def test_finetune_notebook_runs(tmp_path, monkeypatch):
    save_pytorch_checkpoint(random_model(START, seed=11), tmp_path / "start")
    workdir = tmp_path / "work"
    monkeypatch.setenv("DEFORMABLE_DETR_MODEL", str(tmp_path / "start"))
    monkeypatch.setenv("DEFORMABLE_DETR_DATA", str(coco128(tmp_path)))
    monkeypatch.setenv("DEFORMABLE_DETR_WORKDIR", str(workdir))
    monkeypatch.setenv("DEFORMABLE_DETR_STEPS", str(STEPS))
    monkeypatch.setenv("DEFORMABLE_DETR_IMAGE_SIZE", "128")
    monkeypatch.setenv("DEFORMABLE_DETR_THRESHOLD", "0.05")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "its 3 labels: circle, square, triangle\n" in text
    assert f"label set (5 classes): {CLASSES}" in text
    # the class heads (1 decoder layer: class_embed.0) re-initialised, the rest loaded
    assert "2 tensors kept fresh: class_embed.0.bias, class_embed.0.kernel" in text
    assert f"step {STEPS}/{STEPS}" in text  # the progress line
    assert f"fine-tuned {STEPS} steps; the model is in {workdir / 'model'}" in text
    (ap,) = re.findall(r"held-out COCO AP (-?\d+\.\d+), AP50", text)
    assert 0.0 <= float(ap) <= 1.0

    found = re.findall(r"(\d+) detection\(s\) in a \d+x\d+ image\n((?:  .*\n)*)", text)
    assert len(found) == 1 and int(found[0][0]) > 0
    names = {line.split()[0] for line in found[0][1].splitlines()}
    assert names and names <= set(CLASSES.split(", ")), names
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1

    exports = re.findall(r"reloaded, its (\d+) detections equal the detector's: (\w+)", text)
    onnx = importlib.util.find_spec("jax2onnx") and importlib.util.find_spec("onnxruntime")
    assert exports == [(found[0][0], "True")] * (2 if onnx else 1)
    assert (workdir / "model.stablehlo").is_file()
    if onnx:
        assert (workdir / "model.onnx").is_file()
    else:
        assert "ONNX: not exported, jax2onnx or onnxruntime is not installed" in text
