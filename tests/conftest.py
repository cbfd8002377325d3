"""Suite-wide rules: the `torch` marker and the test modules' imports.

Tests that need PyTorch or transformers carry `@pytest.mark.torch` (or a module-level
`pytestmark`) and import them inside the test or a fixture. Every other test runs where
neither is installed (CI's second lane: the newest jax on Python 3.12, `-m "not torch"`).
Two checks keep it that way:

- after collection, torch and transformers must not have been imported: an import at
  module level is an error here, in either lane, not only where torch is missing;
- selecting tests marked `torch` where torch is not installed is an error that says what to
  install, never a silent skip.

pytest's header names the versions in use (.ci/versions.py: Python, jax, jaxlib, flax, optax,
orbax-checkpoint, grain, numpy, torch and transformers where installed), so that a failure in
CI's second lane, which installs the newest releases, shows which releases it ran with.

Processes: every command a test runs goes through `tests/subprocess_utils.py` (`start`, `run`),
so that it dies with the process that started it; what is still running when a test ends is
killed here (`_end_started_processes`), and an xdist worker dies with pytest's main process
(`pytest_configure`), taking its children with it.

The suite runs without the persistent compilation cache that `Detector` turns on by default
(it writes nothing to the user's cache directory); tests/test_compile_cache.py turns it on in
subprocesses.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zlib

import numpy as np
import pytest

from tests import subprocess_utils

_TORCH_MODULES = ("torch", "transformers")
os.environ.setdefault("DEFORMABLE_DETR_JAX_COMPILE_CACHE", "off")


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker is SIGKILLed when pytest's main process dies (Linux), whatever kills it:
    otherwise it runs its current test to the end (up to a 600 s wait on a training worker)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the main process died before the prctl
            os._exit(1)


def pytest_report_header(config: pytest.Config) -> str:
    path = config.rootpath / ".ci" / "versions.py"
    spec = importlib.util.spec_from_file_location("_deformable_detr_jax_ci_versions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.versions_line()


def pytest_collection_finish(session: pytest.Session) -> None:
    imported = [name for name in _TORCH_MODULES if name in sys.modules]
    if imported:
        raise pytest.UsageError(
            f"collecting the tests imported {' and '.join(imported)}: import them inside the "
            "tests marked `torch` (or their fixtures), never at module level, so that the "
            "other tests run without them"
        )
    wanted = [item for item in session.items if item.get_closest_marker("torch")]
    missing = [name for name in _TORCH_MODULES if importlib.util.find_spec(name) is None]
    if wanted and missing:
        raise pytest.UsageError(
            f"{len(wanted)} selected tests are marked `torch` but {' and '.join(missing)} "
            "is not installed: install the test extra (`make test` does) or deselect them "
            "with -m 'not torch'"
        )


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each module's compiled programs are freed when it ends: an xdist worker runs a few hundred
    tests, and one that kept them all reached 6.3 GB and was OOM-killed on a loaded machine."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _end_started_processes():
    """The processes a test started (`subprocess_utils.start`) end with it, whatever its outcome."""
    yield
    subprocess_utils.kill_started()


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded by the test's name: fresh random inputs per test, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
