"""Bad input to the deployment export, API and CLI: typed errors, one line, nothing written.

Also the export-friendly sampling core (`export/onnx_rules.py`) against the reference, in JAX
and as ONNX in onnxruntime, and that the conversion rules are gone after the conversion.
"""

from __future__ import annotations

import errno
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import DeformableDetrForObjectDetection, Detector, save_pretrained
from deformable_detr_jax.convert.errors import CheckpointError
from deformable_detr_jax.export import (
    OutputExistsError,
    UnknownFormatError,
    UnsupportedSizeError,
    export,
    export_stablehlo,
)
from deformable_detr_jax.export import __main__ as cli
from deformable_detr_jax.export.common import atomic_output, check_input, feature_sizes
from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_reference
from tests import subprocess_utils
from tests.random_models import random_model, small_config

# jax2onnx reads flax Variables through `.value`, which flax deprecates (its warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:'.value' access is now deprecated")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "small"
    # 30 proposals: a 32 x 32 input has 4x4 + 2x2 + 1 + 1 = 22 positions, 96 x 96 has 193
    config = small_config(two_stage=True, with_box_refine=True, two_stage_num_proposals=30)
    save_pretrained(random_model(config, seed=2), folder)
    return folder


@pytest.fixture(scope="module")
def detector():
    return Detector(random_model(small_config(), seed=1), compile_cache=None)


def _only_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# ----------------------------------------------------------------------------- sizes


def test_feature_sizes_are_the_models_spatial_shapes():
    """`feature_sizes` (used to check sizes before tracing) equals the levels the model makes."""
    for fields in (
        {},
        {"num_feature_levels": 1},
        {"num_feature_levels": 5},
        {"num_feature_levels": 1, "dilation": True},
    ):
        config = small_config(**fields)
        abstract = nnx.eval_shape(
            lambda c=config: DeformableDetrForObjectDetection(c, rngs=nnx.Rngs(0))
        )
        graphdef, state = nnx.split(abstract)
        for height, width in ((33, 95), (64, 64), (97, 130)):
            pixels = jax.ShapeDtypeStruct((1, height, width, 3), np.float32)
            out = jax.eval_shape(
                lambda s, p, g=graphdef: nnx.merge(g, s)(p).encoder_last_hidden_state, state, pixels
            )
            sizes = feature_sizes(config, height, width)
            assert out.shape[1] == sum(h * w for h, w in sizes), (fields, height, width, sizes)


@pytest.mark.parametrize(
    "height, width, batch, match",
    [
        (31, 128, 1, "at least 32x32"),
        (96, 0, 1, "width must be a positive integer"),
        (96, 128, 0, "batch must be a positive integer"),
        (96, 12.5, 1, "width must be a positive integer"),
    ],
)
def test_a_size_the_model_cannot_take_is_refused(detector, tmp_path, height, width, batch, match):
    out = tmp_path / "m.stablehlo"
    with pytest.raises(UnsupportedSizeError, match=match):
        export_stablehlo(detector, out, height=height, width=width, batch=batch)
    assert not list(tmp_path.iterdir())


def test_two_stage_needs_as_many_positions_as_proposals():
    config = small_config(two_stage=True, with_box_refine=True, two_stage_num_proposals=100)
    # 64 x 64: 8x8 + 4x4 + 2x2 + 1x1 = 85 positions < 100 proposals
    with pytest.raises(UnsupportedSizeError, match="100 proposals .* only 85"):
        check_input(config, 64, 64)
    assert check_input(config, 96, 96).height == 96  # 144 + 36 + 9 + 4 = 193


# ----------------------------------------------------------------------------- API errors


def test_unknown_format_is_a_typed_error(tmp_path):
    with pytest.raises(UnknownFormatError, match="'tflite'.*onnx, stablehlo"):
        export("unused", tmp_path / "m", format="tflite", height=96, width=128)


def test_existing_output_is_kept(detector, tmp_path):
    out = tmp_path / "m.stablehlo"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="exists"):
        export_stablehlo(detector, out, height=96, width=128)
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.stablehlo"]


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    out = tmp_path / "sub" / "m.onnx"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(out, overwrite=False) as tmp:
            tmp.write_bytes(b"half a model")
            raise RuntimeError("disk full")
    assert not list((tmp_path / "sub").iterdir())


def test_a_failed_export_leaves_no_partial_file(detector, tmp_path, monkeypatch):
    exported = jax.export.Exported.serialize

    def fail(self, *args, **kwargs):
        exported(self, *args, **kwargs)
        raise MemoryError("out of memory while serializing")

    monkeypatch.setattr(jax.export.Exported, "serialize", fail)
    with pytest.raises(MemoryError):
        export_stablehlo(detector, tmp_path / "m.stablehlo", height=64, width=64)
    assert not list(tmp_path.iterdir())


def test_a_path_that_is_not_a_model_is_a_typed_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "missing", tmp_path / "m.onnx", format="onnx", height=96, width=128)
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError):
        export(folder, tmp_path / "m.onnx", format="stablehlo", height=96, width=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_model"]


def test_onnx_is_float32_only(detector, tmp_path):
    from deformable_detr_jax.export import ExportError, export_onnx

    with pytest.raises(ExportError, match="float32 only"):
        export_onnx(detector, tmp_path / "m.onnx", height=64, width=64, dtype="bfloat16")
    assert not list(tmp_path.iterdir())


def test_a_bfloat16_detector_cannot_export_float32(tmp_path):
    from deformable_detr_jax.export import ExportError

    detector = Detector(random_model(small_config(), seed=1), dtype="bfloat16", compile_cache=None)
    with pytest.raises(ExportError, match="computes in bfloat16"):
        export_stablehlo(detector, tmp_path / "m", height=64, width=64, dtype="float32")


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_a_program_that_reloads(model_folder, tmp_path, capsys, rng):
    out = tmp_path / "m.stablehlo"
    args = [
        os.fspath(model_folder),
        os.fspath(out),
        "--format",
        "stablehlo",
        "--height",
        "64",
        "--width",
        "80",
        "--batch",
        "2",
    ]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    program = jax.export.deserialize(bytearray(out.read_bytes()))
    pixels = rng.standard_normal((2, 64, 80, 3)).astype(np.float32)
    mask = np.ones((2, 64, 80), bool)
    mask[1, 50:] = False
    mask[1, :, 70:] = False
    want = Detector.from_pretrained(model_folder, compile_cache=None).forward(pixels, mask)
    for got, expected in zip(program.call(pixels, mask), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    # the same OUT again: refused, file kept
    before = out.read_bytes()
    assert cli.main(args) == 2
    assert "exists" in _only_error_line(capsys)
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("format", ["--format", "tflite"], "unknown export format 'tflite'"),
        ("dtype", ["--format", "onnx", "--dtype", "float16"], "--dtype must be one of"),
        ("onnx_bf16", ["--format", "onnx", "--dtype", "bfloat16"], "onnx is float32 only"),
        ("size", ["--format", "stablehlo", "--height", "20"], "at least 32x32"),
        ("proposals", ["--format", "stablehlo", "--height", "32", "--width", "32"], "proposals"),
        ("height", ["--format", "onnx", "--height", "tall"], "invalid int value: 'tall'"),
    ],
)
def test_cli_bad_input_is_one_line(model_folder, tmp_path, capsys, case, extra, message):
    base = {"--height": "96", "--width": "96"}
    args = [os.fspath(model_folder), os.fspath(tmp_path / "m.out")]
    for flag, value in base.items():
        if flag not in extra:
            args += [flag, value]
    assert _main(args + extra) == 2
    assert message in _only_error_line(capsys)
    assert not list(tmp_path.iterdir())


def _main(args) -> int:
    """The CLI's exit status (argparse's own errors exit through SystemExit)."""
    try:
        return cli.main(args)
    except SystemExit as stop:
        return stop.code


def test_cli_model_that_is_not_a_model_is_one_line(tmp_path, capsys):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    for model in (tmp_path / "missing", folder):
        status = _main(
            [
                os.fspath(model),
                os.fspath(tmp_path / "m.onnx"),
                "--format",
                "onnx",
                "--height",
                "96",
                "--width",
                "96",
            ]
        )
        assert status == 2
        assert "cannot load the model" in _only_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_model"]


def test_cli_disk_full_is_status_5_and_leaves_nothing(model_folder, tmp_path, capsys, monkeypatch):
    serialize = jax.export.Exported.serialize

    def full(self, *args, **kwargs):
        serialize(self, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jax.export.Exported, "serialize", full)
    out = tmp_path / "m.stablehlo"
    status = _main(
        [
            os.fspath(model_folder),
            os.fspath(out),
            "--format",
            "stablehlo",
            "--height",
            "64",
            "--width",
            "64",
        ]
    )
    assert status == 5
    line = _only_error_line(capsys)
    assert line == f"error: cannot write {out}: No space left on device; nothing was left there"
    assert not list(tmp_path.iterdir())


def test_cli_in_a_real_process_prints_one_line(tmp_path):
    done = subprocess_utils.run(
        [
            sys.executable,
            "-m",
            "deformable_detr_jax.export",
            os.fspath(tmp_path / "none"),
            os.fspath(tmp_path / "m.onnx"),
            "--format",
            "onnx",
            "--height",
            "96",
            "--width",
            "96",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: cannot load the model from"), done.stderr


# ----------------------------------------------------------------------------- sampling core

SHAPES = ((9, 13), (5, 7), (3, 4), (1, 2))


def _core_inputs(rng, bs=2, len_q=37, nheads=3, npoints=4, head_dim=8):
    len_v = sum(h * w for h, w in SHAPES)
    value = rng.standard_normal((bs, len_v, nheads, head_dim)).astype(np.float32)
    # beyond [0, 1] on both sides, so that border and fully outside corners are covered
    loc = rng.uniform(-0.15, 1.15, (bs, len_q, nheads, len(SHAPES), npoints, 2)).astype(np.float32)
    loc[0, 0, 0, 0, 0] = (0.5 / 13, 0.5 / 9)  # exactly on a pixel centre
    loc[0, 1, 0, 0, 0] = (0.0, 1.0)  # on the border
    attn = rng.uniform(0, 1, (bs, len_q, nheads, len(SHAPES), npoints)).astype(np.float32)
    return value, loc, attn


def test_grid_sample_core_matches_the_reference(rng):
    from deformable_detr_jax.export.onnx_rules import ms_deform_attn_grid_sample

    value, loc, attn = _core_inputs(rng)
    got = jax.jit(ms_deform_attn_grid_sample, static_argnums=1)(value, SHAPES, loc, attn)
    want = jax.jit(ms_deform_attn_reference, static_argnums=1)(value, SHAPES, loc, attn)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=5e-6)


def test_grid_sample_core_in_onnxruntime_matches_the_reference(rng):
    import jax2onnx
    import onnxruntime as ort

    from deformable_detr_jax.export.onnx_rules import ms_deform_attn_grid_sample, onnx_rules

    value, loc, attn = _core_inputs(rng)
    with onnx_rules():
        proto = jax2onnx.to_onnx(
            lambda v, loc_, a: ms_deform_attn_grid_sample(v, SHAPES, loc_, a), [value, loc, attn]
        )
    assert sum(node.op_type == "GridSample" for node in proto.graph.node) == len(SHAPES)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (value, loc, attn))))
    want = ms_deform_attn_reference(value, SHAPES, loc, attn)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=5e-6)


def test_the_conversion_rules_are_undone_afterwards():
    from jax2onnx.plugins import plugin_system

    from deformable_detr_jax.export import onnx_rules as rules
    from deformable_detr_jax.modeling import deformable_attention
    from pallas_kernels import ms_deform_attn

    plugin_system.import_all_plugins()
    before = plugin_system.PLUGIN_REGISTRY[jax.lax.reduce_window_max_p.name]
    with rules.onnx_rules():
        assert deformable_attention.ms_deform_attn is rules.ms_deform_attn_grid_sample
        assert plugin_system.PLUGIN_REGISTRY[jax.lax.reduce_window_max_p.name] is not before
    assert deformable_attention.ms_deform_attn is ms_deform_attn
    assert plugin_system.PLUGIN_REGISTRY[jax.lax.reduce_window_max_p.name] is before
    assert rules.grid_sample_p.name not in plugin_system.PLUGIN_REGISTRY
