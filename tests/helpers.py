"""Helpers that several test modules share: a run's `error:` report and its checkpoints.

(Tiny model configs and synthetic training batches: `tests/training_workers.py`; small random
models: `tests/random_models.py`; processes: `tests/subprocess_utils.py`.)
"""

from __future__ import annotations

import os


def error_lines(output: str) -> list[str]:
    """The `error:` block at the end of a command's output; fails on a traceback anywhere or on
    more than one `error:`."""
    assert "Traceback" not in output, output[-5000:]
    assert output.count("error:") == 1, output[-5000:]
    return output[output.index("error:") :].strip().splitlines()


def one_error_line(output: str) -> str:
    """The `error:` line, when nothing may follow it."""
    lines = error_lines(output)
    assert len(lines) == 1, output[-5000:]
    return lines[0]


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps saved under `workdir/checkpoints`, ascending ([] before the first)."""
    folder = os.path.join(os.fspath(workdir), "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())
