"""Fault injection: `train.py` runs of the tiny shapes recipe (`tests/fault_config.py`, 28 steps,
a checkpoint every 4) killed, corrupted, refused disk space, resumed with other settings, fed NaN.

Every case holds to the same contract: nothing on disk is lost, the run either continues from the
newest good checkpoint or stops with one `error:` line and a documented exit status, and a resumed
run ends with exactly the parameters of the uninterrupted one (bitwise: the same programs from the
same compilation cache, the same inputs, the restored state byte for byte what was saved).

One uninterrupted run is the baseline for all cases; xdist workers share it (and the compilation
cache) through a file lock. The SIGKILL chain draws its 5 kills from seeds 0-4.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from deformable_detr_jax.training.checkpointing import read_step
from tests.fault_config import EVERY, STEPS
from tests.helpers import checkpoint_steps, error_lines, one_error_line
from tests.subprocess_utils import finish, start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
SEEDS = range(5)
KINDS = ("write", "step", "commit", "data")  # seed i: KINDS[i % 4] at a random count
TMP_MARK = ".orbax-checkpoint-tmp"


def _draw(seed: int) -> str:
    """Seed 0 kills the fresh run before its first checkpoint is committed; the others kill a run
    after its first checkpoint, within its second (each run then advances 4 steps)."""
    kind = KINDS[seed % len(KINDS)]
    rng = random.Random(seed)
    first, second = {"step": (1, 4), "data": (1, 16), "write": (1, 1), "commit": (1, 4)}[kind]
    if seed > 0:  # counts within the run's second checkpoint interval
        first, second = {"step": (5, 8), "data": (20, 32), "write": (2, 2), "commit": (5, 8)}[kind]
    return f"{kind}:{rng.randint(first, second)}"


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """A folder shared by the xdist workers of this session (the compilation cache, the
    baseline), or this process's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "faults"
    folder.mkdir(exist_ok=True)
    return folder


def _run(shared, workdir, fault: str = "", extra=(), env=None) -> tuple[int, str]:
    environment = dict(os.environ)
    environment.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",  # half the compile time; every run the same
        JAX_COMPILATION_CACHE_DIR=str(shared / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=ROOT + os.pathsep + environment.get("PYTHONPATH", ""),
        FAULT=fault,
    )
    for key, value in (env or {}).items():  # None: the variable removed
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "tests", "fault_config.py"),
        "--workdir",
        str(workdir),
        *extra,
    ]
    process = start(
        command,
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = finish(process, f"train.py (FAULT={fault!r})", TIMEOUT, check=False)
    return process.returncode, output


@pytest.fixture(scope="session")
def baseline(shared):
    """The workdir of an uninterrupted run (a checkpoint every EVERY steps to STEPS), made once per session."""
    workdir = shared / "baseline"
    with open(shared / "baseline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "baseline.done").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            code, output = _run(shared, workdir)
            assert code == 0, output[-5000:]
            (shared / "baseline.done").touch()
    assert checkpoint_steps(workdir) == list(range(EVERY, STEPS + 1, EVERY))
    return workdir


def _params(workdir, step: int) -> dict[str, np.ndarray]:
    state, _, _ = read_step(workdir / "checkpoints", step)  # checks the checksums too
    return {**state["params"], **state["frozen"], **{"opt": state["opt_state"]}}


def _assert_same(got: dict, expected: dict) -> None:
    import jax

    flat_got, tree_got = jax.tree_util.tree_flatten_with_path(got)
    flat_expected, tree_expected = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_got == tree_expected
    for (path, a), (_, b) in zip(flat_got, flat_expected):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _copy(baseline, target, steps=None):
    shutil.copytree(baseline, target, ignore=shutil.ignore_patterns("errors"))
    for step in set(checkpoint_steps(target)) - set(steps or checkpoint_steps(target)):
        shutil.rmtree(target / "checkpoints" / str(step))
    return target


# ----------------------------------------------------------------------------- SIGKILL


def test_sigkill_at_random_points_then_resume_equals_the_uninterrupted_run(
    shared, baseline, tmp_path
):
    workdir = tmp_path / "killed"
    faults = [_draw(seed) for seed in SEEDS]
    history = []
    for fault in faults:
        code, output = _run(shared, workdir, fault)
        assert code == -signal.SIGKILL, f"FAULT={fault} was not killed ({code}):\n{output[-3000:]}"
        steps = checkpoint_steps(workdir)
        history.append((fault, steps[-1] if steps else None))
        folder = workdir / "checkpoints"
        leftovers = (
            [p.name for p in folder.iterdir() if TMP_MARK in p.name] if folder.is_dir() else []
        )
        if fault.startswith("write"):  # killed mid-save: the half-written save is there
            assert leftovers, (fault, os.listdir(folder))
        # a kill never leaves a committed checkpoint that fails its checksums
        for step in steps:
            read_step(folder, step)
        assert not [p for p in folder.iterdir() if p.name.startswith("corrupt-")]
    code, output = _run(shared, workdir)
    assert code == 0, output[-5000:]
    assert "resumed from checkpoint" in output or history[-1][1] is None, output[-3000:]
    assert checkpoint_steps(workdir)[-1] == STEPS, history
    print("kills (fault, newest checkpoint after it):", history)
    assert not [p for p in (workdir / "checkpoints").iterdir() if TMP_MARK in p.name]
    _assert_same(_params(workdir, STEPS), _params(baseline, STEPS))


def test_a_restarted_run_reads_its_programs_from_the_workdir_cache(shared, baseline, tmp_path):
    """`train.compilation_cache_dir="auto"` (the recipes' default) with nothing set outside:
    the run writes its programs to WORKDIR/compile_cache, the restarted run reads them back
    and ends where the uninterrupted run (compiled without that cache) ended."""
    workdir = _copy(baseline, tmp_path / "cached", steps=range(EVERY, STEPS - 2 * EVERY + 1, EVERY))
    cache = workdir / "compile_cache"
    outside = {"DEFORMABLE_DETR_JAX_COMPILE_CACHE": None, "JAX_COMPILATION_CACHE_DIR": None}
    code, output = _run(shared, workdir, f"step:{EVERY + 1}", env=outside)  # 4 steps, then killed
    assert code == -signal.SIGKILL, output[-3000:]
    assert f"the compiled programs go to the compilation cache in {cache}" in output, output[-3000:]
    assert any(cache.iterdir()), "nothing was written to the workdir's compilation cache"
    code, output = _run(shared, workdir, env=outside)
    assert code == 0, output[-5000:]
    read = re.search(
        rf"(\d+) programs? read from the compilation cache in {re.escape(str(cache))}", output
    )
    assert read and int(read.group(1)) >= 1, output[-3000:]
    _assert_same(_params(workdir, STEPS), _params(baseline, STEPS))


# ----------------------------------------------------------------------------- corruption


def _largest_array_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def test_corrupt_checkpoints_are_moved_aside_and_training_continues(shared, baseline, tmp_path):
    workdir = _copy(baseline, tmp_path / "corrupt")
    folder = workdir / "checkpoints"
    newest = [STEPS, STEPS - EVERY, STEPS - 2 * EVERY]
    flipped = _largest_array_file(folder / str(newest[0]))  # 64 flipped bytes
    data = bytearray(flipped.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = _largest_array_file(folder / str(newest[1]))  # truncated
    os.truncate(truncated, truncated.stat().st_size // 2)
    _largest_array_file(folder / str(newest[2])).unlink()  # a file deleted

    code, output = _run(shared, workdir)
    assert code == 0, output[-5000:]
    for step in newest:
        assert f"checkpoint {step} in {folder} does not restore" in output, output[-5000:]
        assert (folder / f"corrupt-{step}" / "CORRUPT.txt").is_file()
    assert f"resumed from checkpoint {STEPS - 3 * EVERY}" in output
    assert checkpoint_steps(workdir) == list(
        range(EVERY, STEPS + 1, EVERY)
    )  # retrained beside them
    _assert_same(_params(workdir, STEPS), _params(baseline, STEPS))


def test_no_checkpoint_restores_is_one_error_and_exit_4(shared, baseline, tmp_path):
    workdir = _copy(baseline, tmp_path / "none", steps=[20])
    (workdir / "checkpoints" / "20" / "meta" / "metadata").write_text("{not json")
    code, output = _run(shared, workdir)
    assert code == 4, output[-5000:]
    lines = error_lines(output)
    assert (
        lines[0] == f"error: no checkpoint in {workdir / 'checkpoints'} restores; each was moved "
        "aside (nothing deleted):"
    )
    assert lines[1].startswith("  corrupt-20: its meta item cannot be read")
    assert lines[-1].startswith("(full report: ") and (workdir / "errors").is_dir()
    assert os.listdir(workdir / "checkpoints") == ["corrupt-20"]


# ----------------------------------------------------------------------------- disk full


def test_disk_full_mid_save_keeps_the_previous_checkpoint_and_says_so(shared, baseline, tmp_path):
    workdir = tmp_path / "full"
    code, output = _run(shared, workdir, "enospc:2")
    assert code == 5, output[-5000:]
    line = one_error_line(output)
    assert line.startswith(
        f"error: writing checkpoint 8 to {workdir / 'checkpoints'} failed: "
        "OSError: [Errno 28] No space left on device"
    )
    assert "checkpoint 4 is intact; fix that (e.g. free disk space), then rerun" in line
    assert checkpoint_steps(workdir) == [4]
    _assert_same(_params(workdir, 4), _params(baseline, 4))


# ----------------------------------------------------------------------------- settings, NaN


def test_resume_with_other_settings_stops_before_compiling(shared, baseline, tmp_path):
    workdir = _copy(baseline, tmp_path / "settings", steps=[20])
    before = (workdir / "config.json").read_bytes()
    code, output = _run(
        shared,
        workdir,
        extra=[
            "--config.model.d_model=96",
            "--config.optimizer.frozen=()",
            "--config.train.num_steps=40",
        ],
        env={"JAX_LOG_COMPILES": "1"},
    )
    assert code == 2, output[-5000:]
    assert "Compiling" not in output and "Finished XLA compilation" not in output, output[-3000:]
    assert error_lines(output) == [
        f"error: configuration: workdir {workdir} was trained with other settings than this run "
        "(2 differences):",
        "  model.d_model=64; this run has 96",
        r"  optimizer.frozen=(^model\.backbone\.model\.embedder\., "
        r"^model\.backbone\.model\.encoder\.stages\.0\.); this run has ()",
        "use another --workdir or the same settings",
    ]
    assert (workdir / "config.json").read_bytes() == before and checkpoint_steps(workdir) == [20]


def test_nan_loss_exits_3_with_the_last_good_checkpoint_intact(shared, baseline, tmp_path):
    workdir = tmp_path / "nan"
    code, output = _run(shared, workdir, "nan:6")
    assert code == 3, output[-5000:]
    line = one_error_line(output)
    assert (
        "not finite (NaN or inf) at step 5" in line and "The last good checkpoint is step 4" in line
    )
    assert checkpoint_steps(workdir) == [4]
    _assert_same(_params(workdir, 4), _params(baseline, 4))


def test_an_internal_error_or_ctrl_c_is_one_line_and_keeps_the_checkpoints(
    shared, baseline, tmp_path
):
    workdir = tmp_path / "bug"
    code, output = _run(shared, workdir, "bug:6")
    assert code == 70, output[-5000:]
    line = one_error_line(output)
    assert line.startswith(
        "error: RuntimeError: an injected bug (an internal error; please "
        "report it with the file below) (full report: "
    )
    report = line[line.index("(full report: ") + 14 : -1]
    assert os.path.dirname(report) == str(workdir / "errors")
    text = open(report).read()
    assert "Traceback (most recent call last)" in text and "_faulty_batch" in text
    assert checkpoint_steps(workdir) == [4]

    code, output = _run(shared, workdir, "sigint:3")  # resumes from 4, Ctrl-C at step 7
    assert code == 130, output[-5000:]
    assert error_lines(output) == ["error: train.py interrupted"]
    assert checkpoint_steps(workdir) == [4]
    _assert_same(_params(workdir, 4), _params(baseline, 4))
