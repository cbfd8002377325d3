"""Waiting on test subprocesses (training workers, train.py) with a bounded time."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Sequence

import pytest


def finish(process: subprocess.Popen, what: str, timeout: float, check: bool = True) -> str:
    """Waits for `process`; fails the test with its output tail on timeout, or on a non-zero
    exit if `check` (otherwise the caller reads `process.returncode`)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
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
    them). On a timeout or any error every one still running is killed (SIGKILL: JAX's
    preemption handler swallows SIGTERM) and the test fails with each one's output tail; with
    `check`, a non-zero exit fails it too. Returns the outputs in order."""
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
            if process.poll() is None:
                process.kill()
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
