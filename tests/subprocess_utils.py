"""Waiting on test subprocesses (training workers, train.py) with a bounded time."""

from __future__ import annotations

import subprocess

import pytest


def finish(process: subprocess.Popen, what: str, timeout: float) -> str:
    """Waits for `process`; fails the test with its output tail on timeout or non-zero exit."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{what} timed out:\n{output[-3000:]}")
    assert process.returncode == 0, f"{what} failed ({process.returncode}):\n{output[-5000:]}"
    return output
