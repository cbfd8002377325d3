"""Process-wide settings of a training process, applied once by its entry point.

`cli/train.py` and `cli/demo.py` wrap their `train()` call in `process_settings()`; `train()`
itself changes nothing process-wide (a library call must not). The seam for CPU-specific
process settings: `training/cpu/` owns what they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def process_settings() -> Iterator[None]:
    """On CPU, glibc keeps the memory each training step frees for the next
    (`training.cpu.host_memory.retained_host_memory`); nothing elsewhere."""
    import jax

    from deformable_detr_jax.training.cpu.host_memory import retained_host_memory

    on_cpu = jax.devices()[0].platform == "cpu"
    with retained_host_memory() if on_cpu else contextlib.nullcontext():
        yield
