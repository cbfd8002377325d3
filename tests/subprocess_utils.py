"""Processes started by tests: they end with the test, and with the test process if it is killed.

Every test that runs a command goes through `start` (a `subprocess.Popen`) or `run` (a
`subprocess.run` with a required timeout):

- the command runs behind `tests/die_with_parent.py`, so that it is SIGKILLed when the
  process that started it dies, even by SIGKILL (an xdist worker killed with its run);
- it leads its own process group (`start_new_session`), and `kill_started` (conftest's autouse
  teardown) SIGKILLs the group of every process still running when its test ends, passed,
  failed or interrupted;
- every wait is bounded (`finish`, `finish_all`, `run`) and fails the test with the output tail.

Signals are SIGKILL: JAX's preemption handler swallows SIGTERM. A group is killed only while
its leader is running (not yet reaped), so a reused process id is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import pytest

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "die_with_parent.py")
_started: list[subprocess.Popen] = []


def start(command: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(command, **popen_kwargs)`, dying with this process and with its test."""
    if "start_new_session" in popen_kwargs or "preexec_fn" in popen_kwargs:
        raise TypeError("start() sets the process group and the parent-death signal itself")
    launcher = [sys.executable, "-I", "-S", LAUNCHER, str(os.getpid())]
    process = subprocess.Popen(
        [*launcher, *map(os.fspath, command)], start_new_session=True, **popen_kwargs
    )
    _started.append(process)
    return process


def stop(process: subprocess.Popen) -> None:
    """SIGKILLs the process's group if the process is still running, and reaps it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # exited since the poll
            pass
        process.wait()


def kill_started() -> None:
    """Stops every process `start` began in this process (the teardown of each test)."""
    while _started:
        stop(_started.pop())


def run(
    command: Sequence[str],
    *,
    timeout: float,
    check: bool = False,
    capture_output: bool = False,
    input: str | bytes | None = None,
    **popen_kwargs,
) -> subprocess.CompletedProcess:
    """`subprocess.run` through `start`: on a timeout the process group is killed and the test
    fails with the output tail; `check` raises `CalledProcessError` as `subprocess.run` does."""
    if capture_output:
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    process = start(command, **popen_kwargs)
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[:3]} timed out after {timeout:.0f} s:\n{str(stderr)[-3000:]}")
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def finish(process: subprocess.Popen, what: str, timeout: float, check: bool = True) -> str:
    """Waits for `process`; fails the test with its output tail on timeout, or on a non-zero
    exit if `check` (otherwise the caller reads `process.returncode`)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        output, _ = process.communicate()
        pytest.fail(f"{what} timed out:\n{output[-3000:]}")
    assert not check or process.returncode == 0, (
        f"{what} failed ({process.returncode}):\n{output[-5000:]}"
    )
    return output


def finish_all(
    processes: Sequence[subprocess.Popen], what: str, timeout: float, check: bool = True
) -> list[str]:
    """Waits for processes that wait on each other (the workers of one distributed run) within
    one `timeout` for all, reading their pipes side by side (a full pipe cannot stall one of
    them). On a timeout or any error every one still running is stopped and the test fails with
    each one's output tail; with `check`, a non-zero exit fails it too. Returns the outputs in
    order."""
    outputs: list[str] = [""] * len(processes)

    def read(i: int) -> None:
        outputs[i] = processes[i].communicate()[0] or ""

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(processes))]
    try:
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + timeout
        for reader in readers:
            reader.join(max(deadline - time.monotonic(), 0.0))
        late = [i for i, reader in enumerate(readers) if reader.is_alive()]
    finally:
        for process in processes:
            stop(process)
        for reader in readers:
            if reader.ident is not None:
                reader.join()
    tails = "\n".join(
        f"--- {what} {i} ({p.returncode}):\n{outputs[i][-3000:]}" for i, p in enumerate(processes)
    )
    if late:
        pytest.fail(f"{what} {late} still running after {timeout:.0f} s, killed:\n{tails}")
    if check and any(p.returncode != 0 for p in processes):
        pytest.fail(f"{what} failed:\n{tails}")
    return outputs
