"""Exit statuses and error reports of the command-line tools: `train.py` (`deformable-detr-train`),
`predict`, `python -m deformable_detr_jax.convert`, `python -m deformable_detr_jax.export` and
`python -m deformable_detr_jax.training.to_pretrained`. The table below is the one place the
statuses are written down; the commands' docstrings and the README point here.

A failing command prints one `error: ...` line on stderr (a block for a list, such as the
settings a workdir was trained with) and, where the full story helps, the path of a file that holds
it (the traceback, orbax's own error logs; `WORKDIR/errors/`, else the temporary folder). Nothing
else: no traceback, no teardown noise.

    0    success (train.py: finished, or stopped on SIGTERM with a checkpoint saved; convert,
         export, to_pretrained: the output written; predict: every image processed)
    1    predict: some images could not be processed (the others were)
    2    bad input: a setting or option, the command line, a model or data path, a hub id that
         does not resolve (no such repository, revision or file; no network, or HF_HUB_OFFLINE,
         and not cached), invalid boxes with data.strict, a workdir trained with other settings or by another version; convert:
         a checkpoint that cannot be converted; export: a size the model cannot take, an unknown
         format, OUT exists (without --overwrite), a missing dependency; predict: a threshold
         outside [0, 1]
    3    train.py: the loss became NaN or inf (the last good checkpoint is kept)
    4    train.py, to_pretrained: the workdir has checkpoints but none restores (train.py moves
         each aside)
    5    a file could not be written (disk full, permissions); what was written before is intact,
         and convert and export leave no partial output behind
    70   an internal error (a bug): the line names the file with the traceback
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence

OK = 0
SOME_FAILED = 1
BAD_INPUT = 2
NON_FINITE = 3
NO_CHECKPOINT = 4
WRITE_FAILED = 5
INTERNAL = 70
INTERRUPTED = 130

# OSError numbers of a write that the disk or the file system refused
WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM")
    if hasattr(errno, name)
)


def write_report(prog: str, text: str, folder: str | os.PathLike | None = None) -> str | None:
    """Writes `text` to `folder/errors/<prog>-<time>.txt` (or the temporary folder when that
    cannot be written, e.g. on a full disk); returns the path, or None when nothing could be
    written."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{os.path.basename(prog).replace('.py', '')}-{stamp}-{os.getpid()}.txt"
    places = [os.path.join(os.fspath(folder), "errors")] if folder else []
    places.append(tempfile.gettempdir())
    for place in places:
        path = os.path.join(place, name)
        try:
            os.makedirs(place, exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            global _last_report
            _last_report = path
            return path
        except OSError:  # e.g. the disk that filled up: leave no partial report there
            if os.path.isfile(path):
                try:
                    os.remove(path)
                except OSError:
                    pass
    return None


def report(
    prog: str,
    message: str,
    code: int,
    *,
    error: BaseException | None = None,
    details: str = "",
    folder: str | os.PathLike | None = None,
    logs: Sequence[str] = (),
) -> int:
    """Prints `error: message` (plus where the full report went) and returns `code`.

    A report file is written when there is `details`, a traceback of `error` worth keeping
    (`code` INTERNAL), or captured `logs`."""
    text = details
    if error is not None and (code == INTERNAL or not details):
        if code == INTERNAL or logs:
            text += "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if logs:
        text += "\n\nlogged while it happened:\n" + "\n".join(logs)
    line = f"error: {message.rstrip()}"
    sys.stdout.flush()  # progress printed before the failure stays before its line
    if text.strip():
        path = write_report(prog, f"{prog}: {message}\n\n{text}", folder)
        if path is not None:
            line += f"\n(full report: {path})" if "\n" in line else f" (full report: {path})"
    print(line, file=sys.stderr, flush=True)
    return code


_last_report: str | None = None


def mute_teardown() -> None:
    """After a command's `error:` line: whatever the process prints while it shuts down (orbax's
    and asyncio's background threads reporting a failure's aftermath, C++ logs) goes to the end
    of the last report file (or nowhere when none was written), not under that line."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        fd = os.open(_last_report or os.devnull, os.O_WRONLY | os.O_APPEND)
        if _last_report:
            os.write(fd, b"\n\nprinted while the process shut down:\n")
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def internal_error(prog: str, error: BaseException, **kwargs) -> int:
    """An exception nobody expected: one line naming it, the traceback in a file."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    message = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return report(
        prog,
        f"{message} (an internal error; please report it with the file below)",
        INTERNAL,
        error=error,
        **kwargs,
    )


def guarded(prog: str, main: Callable[[], int]) -> int:
    """`main()`, with Ctrl-C and any exception it lets through turned into a one-line report."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"error: {prog} interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    except SystemExit:
        raise
    except Exception as err:  # the last line of defence: a bug, reported in one line
        return internal_error(prog, err)


class CapturedLogs(logging.Filter):
    """Keeps orbax's ERROR records (it logs its background failures with tracebacks through
    absl) off stderr, formatted in `records` for the error report instead.

    A filter on the `absl` logger, where absl's `logging.error` records are made."""

    def __init__(self, logger: str = "absl", match: str = os.sep + "orbax" + os.sep):
        super().__init__()
        self.records: list[str] = []
        self._logger, self._match = logging.getLogger(logger), match
        self._format = logging.Formatter(
            "%(levelname)s %(asctime)s %(pathname)s:%(lineno)d] %(message)s"
        )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and self._match in (record.pathname or ""):
            self.records.append(self._format.format(record))
            return False
        return True

    def __enter__(self) -> CapturedLogs:
        self._logger.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeFilter(self)


class _ClosedLoopCallbacks:
    """Keeps orbax's teardown noise off stderr. When one of a save's or restore's tensorstore
    operations fails, orbax closes the event loop it ran them in while the others are still
    running; each of those, completing, calls into the closed loop from C++, whose
    `RuntimeError('Event loop is closed')` reaches `sys.unraisablehook` (hundreds of tracebacks
    after one failure). Those, and only those, are counted in `dropped` instead of printed."""

    def __init__(self):
        self.dropped = 0
        self._previous = None

    def install(self) -> None:
        if self._previous is None:
            self._previous = sys.unraisablehook
            sys.unraisablehook = self

    def __call__(self, unraisable) -> None:
        value = getattr(unraisable, "exc_value", None)
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            self.dropped += 1
            return
        self._previous(unraisable)


closed_loop_callbacks = _ClosedLoopCallbacks()


_captured: CapturedLogs | None = None


def quiet_orbax() -> CapturedLogs:
    """For a command line: orbax's ERROR logs kept for the report (returned), and its closed-loop
    callbacks dropped, for the rest of the process (installed once)."""
    global _captured
    closed_loop_callbacks.install()
    if _captured is None:
        _captured = CapturedLogs().__enter__()
    return _captured
