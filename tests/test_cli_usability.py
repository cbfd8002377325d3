"""What the command lines say: train.py's one-line errors for a recipe file that is not there and
a setting's value of the wrong type, no line for a platform jax skipped, and `make demo`'s first
line before jax is imported."""

from __future__ import annotations

import logging
import os
import pathlib
import sys

import pytest

from deformable_detr_jax.cli import logs
from tests import subprocess_utils

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUIET_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _train(tmp_path, *args: str):
    return subprocess_utils.run(
        [sys.executable, "train.py", "--workdir", str(tmp_path / "run"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=QUIET_ENV,
    )


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(
    "given, expected",
    [
        (
            ["--config", "configs/shapes_tny.py"],
            "error: --config configs/shapes_tny.py: no such file; did you mean "
            "configs/shapes_tiny.py?",
        ),
        (
            ["--config=configs/two_stage_r50_cocoo.py:extra"],
            "error: --config configs/two_stage_r50_cocoo.py: no such file; did you mean "
            "configs/two_stage_r50_coco.py?",
        ),
        (["--config", "configs/zzz.py"], "error: --config configs/zzz.py: no such file (the "),
    ],
)
def test_a_recipe_file_that_is_not_there_is_a_bad_command_line(tmp_path, given, expected):
    done = _train(tmp_path, *given)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert line.startswith(expected), line
    if "(the " in expected:  # no near name: the recipes that are there
        assert "shapes_tiny.py" in line and "deformable_detr_r50_coco.py" in line
    assert "internal error" not in line and "full report" not in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_value_of_the_wrong_type_names_the_setting_the_type_and_an_example(tmp_path):
    done = _train(tmp_path, "--config", "configs/shapes_tiny.py", "--config.train.num_steps=ten")
    assert done.returncode == 2, done.stderr
    assert _one_line(done.stderr) == (
        "error: --config.train.num_steps=ten: train.num_steps takes a whole number (int), not "
        "'ten'; e.g. --config.train.num_steps=1500"  # the recipe's own value
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=abc", "optimizer.lr takes a number (float), not 'abc'; e.g. "),
        ("train.eval_at_end=maybe", "train.eval_at_end takes True or False (bool), not 'maybe'"),
        (
            "data.pad_to=(1,2",
            "data.pad_to takes a tuple (tuple[int, int]), not '(1,2'; e.g. "
            "'--config.data.pad_to=(96, 96)'",
        ),
        ("model.num_labels=x", "model.num_labels takes a whole number (int), not 'x'; e.g. "),
    ],
)
def test_bad_value_message_kinds(monkeypatch, override, expected):
    from deformable_detr_jax.cli import train as train_cli
    from deformable_detr_jax.training.recipes import shapes_tiny

    class Loaded:  # FLAGS["config"] as absl holds it once the recipe is loaded
        value = shapes_tiny()

    monkeypatch.setattr(train_cli, "FLAGS", {"config": Loaded})
    name, value = override.split("=", 1)
    absl_text = f"flag --config.{name}={value}: could not convert {value!r}"
    message = train_cli.bad_value_message(absl_text)
    assert message.startswith(f"--config.{override}: {expected}"), message
    assert "\n" not in message
    assert train_cli.bad_value_message("flag --config.train.nope=3: bad") is None
    assert train_cli.bad_value_message("Unknown command line flag 'x'") is None


def test_a_skipped_platform_is_not_logged_but_everything_else_is(caplog):
    logger = logging.getLogger(logs.DISCOVERY_LOGGER)
    logs.quiet_backend_discovery()
    logs.quiet_backend_discovery()  # once is enough; twice installs nothing more
    try:
        assert sum(isinstance(f, logs.SkippedPlatforms) for f in logger.filters) == 1
        with caplog.at_level(logging.INFO, logger=logs.DISCOVERY_LOGGER):
            logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
            logger.info("Unable to initialize backend '%s': %s", "rocm", "no ROCm")
            logger.warning("Unable to initialize backend 'tpu': asked for with JAX_PLATFORMS")
            logger.info("Platform 'cpu' is experimental")
        said = [(r.levelno, r.getMessage()) for r in caplog.records]
    finally:
        for f in list(logger.filters):
            if isinstance(f, logs.SkippedPlatforms):
                logger.removeFilter(f)
    assert said == [
        (logging.WARNING, "Unable to initialize backend 'tpu': asked for with JAX_PLATFORMS"),
        (logging.INFO, "Platform 'cpu' is experimental"),
    ]


def test_jax_picking_its_backend_prints_nothing_after_quiet_backend_discovery():
    script = (
        "import logging\n"
        "from deformable_detr_jax.cli import logs\n"
        "logs.quiet_backend_discovery()\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "import jax\n"
        "print(jax.devices()[0].platform)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # jax looks for all
    done = subprocess_utils.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("cpu", "gpu", "tpu", "cuda", "rocm")
    assert "Unable to initialize backend" not in done.stderr, done.stderr


def test_demo_says_what_it_does_before_importing_jax(tmp_path):
    """The first line comes before jax is imported (seconds into a cold start), not after the
    import and the first compile."""
    script = (
        "import sys\n"
        "from deformable_detr_jax.cli import demo\n"
        "demo.run_demo = lambda *a, **k: print('jax imported:', 'jax' in sys.modules)\n"
        f"demo.main(['--workdir', {str(tmp_path / 'demo')!r}])\n"
    )
    done = subprocess_utils.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=QUIET_ENV
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("demo: train a small Deformable DETR on synthetic shapes"), first
    assert str(tmp_path / "demo") in first and "minutes" in first
    assert second == "jax imported: False"


@pytest.mark.parametrize(
    "module", ["predict", "demo", "convert", "export", "training.to_pretrained"]
)
def test_python_m_commands_run_without_a_runpy_warning(module):
    """`python -m deformable_detr_jax.<module>` as the README writes it: runpy warns when the
    package's import already loaded the module it is asked to run."""
    done = subprocess_utils.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", f"deformable_detr_jax.{module}"]
        + ["--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=QUIET_ENV,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: "), done.stdout[:200]
