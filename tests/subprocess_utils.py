"""Waiting on test subprocesses (training workers, train.py) with a bounded time."""

from __future__ import annotations

import subprocess

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
    assert not check or process.returncode == 0, f"{what} failed ({process.returncode}):\n{output[-5000:]}"
    return output
