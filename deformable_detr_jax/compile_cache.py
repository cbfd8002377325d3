"""JAX's persistent compilation cache in a user cache directory: compile once per machine.

    from deformable_detr_jax.compile_cache import enable_compile_cache
    enable_compile_cache()                  # $DEFORMABLE_DETR_JAX_COMPILE_CACHE, else the default
    enable_compile_cache("/scratch/xla")    # a directory of your choice
    enable_compile_cache(None)              # nothing (the same as the variable set to "off")

XLA programs compiled in one process are written to the directory and read back by the next
process that compiles the same program (same model structure, shapes, dtype, jax/jaxlib
version and device), which then skips the compilation: a notebook's first `Detector` call
costs the forward pass plus tracing, not the compile. `Detector` calls `enable_compile_cache`
by default (its `compile_cache=` argument); training uses `WORKDIR/compile_cache` by default
(`training_directory`), so that a resumed or restarted run skips the compile of its first step.

The directory: the argument, else `$DEFORMABLE_DETR_JAX_COMPILE_CACHE` (`off`, `0`, `false`,
`no` or `none` turn the cache off), else `$XDG_CACHE_HOME/deformable_detr_jax/xla` (XDG default
`~/.cache`). The cache is process-wide (a JAX setting): when `jax_compilation_cache_dir` is
already set, by the user or an earlier call, it is kept as it is. A directory that cannot be
written gives a `CompileCacheWarning` and compilation goes on without a cache. JAX only stores
programs whose compilation took at least `jax_persistent_cache_min_compile_time_secs` (1 s by
default), which is every `Detector` program of a real model.

Several processes on CPU (`jax.distributed`): training turns the cache off, in one log line
at startup (`training_cache`, `shared_cache_problem`). JAX's key for a CPU program differs from
process to process (`jax._src.cache_key`: the accelerator_config entry hashes the topology of
the process's own devices) and only process 0 writes entries (`compiler._cache_write`), so on a
filled cache process 0 reads each program and the others compile it. On jaxlib 0.12.1 a
program read from the cache and the same program compiled hang in their first cross-process
collective (gloo's all-reduce: one side waits to send, the other to receive); jaxlib 0.10.2 to
0.12.0 run the pair, but process 0's reads save the run little, its first step waiting for
the others' compiles. On GPU and TPU JAX means every process to get the same key (its cache
guide; `cache_key.py` leaves the device assignment out of a GPU key; not tried here), so there
the cache stays on; its directory must be one that every host sees, as WORKDIR is.

The cache is trusted code: keep it in a directory only you can write (JAX's own warning).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pathlib
import tempfile
import warnings

import jax

from deformable_detr_jax._versions import release_numbers

ENV_VAR = "DEFORMABLE_DETR_JAX_COMPILE_CACHE"
_OFF = {"", "0", "off", "false", "no", "none"}


class CompileCacheWarning(UserWarning):
    """The compilation cache directory could not be used; compiling without it."""


def default_directory() -> pathlib.Path:
    """`$XDG_CACHE_HOME/deformable_detr_jax/xla`, `~/.cache/...` when the variable is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "deformable_detr_jax" / "xla"


def resolve_directory(directory: str | os.PathLike | None = "auto") -> pathlib.Path | None:
    """The directory `enable_compile_cache(directory)` would use, or None for off.

    `"auto"`: `$DEFORMABLE_DETR_JAX_COMPILE_CACHE` when set (a path, or an off word), else
    `default_directory()`. None or False: off. Anything else: that path.
    """
    if directory is None or directory is False:
        return None
    if isinstance(directory, str) and directory == "auto":
        value = os.environ.get(ENV_VAR)
        if value is None:
            return default_directory()
        if value.strip().lower() in _OFF:
            return None
        return pathlib.Path(value).expanduser()
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f'compile_cache must be "auto", a directory path or None, got {directory!r}'
        )
    return pathlib.Path(directory).expanduser()


TRAINING_SUBDIR = "compile_cache"


def training_directory(setting: str | None, workdir: str | os.PathLike) -> pathlib.Path | None:
    """The cache directory of a training run: `train.compilation_cache_dir` resolved.

    `"auto"` (the recipes' default): `$DEFORMABLE_DETR_JAX_COMPILE_CACHE` when set (a path, or
    an off word), else `WORKDIR/compile_cache`. `""` / None / an off word: no cache. Anything
    else: that directory (relative to the current directory).
    """
    if setting is None or (isinstance(setting, str) and setting.strip().lower() in _OFF):
        return None
    if not isinstance(setting, (str, os.PathLike)):
        raise TypeError(
            f'train.compilation_cache_dir must be "auto", a directory or "" (off), got {setting!r}'
        )
    if isinstance(setting, str) and setting == "auto":
        value = os.environ.get(ENV_VAR)
        if value is None:
            return pathlib.Path(workdir).absolute() / TRAINING_SUBDIR
        return resolve_directory("auto")
    return pathlib.Path(setting).expanduser().absolute()


def _writable(directory: pathlib.Path) -> str | None:
    """None when files can be created in `directory` (made if missing), else the reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


_READ = {"programs": 0, "saved_s": 0.0}
_LISTENING = []


def _on_event(name: str, **_) -> None:
    if name == "/jax/compilation_cache/cache_hits":
        _READ["programs"] += 1


def _on_duration(name: str, seconds: float, **_) -> None:
    if name == "/jax/compilation_cache/compile_time_saved_sec":
        _READ["saved_s"] += seconds


def programs_read() -> tuple[int, float]:
    """`(programs, seconds)`: how many programs this process has read from the persistent
    cache so far instead of compiling them, and the compile time JAX says that saved."""
    if not _LISTENING:
        from jax import monitoring

        monitoring.register_event_listener(_on_event)
        monitoring.register_event_duration_secs_listener(_on_duration)
        _LISTENING.append(True)
    return _READ["programs"], _READ["saved_s"]


def active_directory() -> pathlib.Path | None:
    """The persistent cache directory JAX uses now, or None (none set, or the cache turned off
    with `jax_enable_compilation_cache`)."""
    value = jax.config.jax_compilation_cache_dir
    return pathlib.Path(value) if value and jax.config.jax_enable_compilation_cache else None


def enable_compile_cache(directory: str | os.PathLike | None = "auto") -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at `directory` (see the module docstring).

    Returns the directory in use afterwards (an earlier setting is kept), or None when there
    is none: turned off, or not writable (with a `CompileCacheWarning`).
    """
    if not jax.config.jax_enable_compilation_cache:  # turned off (by `turn_off` or the user)
        return None
    current = active_directory()
    if current is not None:
        return current
    path = resolve_directory(directory)
    if path is None:
        return None
    problem = _writable(path)
    if problem is not None:
        warnings.warn(
            f"cannot write the compilation cache directory {os.fspath(path)!r} ({problem}); "
            f"compiling without a persistent cache. Set {ENV_VAR} to a writable directory, "
            f"or to 'off'",
            CompileCacheWarning,
            stacklevel=2,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    return path


# jaxlib releases from this one on hang when one process reads a program the others compile
HANGS_FROM_JAXLIB = (0, 12, 1)


def shared_cache_problem(
    process_count: int, platform: str, jaxlib: str | None = None
) -> str | None:
    """Why the `process_count` processes of a run on `platform` must not use the persistent
    cache (the reason, for a log line), or None when they may. `jaxlib`: its version, by
    default the installed one.

    Several processes on CPU: each process gets its own key for the same program and only
    process 0 writes, so process 0 would read programs that the others compile (the module
    docstring); one process, or GPU / TPU: None.
    """
    if process_count < 2 or platform != "cpu":
        return None
    jaxlib = jaxlib or importlib.metadata.version("jaxlib")
    where = f"jax {jax.__version__}, jaxlib {jaxlib}, {process_count} processes on CPU"
    if release_numbers(jaxlib) >= HANGS_FROM_JAXLIB:
        effect = "and on this jaxlib such a pair hangs in its first collective"
    else:
        effect = "which saves the run little (its first step waits for the others' compiles)"
    return (
        f"JAX keys a CPU program differently on each process and only process 0 writes, so "
        f"process 0 would read programs that the others compile, {effect} ({where})"
    )


def turn_off() -> None:
    """Turns JAX's persistent cache off in this process, also one pointed at a directory from
    outside (`JAX_COMPILATION_CACHE_DIR`) or already used: later compiles neither read nor write
    it (`jax_enable_compilation_cache`, then JAX's `reset_cache` for a cache already opened)."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    jax.config.update("jax_enable_compilation_cache", False)
    jax_logger = logging.getLogger("jax._src.compilation_cache")
    level = jax_logger.level
    jax_logger.setLevel(logging.WARNING)  # its "Resetting cache at ..." INFO line
    try:
        jax_cache.reset_cache()
    finally:
        jax_logger.setLevel(level)


def training_cache(
    setting: str | None, workdir: str | os.PathLike, process_count: int = 1, platform: str = "cpu"
) -> tuple[pathlib.Path | None, str | None]:
    """The persistent cache of a training run, turned on (or kept, when JAX was pointed at one
    from outside) or turned off: `(directory, None)`; `(None, None)` when the setting and JAX
    have none; `(None, reason)` when one was set but the run's processes cannot share it
    (`shared_cache_problem`: the cache is then off in this process, `turn_off`).

    Every process calls it with the same `process_count` and `platform`, so every process
    decides the same way: all of them read or compile the same programs.
    """
    directory = training_directory(setting, workdir)
    if directory is None and active_directory() is None:
        return None, None
    problem = shared_cache_problem(process_count, platform)
    if problem is not None:
        turn_off()
        return None, problem
    return (enable_compile_cache(directory) if directory else active_directory()), None
