"""Training Deformable DETR: data-parallel over every device of every host.

    from deformable_detr_jax.training import train
    result = train(get_config(), "runs/shapes_tiny")    # configs/shapes_tiny.py

`train` parses the recipe once into typed settings (`settings.parse`; a misspelt, mistyped or
ineffective setting is a `ConfigError` naming it) and runs the loop (`loop.py`). The same pieces
make a loop of your own: the paper's optimizer for a model, its train step, its batches.

    import jax
    from deformable_detr_jax import training
    from deformable_detr_jax.training.recipes import shapes_tiny

    run = training.settings.parse(shapes_tiny())  # a recipe's typed settings
    model = training.make_model_config(run)  # num_labels from the data
    loss = training.make_loss_config(run, model)
    mesh = training.make_data_mesh()
    spec = training.model_spec(model, run.optimizer.frozen)
    # AdamW over the paper's groups; unreached parameters not decayed; torch's clipping
    optimizer = training.make_optimizer(spec, run.optimizer, steps_per_epoch=500, loss=loss)
    state = training.init_state(spec, optimizer, mesh, seed=run.train.seed)
    step = training.make_train_step(spec, loss, optimizer, mesh, state)
    batches = training.make_batches(run.data, batch_size=8, num_labels=model.num_labels)
    key = jax.random.key(run.train.seed)
    for _ in range(3):
        state, metrics = step(state, training.make_batch([next(batches)], mesh), key)
        print(float(metrics["loss"]))  # the losses train() logs with these settings
    batches.close()

(`tests/test_training_api.py` runs this loop and checks it against `train()`.)

Rooms: `settings/` (the typed settings, parsed once), `recipes` (the default ConfigDict, built
from the settings' defaults), `setup` (settings -> objects, start-up checks), `run` (a run built
from its settings, its first state), `loop` (the steps), `actions` (logging, checkpoints,
evaluation, preemption between steps), `api` (the pieces above for your own loop), `batches`,
`mesh` (devices, shardings), `optimizer` (param groups, schedule, torch's clipping), `reach`
(which parameters the loss reaches), `train_state`, `step` (jitted train/eval steps),
`checkpointing` (orbax, with `integrity` checksums), `resume` (what a workdir remembers of its
settings), `metrics` (JSONL, TensorBoard, progress), `initialization` (pretrained weights).
"""

from deformable_detr_jax.training import settings
from deformable_detr_jax.training.api import (
    init_state,
    make_batch,
    make_batches,
    make_loss_config,
    make_model_config,
    make_optimizer,
    make_train_step,
)
from deformable_detr_jax.training.checkpointing import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    Checkpoints,
    CheckpointWriteError,
    NoCheckpointRestoresError,
)
from deformable_detr_jax.training.loop import (
    NonFiniteLossError,
    TrainResult,
    save_model,
    stack_micro_batches,
    train,
)
from deformable_detr_jax.training.mesh import initialize_distributed, make_data_mesh
from deformable_detr_jax.training.optimizer import Optimizer, param_group
from deformable_detr_jax.training.recipes import base_config
from deformable_detr_jax.training.settings import ConfigError, Settings
from deformable_detr_jax.training.train_state import (
    ModelSpec,
    TrainState,
    merged_model,
    model_from_weights,
    model_spec,
)


def __getattr__(name: str):
    """`export_model`, imported when first asked for (PEP 562): imported here at start-up,
    `python -m deformable_detr_jax.training.to_pretrained` would find its module already loaded
    and runpy would warn that it runs it a second time."""
    if name == "export_model":
        from deformable_detr_jax.training.to_pretrained import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "Checkpoints",
    "ConfigError",
    "ModelSpec",
    "NoCheckpointRestoresError",
    "NonFiniteLossError",
    "Optimizer",
    "Settings",
    "TrainResult",
    "TrainState",
    "base_config",
    "export_model",
    "init_state",
    "initialize_distributed",
    "make_batch",
    "make_batches",
    "make_data_mesh",
    "make_loss_config",
    "make_model_config",
    "make_optimizer",
    "make_train_step",
    "merged_model",
    "model_from_weights",
    "model_spec",
    "param_group",
    "save_model",
    "settings",
    "stack_micro_batches",
    "train",
]
