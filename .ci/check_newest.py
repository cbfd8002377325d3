"""Fails unless jax, jaxlib, flax, optax, orbax-checkpoint and grain are the newest releases
the package index serves for this Python (CI's second lane tests exactly those).

Run with the lane's interpreter after installing: `python .ci/check_newest.py`.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

from versions import PACKAGES


def newest(name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(rf"^{re.escape(name)} \(([^)]+)\)", out, re.MULTILINE)
    if match is None:
        raise SystemExit(f"error: could not read the newest {name} from `pip index versions`")
    return match.group(1)


def main() -> int:
    stale = []
    for name in PACKAGES:
        have, want = importlib.metadata.version(name), newest(name)
        print(f"{name:18s} installed {have:12s} newest {want}")
        if have != want:
            stale.append(f"{name} {have} (newest {want})")
    if stale:
        print(
            "error: not the newest releases: " + ", ".join(stale) + "; something pins them "
            "lower, or the environment is stale (make clean-newest)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
