"""Preemption: a run killed with SIGKILL and resumed ends where an uninterrupted run ends, and
SIGTERM stops a run with a checkpoint that the next run resumes from.

The runs are `train.py` subprocesses on the tiny shapes recipe (`tests/training_workers.
get_config`), sharing a persistent compilation cache. The data source is slowed down (a sleep
per image, in the config file) so that the signals land while training is under way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.subprocess_utils import finish, start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
TIMEOUT = 600

CONFIG = textwrap.dedent(
    """
    import time
    from deformable_detr_jax.data import ShapesSource
    from tests.training_workers import get_config as tiny

    _getitem = ShapesSource.__getitem__

    def _slow(self, index):  # slow the data so that signals land mid-run
        time.sleep(0.03)
        return _getitem(self, index)

    ShapesSource.__getitem__ = _slow

    def get_config():
        config = tiny()
        config.train.num_steps = {steps}
        config.train.checkpoint_every = 4
        return config
    """
).format(steps=STEPS)


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "tiny_resume.py").write_text(CONFIG)
    return tmp


def _start(tmp, workdir) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",  # half the compile time
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        str(tmp / "tiny_resume.py"),
        "--workdir",
        str(workdir),
    ]
    return start(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process) -> str:
    return finish(process, "train.py", TIMEOUT)


def _steps(workdir) -> list[int]:
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _wait_for_checkpoint(process, workdir, above: int) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done = [s for s in _steps(workdir) if s > above]
        if done:
            return done[0]
        if process.poll() is not None:
            output = process.stdout.read()
            pytest.fail(f"train.py ended before a checkpoint past step {above}:\n{output[-3000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no checkpoint appeared")


def _params(workdir, step) -> dict[str, np.ndarray]:
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(path.absolute())
    return {k: np.asarray(v) for k, v in {**state["params"], **state["frozen"]}.items()}


def test_sigkill_then_resume_equals_uninterrupted_and_sigterm_saves(setup_dir):
    tmp = setup_dir
    reference = tmp / "uninterrupted"
    _finish(_start(tmp, reference))
    assert _steps(reference)[-1] == STEPS

    interrupted = tmp / "interrupted"
    process = _start(tmp, interrupted)
    killed_after = _wait_for_checkpoint(process, interrupted, 0)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    resumed_from = _steps(interrupted)[-1]
    assert killed_after <= resumed_from < STEPS, "the run finished before it could be killed"

    # resume; stop it with SIGTERM once it has checkpointed past where it was killed
    process = _start(tmp, interrupted)
    passed = _wait_for_checkpoint(process, interrupted, resumed_from)
    process.send_signal(signal.SIGTERM)
    output = _finish(process)  # exit status 0: a clean stop
    stopped_at = _steps(interrupted)[-1]
    assert "SIGTERM" in output, output[-3000:]
    assert passed <= stopped_at < STEPS, f"SIGTERM stop at {stopped_at}: no mid-run checkpoint"
    stopped = _params(interrupted, stopped_at)  # the SIGTERM checkpoint loads
    assert all(np.isfinite(v).all() for v in stopped.values())

    _finish(_start(tmp, interrupted))
    assert _steps(interrupted)[-1] == STEPS
    expected, got = _params(reference, STEPS), _params(interrupted, STEPS)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    moved = max(float(np.abs(stopped[k] - got[k]).max()) for k in got)
    assert moved > 0, "the last resumed run did not train"

    # the final checkpoint exports to a save_pretrained folder holding the same weights
    from deformable_detr_jax.checkpoint import load_pretrained
    from deformable_detr_jax.training import export_model
    from deformable_detr_jax.training.train_state import model_weights

    exported = model_weights(load_pretrained(export_model(interrupted, tmp / "exported")))
    assert exported.keys() == got.keys()
    for name in got:
        np.testing.assert_array_equal(np.asarray(exported[name]), got[name], err_msg=name)
