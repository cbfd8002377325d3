"""The recipe of the fault-injection tests (`tests/test_training_faults.py`): the tiny shapes
recipe for 28 steps, a checkpoint every 4, with the fault that
`FAULT` (in the environment) names injected into this `train.py` process:

    step:N     SIGKILL before this process's N-th train step
    data:N     SIGKILL inside its N-th image load (a data thread)
    write:N    SIGKILL while the N-th save writes its JSON items, its arrays in flight (the
               background thread of the asynchronous save)
    commit:N   SIGKILL at the N-th atomic rename of a save's folders (4 per save: data, meta,
               state, then the step folder itself)
    enospc:N   OSError(ENOSPC) from the N-th save's first JSON write (a full disk, mid-save)
    nan:N      NaN pixels in the N-th training batch (a non-finite loss)
    bug:N      a RuntimeError from the N-th training batch (an internal error)
    sigint:N   SIGINT (Ctrl-C) before the N-th train step

The orbax hooks are private names: if a version of orbax renames them this import fails, so the
tests fail loudly instead of testing nothing.
"""

from __future__ import annotations

import errno
import os
import signal

import numpy as np

from tests.training_workers import get_config as tiny

STEPS = 28
EVERY = 4

KIND, _, _COUNT = os.environ.get("FAULT", "").partition(":")
_calls = [0]


def _nth(n: int) -> bool:
    _calls[0] += 1
    return _calls[0] == n


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if KIND == "step":
    from deformable_detr_jax.training import loop

    _make = loop.make_train_step

    def _make_train_step(*args, **kwargs):
        step = _make(*args, **kwargs)

        def killing_step(*step_args):
            if _nth(int(_COUNT)):
                _kill()
            return step(*step_args)

        return killing_step

    loop.make_train_step = _make_train_step

elif KIND == "data":
    from deformable_detr_jax.data import ShapesSource

    _getitem = ShapesSource.__getitem__

    def _killing_getitem(self, index):
        if _nth(int(_COUNT)):
            _kill()
        return _getitem(self, index)

    ShapesSource.__getitem__ = _killing_getitem

elif KIND in ("write", "enospc"):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    _handler = json_checkpoint_handler.JsonCheckpointHandler
    _save_fn = _handler._save_fn

    async def _failing_save_fn(self, x, directory):
        if _nth(2 * int(_COUNT) - 1):  # two JSON items (data, meta) per save
            if KIND == "write":
                _kill()
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await _save_fn(self, x, directory)

    _handler._save_fn = _failing_save_fn

elif KIND == "commit":
    from orbax.checkpoint._src.path import atomicity

    _path = atomicity.AtomicRenameTemporaryPath
    _finalize = _path.finalize

    async def _killing_finalize(self, *args, **kwargs):
        if _nth(int(_COUNT)):
            _kill()
        return await _finalize(self, *args, **kwargs)

    _path.finalize = _killing_finalize

elif KIND in ("nan", "bug", "sigint"):
    from deformable_detr_jax.training import loop

    _global_batch = loop.global_train_batch

    def _faulty_batch(batches, mesh):
        if _nth(int(_COUNT)):
            if KIND == "bug":
                raise RuntimeError("an injected bug")
            if KIND == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                batches = [
                    dict(b, pixel_values=np.full_like(b["pixel_values"], np.nan)) for b in batches
                ]
        return _global_batch(batches, mesh)

    loop.global_train_batch = _faulty_batch

elif KIND:
    raise ValueError(f"unknown FAULT {KIND!r}")


def get_config():
    config = tiny()
    config.train.num_steps = STEPS
    config.train.checkpoint_every = EVERY
    config.train.keep_checkpoints = 100
    return config
