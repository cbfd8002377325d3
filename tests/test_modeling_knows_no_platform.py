"""Model code that knows no platform: nothing under `deformable_detr_jax/modeling/` reads the
backend, a context variable or compiler options (the CPU train step's speed-ups are applied
from `training/cpu/`, by the step factory)."""

from __future__ import annotations

import pathlib
import re

import pytest

import deformable_detr_jax

MODELING = pathlib.Path(deformable_detr_jax.__file__).parent / "modeling"
# what reading the platform or switching on it looks like in the source
FORBIDDEN = (
    r"default_backend",
    r"\.platform\b",
    r"contextvars?\b",
    r"ContextVar",
    r"compiler_options",
    r"xla_\w+",
    r"XLA_FLAGS",
    r"training\.cpu",
    r"devices\(",
)


def _offences(text: str) -> list[str]:
    return [
        f"{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if any(re.search(pattern, line) for pattern in FORBIDDEN)
    ]


def test_no_module_under_modeling_reads_the_platform():
    files = sorted(MODELING.rglob("*.py"))
    assert len(files) >= 5, files  # the folder is where this test thinks it is
    found = {f.name: _offences(f.read_text()) for f in files}
    assert {name: lines for name, lines in found.items() if lines} == {}


@pytest.mark.parametrize(
    "line",
    [
        "if jax.default_backend() == 'cpu':",
        "_ON = contextvars.ContextVar('x', default=False)",
        "jax.jit(f, compiler_options={'xla_cpu_foo': 1})",
        "on_cpu = mesh.devices.flat[0].platform == 'cpu'",
        "from deformable_detr_jax.training.cpu import prepare_model",
    ],
)
def test_the_check_finds_each_kind_of_platform_switch(line):
    assert _offences(f"x = 1\n{line}\n") == [f"2: {line}"]
