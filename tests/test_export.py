"""Deployment export (`deformable_detr_jax.export`) of every variant, run outside this package.

Each variant (plain, box refinement, two-stage, single-scale, five levels; small random models,
tests/random_models.py) is exported once, as ONNX and as StableHLO, for a batch of two padded
images (random pixels, different real regions). The ONNX file runs in onnxruntime (CPU) and the
StableHLO file is reloaded by `jax.export.deserialize` in a subprocess that never imports this
package; both are compared with the eager float64 model (an independent truth: the jitted
program once sampled the wrong pixels on pixel centres, issue 24), and the StableHLO file also
with `Detector.forward`, the program it serialises.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx  # the [export] extra and jax2onnx: `make test` installs them in both lanes
import onnxruntime as ort
import pytest
from flax import nnx

from deformable_detr_jax import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    Detector,
    convert_state_dict,
    export_state_dict,
)
from deformable_detr_jax.export import OPSET, export_onnx, export_stablehlo
from tests import subprocess_utils
from tests.random_models import (
    SMALL,
    TINY_CONVNEXT,
    TINY_SWIN,
    drawn_model,
    random_model,
    small_config,
)

VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale": {"num_feature_levels": 1},
    "five_levels": {"num_feature_levels": 5},
}
# the other backbones (no ResNet fields): patch and window sizes no image side is a multiple of
BACKBONES = {
    "convnext": dict(TINY_CONVNEXT, num_feature_levels=4, with_box_refine=True),
    "swin": dict(TINY_SWIN, num_feature_levels=3, with_box_refine=True, two_stage=True),
}
BATCH, HEIGHT, WIDTH = 2, 96, 128
REAL = ((70, 100), (96, 81))  # (height, width) of each image's real region: padding on both sides
# against the eager float64 model, every variant, two-stage included (no top-k tie here)
EXPORT_TOL = 1e-4
STABLEHLO_TOL = 1e-6  # against `Detector.forward`, the same program
# as initialised (samples on pixel centres) or perturbed (tests/random_models.py)
FRESH = ("plain", "five_levels")
# jax2onnx reads flax Variables through `.value`, which flax deprecates (its warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:'.value' access is now deprecated")

_RELOAD = """
import sys
import jax
import numpy as np

inputs = np.load(sys.argv[1])
with open(sys.argv[2], "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
logits, pred_boxes = exported.call(inputs["pixel_values"], inputs["pixel_mask"])
np.savez(sys.argv[2] + ".out.npz", logits=np.asarray(logits), pred_boxes=np.asarray(pred_boxes))
ours = [m for m in sys.modules if m.split(".")[0] in ("deformable_detr_jax", "pallas_kernels")]
assert not ours, ours
"""


def _inputs():
    rng = np.random.default_rng(13)
    pixel_values = rng.standard_normal((BATCH, HEIGHT, WIDTH, 3)).astype(np.float32)
    pixel_mask = np.zeros((BATCH, HEIGHT, WIDTH), bool)
    for i, (h, w) in enumerate(REAL):
        pixel_mask[i, :h, :w] = True
    return pixel_values, pixel_mask


def _check_onnx(path, detector, expected, tol):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    # standard operators only: no custom domain, no local functions, no loops
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert not model.functions
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"Loop", "Scan", "If"}, ops
    # the sampling core became GridSample: one per level per attention layer
    config = detector.config
    layers = config.encoder_layers + config.decoder_layers
    assert sum(n.op_type == "GridSample" for n in model.graph.node) == (
        layers * config.num_feature_levels
    )
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["config"]) == config.to_hf()
    assert json.loads(meta["input_size"]) == {"batch": BATCH, "height": HEIGHT, "width": WIDTH}

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("pixel_values", [BATCH, HEIGHT, WIDTH, 3], "tensor(float)"),
        ("pixel_mask", [BATCH, HEIGHT, WIDTH], "tensor(bool)"),
    ]
    assert [o.name for o in session.get_outputs()] == ["logits", "pred_boxes"]
    pixel_values, pixel_mask = _inputs()
    logits, pred_boxes = session.run(None, {"pixel_values": pixel_values, "pixel_mask": pixel_mask})
    assert logits.shape == (BATCH, config.num_queries, config.num_labels)
    np.testing.assert_allclose(logits, expected[0], rtol=tol, atol=tol, err_msg="onnx logits")
    np.testing.assert_allclose(pred_boxes, expected[1], rtol=tol, atol=tol, err_msg="onnx boxes")
    return logits


def _eager_float64(model, pixel_values, pixel_mask):
    """The eager float64 model (the float32 weights, exactly), padding masked as `Detector`
    runs it: `(logits, pred_boxes)` float64."""
    with jax.enable_x64(True):
        model64 = convert_state_dict(export_state_dict(model), model.config, dtype=jnp.float64)
        out = model64(
            jnp.asarray(pixel_values, jnp.float64), jnp.asarray(pixel_mask), padding_invariant=True
        )
        return np.asarray(out.logits), np.asarray(out.pred_boxes)


def _check_stablehlo(path, folder, expected, truth):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess_utils.run(
        [sys.executable, "-c", _RELOAD, str(folder / "inputs.npz"), str(path)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    reloaded = np.load(str(path) + ".out.npz")
    for name, want, true in zip(("logits", "pred_boxes"), expected, truth):
        np.testing.assert_allclose(
            reloaded[name],
            want,
            rtol=STABLEHLO_TOL,
            atol=STABLEHLO_TOL,
            err_msg=f"stablehlo {name} vs Detector.forward",
        )
        np.testing.assert_allclose(
            reloaded[name],
            true,
            rtol=EXPORT_TOL,
            atol=EXPORT_TOL,
            err_msg=f"stablehlo {name} vs eager float64",
        )
    program = jax.export.deserialize(bytearray(path.read_bytes()))
    assert [a.shape for a in program.in_avals] == [
        (BATCH, HEIGHT, WIDTH, 3),
        (BATCH, HEIGHT, WIDTH),
    ]
    assert program.platforms == (jax.default_backend(),)


def _model(variant):
    # one encoder layer: jax2onnx's time grows with the model's size
    if variant in BACKBONES:
        config = DeformableDetrConfig(**{**SMALL, "encoder_layers": 1, **BACKBONES[variant]})
        return drawn_model(config, seed=len(variant))
    config = small_config(encoder_layers=1, **VARIANTS[variant])
    if variant in FRESH:
        return DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(len(variant)))
    return random_model(config, seed=len(variant))


@pytest.mark.parametrize("variant", [*VARIANTS, *BACKBONES])
def test_exported_variant_runs_outside_this_package(variant, tmp_path):
    """ONNX in onnxruntime and StableHLO reloaded in a process without this package, against
    the eager float64 model on the same padded batch."""
    pixel_values, pixel_mask = _inputs()
    np.savez(tmp_path / "inputs.npz", pixel_values=pixel_values, pixel_mask=pixel_mask)
    model = _model(variant)
    truth = _eager_float64(model, pixel_values, pixel_mask)
    detector = Detector(model, compile_cache=None)
    expected = [np.asarray(x) for x in detector.forward(pixel_values, pixel_mask)]
    kwargs = dict(height=HEIGHT, width=WIDTH, batch=BATCH)
    onnx_path = export_onnx(detector, tmp_path / f"{variant}.onnx", **kwargs)
    stablehlo_path = export_stablehlo(detector, tmp_path / f"{variant}.stablehlo", **kwargs)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (onnx_path, stablehlo_path):  # as open() makes files, not mkstemp's 0600
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path
    logits = _check_onnx(onnx_path, detector, truth, EXPORT_TOL)
    _check_stablehlo(stablehlo_path, tmp_path, expected, truth)
    if variant in ("box_refine", *BACKBONES):
        # the image whose real region is 70 x 100 gives in the 96 x 128 program what the model
        # gives on the 70 x 100 image alone: the padding is masked through the exported model
        h, w = REAL[0]
        alone, _ = detector.forward(pixel_values[:1, :h, :w], pixel_mask[:1, :h, :w])
        np.testing.assert_allclose(logits[0], np.asarray(alone)[0], rtol=1e-4, atol=1e-4)


def test_bfloat16_stablehlo_is_the_bfloat16_detector(tmp_path):
    """The same bfloat16 program (weights baked in): equal to the bfloat16 `Detector` (0.0
    difference on jax 0.10.2 and 0.12.0.1), and not to the float32 one."""
    config = small_config(encoder_layers=1)
    detector = Detector(random_model(config, seed=4), dtype="bfloat16", compile_cache=None)
    pixel_values, pixel_mask = _inputs()
    path = export_stablehlo(
        detector,
        tmp_path / "bf16.stablehlo",
        height=HEIGHT,
        width=WIDTH,
        batch=BATCH,
        dtype="bfloat16",
    )
    program = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    got = program.call(pixel_values, pixel_mask)
    want = detector.forward(pixel_values, pixel_mask)
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=STABLEHLO_TOL, atol=STABLEHLO_TOL
        )
    float32 = Detector(random_model(config, seed=4), compile_cache=None)
    logits32, _ = float32.forward(pixel_values, pixel_mask)
    assert np.abs(np.asarray(got[0]) - np.asarray(logits32)).max() > 1e-3  # bfloat16 indeed
