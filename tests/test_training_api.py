"""The public training API (`deformable_detr_jax.training`: make_optimizer, init_state,
make_train_step, make_batches, make_batch): a loop of your own built from it trains exactly as
`train()` on the same settings and seed."""

from __future__ import annotations

import jax
import numpy as np

from deformable_detr_jax import training
from deformable_detr_jax.training.metrics import read_jsonl
from tests.training_workers import get_config

STEPS = 3


def _own_loop(config) -> list[float]:
    run = training.settings.parse(config)
    model = training.make_model_config(run)
    loss = training.make_loss_config(run, model)
    mesh = training.make_data_mesh()
    spec = training.model_spec(model, run.optimizer.frozen)
    steps_per_epoch = run.data.shapes.num_train // run.data.batch_size
    optimizer = training.make_optimizer(spec, run.optimizer, steps_per_epoch, loss=loss)
    state = training.init_state(spec, optimizer, mesh, seed=run.train.seed)
    step = training.make_train_step(spec, loss, optimizer, mesh, state)
    batches = training.make_batches(
        run.data, batch_size=run.data.batch_size, num_labels=model.num_labels
    )
    key = jax.random.key(run.train.seed)
    losses = []
    try:
        for _ in range(STEPS):
            state, metrics = step(state, training.make_batch([next(batches)], mesh), key)
            losses.append(float(metrics["loss"]))
    finally:
        batches.close()
    return losses


def test_a_loop_of_your_own_trains_as_train_does(tmp_path):
    config = get_config()
    config.train.num_steps = STEPS
    config.train.log_every = 1
    config.train.seed = 5
    config.optimizer.weight_decay = 0.3  # large: the decay of each group shows in the losses
    config.optimizer.warmup_steps = 0
    training.train(config, tmp_path)
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    expected = [r["loss"] for r in sorted(records, key=lambda r: r["step"])]
    assert len(expected) == STEPS and len(set(expected)) == STEPS
    np.testing.assert_allclose(_own_loop(config), expected, rtol=1e-6)
