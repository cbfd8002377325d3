"""examples/inference.ipynb runs top to bottom (nbclient, a fresh kernel) against a small saved
model and a fixture photo, and shows detections and an annotated image."""

from __future__ import annotations

import pathlib

import nbclient  # test dependencies: nbclient, nbformat, ipykernel (the "python3" kernel)
import nbformat

from deformable_detr_jax.checkpoint import save_pretrained
from tests.test_inference import PHOTO_PORTRAIT, small_processor, tiny_model

NOTEBOOK = pathlib.Path(__file__).parents[1] / "examples" / "inference.ipynb"


def test_inference_notebook_runs(tmp_path, monkeypatch):
    # single-scale, 1+2 layers: the fresh kernel compiles it in a few seconds
    save_pretrained(
        tiny_model(seed=5, num_feature_levels=1), tmp_path / "model", processor=small_processor()
    )
    monkeypatch.setenv("DEFORMABLE_DETR_MODEL", str(tmp_path / "model"))
    monkeypatch.setenv("DEFORMABLE_DETR_IMAGES", str(PHOTO_PORTRAIT))
    monkeypatch.setenv("DEFORMABLE_DETR_THRESHOLD", "0.02")
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
    assert "single-scale Deformable DETR, 5 labels" in text
    assert "detection(s) in a 640x512 image" in text
    assert "compiled programs (batch, height, width): ((1, 192, 128),)" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1
