"""Temporary files and folders for atomic writes, created with the modes `open()` and `mkdir()`
give: `0o666` and `0o777` less the umask.

An atomic write builds its output under a temporary name beside the target and renames it into
place, so the output keeps the temporary's mode. `tempfile.mkstemp` and `mkdtemp` create theirs
private (`0o600`, `0o700`) whatever the umask, which would leave an exported model or a saved
folder unreadable to anyone else; these two do not.
"""

from __future__ import annotations

import os
import pathlib
import secrets

_ATTEMPTS = 100


def _names(parent: str | os.PathLike, prefix: str, suffix: str):
    for _ in range(_ATTEMPTS):
        yield os.path.join(os.fspath(parent), f"{prefix}{secrets.token_hex(4)}{suffix}")
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {os.fspath(parent)}")


def temporary_file(parent: str | os.PathLike, prefix: str = "", suffix: str = "") -> pathlib.Path:
    """A new empty file in `parent` (mode `0o666` less the umask); the caller removes it."""
    for name in _names(parent, prefix, suffix):
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return pathlib.Path(name)
    raise AssertionError("unreachable")  # _names raises when the names run out


def temporary_folder(parent: str | os.PathLike, prefix: str = "", suffix: str = "") -> pathlib.Path:
    """A new empty folder in `parent` (mode `0o777` less the umask); the caller removes it."""
    for name in _names(parent, prefix, suffix):
        try:
            os.mkdir(name, 0o777)
        except FileExistsError:
            continue
        return pathlib.Path(name)
    raise AssertionError("unreachable")  # _names raises when the names run out
