"""The error exits of the predict and convert command lines (`deformable_detr_jax/cli/exits.py`): one
`error:` line on stderr, a documented status, the traceback in a report file for an internal
error. (train.py's are in `tests/test_training_faults.py`.)"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax.checkpoint import save_pretrained
from deformable_detr_jax.cli import exits
from deformable_detr_jax.cli.predict import main as predict
from deformable_detr_jax.convert import __main__ as convert_cli
from deformable_detr_jax.inference.detector import Detector
from deformable_detr_jax.processing.image_processor import ImageProcessor
from deformable_detr_jax.training.train_state import model_from_weights, model_spec, param_name
from tests.subprocess_utils import run
from tests.training_workers import tiny_model_config

PHOTO = os.path.join(os.path.dirname(__file__), "fixtures", "000000000086.jpg")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_errors") / "model"
    spec = model_spec(tiny_model_config(), ())
    # random weights from numpy: a model's init compiles for a minute on CPU, and these tests
    # never run it
    rng = np.random.default_rng(0)
    weights = {
        param_name(path): rng.uniform(0.5, 1.5, variable.shape).astype(variable.dtype)
        for path, variable in spec.variables
        if not isinstance(variable, nnx.RngState)
    }
    model = model_from_weights(spec, weights)
    processor = ImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, resize_backend="pil")
    save_pretrained(model, folder, processor=processor)
    return folder


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _report_path(line: str) -> str:
    return line[line.index("(full report: ") + len("(full report: ") : -1]


def test_predict_internal_error_is_one_line_with_the_traceback_in_a_file(
    model_folder, monkeypatch, capsys
):
    def broken(self, *args, **kwargs):
        raise RuntimeError("detector exploded")

    monkeypatch.setattr(Detector, "__call__", broken)
    assert predict(["--model", str(model_folder), PHOTO]) == exits.INTERNAL == 70
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: RuntimeError: detector exploded (an internal error")
    with open(_report_path(line)) as f:
        text = f.read()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    os.remove(_report_path(line))


def test_predict_output_folder_that_cannot_be_made_is_status_5(model_folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert predict(["--model", str(model_folder), PHOTO, "--out", str(blocker / "out")]) == 5
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot create --out '{blocker / 'out'}'")


@pytest.mark.parametrize(
    "raised, status, starts",
    [
        (OSError(errno.ENOSPC, "No space left on device", "dst/model"), 5, "error: [Errno 28]"),
        (OSError(errno.ENOENT, "No such file or directory", "src"), 2, "error: [Errno 2]"),
        (ValueError("src has no weights"), 2, "error: src has no weights"),
        (KeyError("unexpected"), 70, "error: KeyError: 'unexpected' (an internal error"),
        (KeyboardInterrupt(), 130, "error: python -m deformable_detr_jax.convert interrupted"),
    ],
)
def test_convert_statuses(monkeypatch, capsys, raised, status, starts):
    def failing(*args, **kwargs):
        raise raised

    monkeypatch.setattr(convert_cli, "convert", failing)
    assert convert_cli.main(["src", "dst"]) == status
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(starts), line
    if status == exits.INTERNAL:
        os.remove(_report_path(line))


def test_report_falls_back_to_the_temporary_folder(tmp_path, capsys):
    unwritable = tmp_path / "a_file"
    unwritable.write_text("")  # folder/errors cannot be made under a file
    try:
        raise RuntimeError("deep")
    except RuntimeError as err:
        status = exits.internal_error("tool", err, folder=unwritable)
    assert status == exits.INTERNAL
    path = _report_path(_one_error_line(capsys.readouterr().err))
    assert os.path.dirname(path) != str(unwritable) and os.path.isfile(path)
    os.remove(path)


def test_what_a_failed_command_prints_while_shutting_down_goes_to_its_report(tmp_path):
    """After the `error:` line nothing more reaches the terminal (Python or C-level writes on
    either stream); it lands at the end of the report file instead."""
    import sys

    script = (
        "import os, sys\n"
        "from deformable_detr_jax.cli import exits\n"
        "print('progress before', end='')\n"  # unflushed: must come before the line
        f"exits.report('tool', 'it failed', 5, details='the story', folder={str(tmp_path)!r})\n"
        "exits.mute_teardown()\n"
        "print('late stdout'); print('late stderr', file=sys.stderr)\n"
        "os.write(2, b'late fd 2\\n')\n"
    )
    done = run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "progress before"
    line = _one_error_line(done.stderr)
    assert line.startswith("error: it failed (full report: ")
    report = open(_report_path(line)).read()
    story, late = report.split("\n\nprinted while the process shut down:\n")
    assert story == "tool: it failed\n\nthe story"
    assert sorted(late.splitlines()) == ["late fd 2", "late stderr", "late stdout"], report
