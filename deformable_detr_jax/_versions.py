"""The oldest Python, jax, jaxlib and flax this package supports, checked once at import.

pip enforces the same minimums at install (`pyproject.toml`; a test keeps the two equal);
this check is for environments that got older versions some other way (a preinstalled
jax, `--no-deps`, a conda env), where the failure would otherwise be an AttributeError
somewhere deep inside. Reads installed metadata only: importing jax stays lazy.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable

PYTHON = (3, 11)
MINIMUM = {"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8"}


class UnsupportedVersionError(ImportError):
    """Python or a core dependency is older than the supported minimum."""


def release_numbers(version: str) -> tuple[int, ...]:
    """`"0.12.0.1"` -> (0, 12, 0, 1); what follows the release numbers (rc1, .dev2, +local)
    is ignored."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def check(
    python: tuple[int, ...] = tuple(sys.version_info[:3]),
    installed: Callable[[str], str] = importlib.metadata.version,
) -> None:
    """Raises `UnsupportedVersionError` naming every version that is too old or missing."""
    problems = []
    if python[:2] < PYTHON:
        problems.append(
            f"Python {'.'.join(map(str, python))} (needs >= {'.'.join(map(str, PYTHON))})"
        )
    for name, minimum in MINIMUM.items():
        try:
            have = installed(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} not installed (needs >= {minimum})")
            continue
        if release_numbers(have) < release_numbers(minimum):
            problems.append(f"{name} {have} (needs >= {minimum})")
    if problems:
        upgrade = " ".join(f"'{name}>={minimum}'" for name, minimum in MINIMUM.items())
        raise UnsupportedVersionError(
            f"deformable_detr_jax cannot run here: {'; '.join(problems)}. "
            f"Upgrade with: pip install -U {upgrade}"
            + (" (on Python >= 3.11)" if python[:2] < PYTHON else "")
        )
