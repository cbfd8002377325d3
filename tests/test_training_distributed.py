"""Data parallelism across devices and processes gives the parameters of one device.

The runs keep their weights in float64 (`train.param_dtype`, JAX_ENABLE_X64): some parameters
have a gradient that is exactly zero in exact arithmetic (the attention key biases: softmax does
not see a shift common to all keys), so in float32 it is pure rounding noise, and AdamW's
normalisation `m / (sqrt(v) + eps)` turns noise of 1e-9 into a step of up to `lr`, differently
for each reduction order. In float64 the noise is 1e-18 and every parameter must agree to 1e-5.

Each run is a subprocess (`tests/training_workers.py`): 8 fake CPU devices need XLA_FLAGS
before JAX starts, and two processes need `jax.distributed` (CPU collectives over gloo). All
subprocesses share one persistent compilation cache so that identical programs compile once;
training turns it off in two-process runs (`compile_cache.shared_cache_problem`), which the
last test checks on a cache that such a run filled. A worker dies with the test process and
ends with its test (`tests/subprocess_utils.start`), and every wait is bounded.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.subprocess_utils import finish, finish_all, start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _env(cache: str, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # O0: half the compile time; every run of a comparison uses the same flags
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _worker(out, workdir, cache, *, devices=1, host_devices=None, extra=()):
    command = [
        sys.executable,
        "-m",
        "tests.training_workers",
        "train",
        "--out",
        str(out),
        "--workdir",
        str(workdir),
        "--devices",
        str(devices),
        "--x64",
        "--dropout",
        "0",
        *extra,
    ]
    return start(
        command,
        cwd=ROOT,
        env=_env(cache, host_devices or devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process) -> str:
    return finish(process, "worker", TIMEOUT)


def _load(path) -> dict[str, np.ndarray]:
    """The trained parameters a worker saved (its initial ones must differ: training moved)."""
    with np.load(path) as data:
        final = {k: data[k] for k in data.files if not k.startswith("init:")}
        initial = {k[5:]: data[k] for k in data.files if k.startswith("init:")}
    moved, _ = _max_difference(final, initial)
    assert moved > 1e-4, f"training did not change the parameters ({path})"
    return final


def _max_difference(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda k: float(np.max(np.abs(a[k] - b[k]))))
    return float(np.max(np.abs(a[worst] - b[worst]))), worst


@pytest.fixture(scope="session")
def single_device_run(tmp_path_factory, compilation_cache):
    """3 steps of the tiny model on one device, global batch 8, no dropout (the reference: with
    accumulation each micro-batch draws its own dropout masks, so none are drawn here)."""
    tmp = tmp_path_factory.mktemp("reference")
    _finish(_worker(tmp / "params.npz", tmp / "work", compilation_cache, devices=1))
    return _load(tmp / "params.npz")


def test_eight_devices_match_one_device(tmp_path, compilation_cache, single_device_run):
    _finish(_worker(tmp_path / "p8.npz", tmp_path / "w8", compilation_cache, devices=8))
    sharded = _load(tmp_path / "p8.npz")
    diff, name = _max_difference(sharded, single_device_run)
    assert diff < 1e-5, f"8-way sharded run differs from 1 device by {diff:.3g} at {name}"


def test_gradient_accumulation_matches_one_batch(tmp_path, compilation_cache, single_device_run):
    """2 micro-batches of 4 on 4 devices == one batch of 8 on one device."""
    process = _worker(
        tmp_path / "accum.npz",
        tmp_path / "accum",
        compilation_cache,
        devices=4,
        host_devices=8,
        extra=("--accum", "2"),
    )
    _finish(process)
    diff, name = _max_difference(_load(tmp_path / "accum.npz"), single_device_run)
    assert diff < 1e-5, f"accumulated step differs from the full batch by {diff:.3g} at {name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_lockstep(tmp_path, compilation_cache, single_device_run):
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        _worker(
            tmp_path / f"p{i}.npz",
            tmp_path / "work",
            compilation_cache,
            devices=0,
            host_devices=1,
            extra=("--coordinator", address, "--num-processes", "2", "--process-id", str(i)),
        )
        for i in range(2)
    ]
    outputs = finish_all(processes, "worker", TIMEOUT)
    assert all("2 processes" in out for out in outputs), outputs[0][-2000:]
    first, second = _load(tmp_path / "p0.npz"), _load(tmp_path / "p1.npz")
    diff, name = _max_difference(first, second)
    assert diff == 0.0, f"the two processes disagree by {diff:.3g} at {name}"
    diff, name = _max_difference(first, single_device_run)
    assert diff < 1e-5, f"2-process run differs from 1 process by {diff:.3g} at {name}"


def test_two_processes_agree_on_the_checkpoint_they_fall_back_to(tmp_path, compilation_cache):
    """Checkpoint 4 fails to read on process 1 only: both move it aside and resume from 2."""

    def run(steps, *extra):
        address = f"127.0.0.1:{_free_port()}"
        processes = [
            _worker(
                tmp_path / f"p{i}.npz",
                tmp_path / "work",
                compilation_cache,
                devices=0,
                host_devices=1,
                extra=(
                    "--coordinator",
                    address,
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(i),
                    "--steps",
                    str(steps),
                    "--checkpoint-every",
                    "2",
                    *extra,
                ),
            )
            for i in range(2)
        ]
        return finish_all(processes, "worker", TIMEOUT)

    run(4)
    folder = tmp_path / "work" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["2", "4"]
    outputs = run(6, "--fail-restore", "4")
    for output in outputs:
        assert "injected on this process (on process 1)); moved it to" in output, output[-3000:]
        assert "resumed from checkpoint 2" in output, output[-3000:]
    assert sorted(os.listdir(folder)) == ["2", "4", "6", "corrupt-4"]
    assert "(on process 1)" in (folder / "corrupt-4" / "CORRUPT.txt").read_text()
    diff, name = _max_difference(_load(tmp_path / "p0.npz"), _load(tmp_path / "p1.npz"))
    assert diff == 0.0, f"the two processes disagree by {diff:.3g} at {name}"


CACHE_RUN_TIMEOUT = 180  # per run of two processes; about 60 s on 2 loaded cores


def test_two_processes_finish_on_a_filled_compilation_cache(tmp_path):
    """A two-process CPU run on a cache that an earlier two-process run filled (as one did
    before training turned the cache off for such runs): process 0 would read its programs and
    process 1 compile them, and on jaxlib 0.12.1 that pair hangs in its first collective. The
    run finishes, and both processes turn the cache off in the same words."""
    cache = tmp_path / "cache"

    def run(tag, *extra):
        address = f"127.0.0.1:{_free_port()}"
        processes, began = [], time.monotonic()
        for i in range(2):  # one started alone is killed at teardown, not left waiting
            flags = (
                "--coordinator",
                address,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--steps",
                "2",
                *extra,
            )
            processes.append(
                _worker(
                    tmp_path / f"{tag}{i}.npz",
                    tmp_path / f"work-{tag}",
                    cache,
                    devices=0,
                    host_devices=1,
                    extra=flags,
                )
            )
        outputs = finish_all(processes, f"{tag} run: worker", CACHE_RUN_TIMEOUT)
        print(f"{tag} run: {time.monotonic() - began:.0f} s")
        return outputs

    run("fill", "--keep-compile-cache")
    assert any(cache.iterdir()), "the first run wrote nothing to the compilation cache"
    outputs = run("filled")
    reports = [
        [
            line.split("compilation cache off: ", 1)[1]
            for line in out.splitlines()
            if "compilation cache off: " in line
        ]
        for out in outputs
    ]
    assert len(reports[0]) == 1 and reports[0] == reports[1], outputs[0][-3000:]
    assert "2 processes on CPU" in reports[0][0], reports[0]
    assert "no compilation cache (turned off at startup" in outputs[0], outputs[0][-3000:]
    read = [re.search(r"worker done: .*processes, (\d+) programs read", out) for out in outputs]
    assert all(read) and [int(r.group(1)) for r in read] == [0, 0], [r and r.group(0) for r in read]
    diff, name = _max_difference(_load(tmp_path / "filled0.npz"), _load(tmp_path / "filled1.npz"))
    assert diff == 0.0, f"the two processes disagree by {diff:.3g} at {name}"
