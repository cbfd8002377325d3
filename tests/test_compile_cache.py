"""The persistent compilation cache `Detector` turns on, and `Detector.warmup`.

The cache is a process-wide JAX setting, so everything that turns it on runs in subprocesses
(the suite itself runs with it off: tests/conftest.py). The second process must find the
program the first compiled (JAX's cache-hit event), and compute the same detections.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from deformable_detr_jax import Detector, ImageProcessor, compile_cache, save_pretrained
from deformable_detr_jax.compile_cache import (
    ENV_VAR,
    CompileCacheWarning,
    default_directory,
    enable_compile_cache,
    resolve_directory,
    shared_cache_problem,
    training_cache,
    training_directory,
)
from deformable_detr_jax.inference import detector as detector_module
from tests import subprocess_utils
from tests.random_models import random_model, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, sys
import numpy as np
from jax import monitoring

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
from deformable_detr_jax import Detector, ImageProcessor

processor = ImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
detector = Detector.from_pretrained(sys.argv[1], processor=processor, buckets=None)
result = {"directory": None if detector.compile_cache is None else str(detector.compile_cache)}
if sys.argv[2] == "detect":
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    found = detector([image], threshold=0.0)[0]
    result.update(hits=events.count("/jax/compilation_cache/cache_hits"),
                  scores=found.scores.tolist(), boxes=found.boxes.tolist())
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile_cache") / "model"
    save_pretrained(random_model(small_config(), seed=3), folder)
    return folder


def _child(folder, env: dict, detect: bool = True) -> dict:
    """Runs `_CHILD` with `env` on top of ours (a None value removes that variable); every
    program is cached, however fast it compiled."""
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **env,
    }
    env = {k: v for k, v in env.items() if v is not None}
    done = subprocess_utils.run(
        [sys.executable, "-c", _CHILD, os.fspath(folder), "detect" if detect else "construct"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_what_the_first_compiled(model_folder, tmp_path):
    cache = tmp_path / "xdg" / "deformable_detr_jax" / "xla"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), ENV_VAR: None}  # the default directory
    first = _child(model_folder, env)
    assert first["directory"] == str(cache)
    assert first["hits"] == 0
    assert os.listdir(cache), "the first process wrote nothing to the cache"
    second = _child(model_folder, env)
    assert second["hits"] >= 1
    assert second["scores"] == first["scores"] and second["boxes"] == first["boxes"]


def test_the_variable_moves_or_turns_off_the_cache(model_folder, tmp_path):
    moved = _child(
        model_folder,
        {ENV_VAR: str(tmp_path / "elsewhere"), "XDG_CACHE_HOME": str(tmp_path / "x")},
        detect=False,
    )
    assert moved["directory"] == str(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere").is_dir() and not (tmp_path / "x").exists()
    off = _child(
        model_folder, {ENV_VAR: "off", "XDG_CACHE_HOME": str(tmp_path / "y")}, detect=False
    )
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


def test_training_directory_defaults_to_the_workdir(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert training_directory("auto", workdir) == workdir / "compile_cache"
    assert training_directory(tmp_path / "mine", workdir) == tmp_path / "mine"
    for off in ("", "off", None):
        assert training_directory(off, workdir) is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))  # the variable beats "auto" only
    assert training_directory("auto", workdir) == tmp_path / "env"
    assert training_directory(tmp_path / "mine", workdir) == tmp_path / "mine"
    monkeypatch.setenv(ENV_VAR, "off")
    assert training_directory("auto", workdir) is None
    with pytest.raises(TypeError, match="train.compilation_cache_dir must be"):
        training_directory(7, workdir)


def test_several_processes_on_cpu_turn_the_training_cache_off(tmp_path, monkeypatch):
    """JAX keys a CPU program differently on each process and only process 0 writes: a
    multi-process CPU run turns the cache off (tests/test_training_distributed.py runs one)."""
    assert shared_cache_problem(1, "cpu") is None
    assert shared_cache_problem(2, "gpu") is None and shared_cache_problem(8, "tpu") is None
    hangs = shared_cache_problem(2, "cpu", jaxlib="0.12.1")
    assert "hangs in its first collective" in hangs and "jaxlib 0.12.1, 2 processes on CPU" in hangs
    runs = shared_cache_problem(3, "cpu", jaxlib="0.10.2")
    assert "saves the run little" in runs and "jaxlib 0.10.2, 3 processes on CPU" in runs
    assert "hangs" in shared_cache_problem(2, "cpu", jaxlib="0.13.0rc1")
    assert "hangs" not in shared_cache_problem(2, "cpu", jaxlib="0.12.0.1")

    turned_off = []  # (JAX's setting is process-wide: not changed here)
    monkeypatch.setattr(compile_cache, "turn_off", lambda: turned_off.append(True))
    monkeypatch.setattr(compile_cache, "active_directory", lambda: None)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert training_cache("auto", tmp_path, 2, "cpu") == (None, shared_cache_problem(2, "cpu"))
    assert turned_off and not (tmp_path / "compile_cache").exists()
    turned_off.clear()
    assert training_cache("", tmp_path, 2, "cpu") == (None, None)  # off anyway: nothing said
    monkeypatch.setattr(compile_cache, "enable_compile_cache", lambda directory: directory)
    assert training_cache("auto", tmp_path, 1, "cpu") == (tmp_path / "compile_cache", None)
    assert training_cache("auto", tmp_path, 4, "gpu") == (tmp_path / "compile_cache", None)
    assert not turned_off


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(), seed=5)


def test_an_unwritable_directory_warns_and_compiles_without(model, tmp_path):
    if jax.config.jax_compilation_cache_dir:
        pytest.skip("this process already has a compilation cache")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(CompileCacheWarning, match="cannot write the compilation cache"):
        assert enable_compile_cache(blocker / "cache") is None
    assert not jax.config.jax_compilation_cache_dir
    with pytest.warns(CompileCacheWarning):
        detector = Detector(model, compile_cache=blocker / "c")
    assert detector.compile_cache is None


def test_warmup_prepares_the_programs_of_the_buckets(model, rng):
    processor = ImageProcessor(size={"shortest_edge": 72, "longest_edge": 200})
    detector = Detector(model, processor, buckets=(72, 112), compile_cache=None)
    sizes = [(100, 150), (100, 140)]  # resized to 72 x 108 and 72 x 101: one bucket
    assert {detector.bucket(size) for size in sizes} == {(72, 112)}
    programs = detector_module._forward._cache_size()
    prepared = detector.warmup(sizes, batch_sizes=(1, 2))
    assert prepared == detector.compiled_shapes == ((1, 72, 112), (2, 72, 112))
    assert detector_module._forward._cache_size() == programs + 2
    images = [rng.integers(0, 255, size + (3,), dtype=np.uint8) for size in sizes]
    together = detector(images, threshold=0.0)  # one batch of two in the bucket
    alone = detector(images[1:], threshold=0.0)[0]
    assert detector_module._forward._cache_size() == programs + 2  # nothing compiled after warm-up
    np.testing.assert_allclose(together[1].scores, alone.scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_sizes"):
        detector.warmup([(100, 150)], batch_sizes=(0,))
    with pytest.raises(ValueError, match="sizes must be"):
        detector.warmup([100])
