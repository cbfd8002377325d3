"""Prints the versions a test run uses on one line: Python, the jax stack that CI's second
lane upgrades to the newest releases (PACKAGES, which check_newest.py checks), numpy, and torch
and transformers where installed. Reads package metadata only; imports none of them.

The Makefile's lanes print it before pytest starts; tests/conftest.py puts it in pytest's
header, so a failure names the releases it ran with.
"""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")
OPTIONAL = ("torch", "transformers")


def versions_line() -> str:
    parts = [f"python {platform.python_version()}"]
    for name in (*PACKAGES, "numpy", *OPTIONAL):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name not in OPTIONAL:
                parts.append(f"{name} not installed")
    return "versions: " + ", ".join(parts)


if __name__ == "__main__":
    print(versions_line())
