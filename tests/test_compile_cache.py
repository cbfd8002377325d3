"""The persistent compilation cache `Detector` turns on, and `Detector.warmup`.

The cache is a process-wide JAX setting, so everything that turns it on runs in subprocesses
(the suite itself runs with it off: tests/conftest.py). The second process must find the
program the first compiled (JAX's cache-hit event), and compute the same detections.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from deformable_detr_jax import Detector, ImageProcessor, inference
from deformable_detr_jax.compile_cache import (
    ENV_VAR,
    CompileCacheWarning,
    default_directory,
    enable_compile_cache,
    resolve_directory,
)
from tests.random_models import small_config, random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, sys
import jax
import numpy as np
from jax import monitoring

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
from deformable_detr_jax import Detector, ImageProcessor, inference
from tests.random_models import small_config, random_model

detector = Detector(random_model(small_config(), seed=3), buckets=None)
image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
found = detector([image], threshold=0.0)[0]
print(json.dumps({
    "directory": None if detector.compile_cache is None else str(detector.compile_cache),
    "hits": events.count("/jax/compilation_cache/cache_hits"),
    "scores": found.scores.tolist(), "boxes": found.boxes.tolist(),
}))
"""


def _child(env: dict) -> dict:
    """Runs `_CHILD` with `env` on top of ours (a None value removes that variable); every
    program is cached, however fast it compiled."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           **env}  # fmt: skip
    env = {k: v for k, v in env.items() if v is not None}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "xdg" / "deformable_detr_jax" / "xla"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), ENV_VAR: None}  # the default directory
    first = _child(env)
    assert first["directory"] == str(cache)
    assert first["hits"] == 0
    written = sorted(os.listdir(cache))
    assert written, "the first process wrote nothing to the cache"
    second = _child(env)
    assert second["hits"] >= 1
    assert second["scores"] == first["scores"] and second["boxes"] == first["boxes"]


def test_the_variable_moves_or_turns_off_the_cache(tmp_path):
    moved = _child({ENV_VAR: str(tmp_path / "elsewhere"), "XDG_CACHE_HOME": str(tmp_path / "x")})
    assert moved["directory"] == str(tmp_path / "elsewhere")
    assert os.listdir(tmp_path / "elsewhere")
    off = _child({ENV_VAR: "off", "XDG_CACHE_HOME": str(tmp_path / "y")})
    assert off["directory"] is None
    assert not (tmp_path / "y").exists()


def test_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_directory() == default_directory() == tmp_path / "deformable_detr_jax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_directory() == pathlib.Path.home() / ".cache" / "deformable_detr_jax" / "xla"
    for word in ("off", "0", "False", "none", ""):
        monkeypatch.setenv(ENV_VAR, word)
        assert resolve_directory() is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "c"))
    assert resolve_directory() == tmp_path / "c"
    assert resolve_directory(tmp_path / "d") == tmp_path / "d"  # an argument beats the variable
    assert resolve_directory(None) is None
    with pytest.raises(TypeError, match="compile_cache must be"):
        resolve_directory(3)


def test_an_unwritable_directory_warns_and_compiles_without(tmp_path):
    if jax.config.jax_compilation_cache_dir:
        pytest.skip("this process already has a compilation cache")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(CompileCacheWarning, match="cannot write the compilation cache"):
        assert enable_compile_cache(blocker / "cache") is None
    assert not jax.config.jax_compilation_cache_dir
    with pytest.warns(CompileCacheWarning):
        detector = Detector(random_model(small_config(), seed=1), compile_cache=blocker / "c")
    assert detector.compile_cache is None


def test_warmup_prepares_the_programs_of_the_buckets(rng):
    processor = ImageProcessor(size={"shortest_edge": 96, "longest_edge": 160})
    detector = Detector(random_model(small_config(), seed=5), processor, buckets=64,
                        compile_cache=None)  # fmt: skip
    prepared = detector.warmup([(100, 150), (120, 130)], batch_sizes=(1, 2))
    # resized to 96 x 144 and 96 x 104: buckets 128 x 192 and 128 x 128
    expected = []
    for size in ((100, 150), (120, 130)):
        for b in (1, 2):
            shape = (b, *detector.bucket(size))
            if shape not in expected:
                expected.append(shape)
    assert prepared == tuple(expected)
    assert detector.compiled_shapes == tuple(expected)
    programs = inference._forward._cache_size()
    images = [rng.integers(0, 255, size + (3,), dtype=np.uint8) for size in ((100, 150), (120, 130))]
    detector(images, threshold=0.5)  # one batch of two in the shared bucket
    detector(images[:1], threshold=0.5)
    assert inference._forward._cache_size() == programs  # nothing compiled after the warm-up
    with pytest.raises(ValueError, match="batch_sizes"):
        detector.warmup([(100, 150)], batch_sizes=(0,))
    with pytest.raises(ValueError, match="sizes must be"):
        detector.warmup([100])
