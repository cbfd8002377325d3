"""Too old a Python or jax: one clear error at import, the same minimums as pip's."""

from __future__ import annotations

import os
import pathlib
import sys
import tomllib

import pytest

from deformable_detr_jax import _versions
from tests import subprocess_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fake(versions):
    return lambda name: versions[name]


def test_supported_versions_pass():
    _versions.check()  # this environment
    _versions.check((3, 11, 0), _fake(dict(_versions.MINIMUM)))  # exactly the minimums
    _versions.check(
        (3, 13, 0),
        _fake({"jax": "0.13.0rc1", "jaxlib": "0.13.0.dev20270101", "flax": "0.12.12+local"}),
    )


def test_every_old_version_is_named_with_its_minimum():
    with pytest.raises(_versions.UnsupportedVersionError) as info:
        _versions.check((3, 10, 14), _fake({"jax": "0.4.30", "jaxlib": "0.10.1", "flax": "0.13.0"}))
    message = str(info.value)
    assert "Python 3.10.14 (needs >= 3.11)" in message
    assert "jax 0.4.30 (needs >= 0.10.2)" in message
    assert "jaxlib 0.10.1 (needs >= 0.10.2)" in message
    assert "flax" not in message.split("Upgrade")[0]  # new enough: not a problem
    assert "pip install -U" in message and "\n" not in message
    assert isinstance(info.value, ImportError)


def test_missing_dependency_is_named():
    def installed(name):
        if name == "jaxlib":
            raise _versions.importlib.metadata.PackageNotFoundError(name)
        return "1.0"

    with pytest.raises(_versions.UnsupportedVersionError, match="jaxlib not installed"):
        _versions.check((3, 12, 1), installed)


def test_import_with_an_old_jax_fails_with_one_line(tmp_path):
    # A jax 0.4.30 distribution first on sys.path: what `importlib.metadata` reports.
    info = tmp_path / "jax-0.4.30.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jax\nVersion: 0.4.30\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess_utils.run(
        [sys.executable, "-c", "import deformable_detr_jax"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("deformable_detr_jax._versions.UnsupportedVersionError: ")
    assert "jax 0.4.30 (needs >= 0.10.2)" in last


def test_minimums_equal_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=" + ".".join(map(str, _versions.PYTHON))
    pins = dict(dep.split(">=") for dep in project["dependencies"] if ">=" in dep)
    for name, minimum in _versions.MINIMUM.items():
        assert pins[name] == minimum, name
