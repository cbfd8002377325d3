"""What the command lines keep off the terminal: jax's report of a platform it looked for and did
not find.

When jax picks its backend it tries every platform it knows; one that is not installed (TPU on a
machine without `libtpu.so`) is logged at INFO as `Unable to initialize backend 'tpu': ...` and
skipped, which a command line that logs INFO would print on every run. A platform that was asked
for (`JAX_PLATFORMS=tpu`) fails with an error instead, which is kept, as is everything else jax
logs.
"""

from __future__ import annotations

import logging

DISCOVERY_LOGGER = "jax._src.xla_bridge"
SKIPPED_PLATFORM = "Unable to initialize backend"


class SkippedPlatforms(logging.Filter):
    """Drops jax's INFO record of a platform skipped while looking for a backend."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not str(record.msg).startswith(SKIPPED_PLATFORM)


_filter = SkippedPlatforms()


def quiet_backend_discovery() -> None:
    """For a command line, before jax picks its backend: no line for a platform jax looked for
    and skipped (installed once; process-wide)."""
    logger = logging.getLogger(DISCOVERY_LOGGER)
    if _filter not in logger.filters:
        logger.addFilter(_filter)
