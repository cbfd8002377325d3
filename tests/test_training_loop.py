"""The training loop in-process: a fixed batch is overfitted, frozen weights stay put, and a
non-finite loss stops training with a clear message, leaving the last good checkpoint intact."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from deformable_detr_jax.training import Checkpoints, NonFiniteLossError, train
from deformable_detr_jax.training import metrics as metrics_lib
from deformable_detr_jax.training import optimizer as optimizer_lib
from deformable_detr_jax.training.metrics import read_jsonl, read_tfrecords
from deformable_detr_jax.training.train_state import (
    abstract_train_state,
    init_weights,
    model_spec,
)
from tests.training_workers import SyntheticBatches, get_config, tiny_model_config

STEPS = 100


def test_overfit_fixed_batch_then_nan_stops_with_last_good_checkpoint(
    tmp_path, monkeypatch, caplog
):
    # the progress line's rate is measured from the step after the compiling one
    restarts = []
    restart = metrics_lib.ProgressBar.restart
    monkeypatch.setattr(
        metrics_lib.ProgressBar,
        "restart",
        lambda self, step: (restarts.append(step), restart(self, step))[1],
    )
    caplog.set_level("INFO", logger="deformable_detr_jax.training.loop")
    config = get_config()
    config.data.batch_size = 2
    config.train.num_steps = STEPS + 5
    config.train.checkpoint_every = 50
    config.train.log_every = 1
    config.train.tensorboard = True
    config.optimizer.lr = 1e-3
    config.optimizer.lr_backbone = 1e-4
    model = tiny_model_config(dropout=0.0)
    # the same batch every step; from step STEPS + 1 on, NaN pixels
    data = SyntheticBatches(2, seed=3, fixed=True, nan_from=STEPS)
    with pytest.raises(NonFiniteLossError) as error:
        train(config, tmp_path, train_data=data, model_config=model)
    message = str(error.value)
    assert f"at step {STEPS}" in message and f"step {STEPS} in" in message, message
    assert restarts == [1]
    said = [r.getMessage() for r in caplog.records]
    compiling = said.index("compiling the train step (the first step)...")
    assert said[compiling + 1].startswith("first training step traced and compiled in"), said

    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    losses = {r["step"]: r["loss"] for r in records}
    assert set(range(1, STEPS + 1)) <= set(losses), sorted(losses)[:5]
    assert losses[STEPS] <= 0.5 * losses[1], f"loss {losses[1]:.3f} -> {losses[STEPS]:.3f}"
    assert np.isfinite(losses[STEPS])

    # TensorBoard events: valid records holding the train/loss tag
    events = list((tmp_path / "tensorboard").iterdir())
    assert len(events) == 1
    assert any(b"train/loss" in record for record in read_tfrecords(events[0]))

    # the last checkpoint is the last good step, loadable, finite
    spec = model_spec(model, tuple(config.optimizer.frozen))
    labels = {n: optimizer_lib.param_group(n, config.optimizer) for n in spec.trainable}
    tx, _ = optimizer_lib.build_optimizer(config.optimizer, labels, 100)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    assert checkpoints.latest_step() == STEPS
    state, position, _ = checkpoints.restore(abstract_train_state(spec, tx, mesh))
    checkpoints.close()
    assert int(state.step) == STEPS and int(state.bad_step) == -1
    assert position == {"index": STEPS}
    assert all(np.isfinite(np.asarray(v)).all() for v in state.params.values())

    # frozen weights (stem, layer1, batch norms) never moved; trained ones did
    params0, frozen0 = init_weights(spec, int(config.train.seed), mesh)
    assert any(n.startswith("model.backbone.model.encoder.stages.0.") for n in frozen0)
    assert any(n.startswith("model.backbone.model.embedder.") for n in frozen0)
    for name, value in frozen0.items():
        np.testing.assert_array_equal(np.asarray(state.frozen[name]), np.asarray(value), name)
    moved = {
        n: float(np.abs(np.asarray(state.params[n]) - np.asarray(params0[n])).max())
        for n in params0
    }
    assert min(moved.values()) > 0, [n for n, d in moved.items() if d == 0][:5]
