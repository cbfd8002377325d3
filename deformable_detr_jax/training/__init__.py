"""Training Deformable DETR: data-parallel over every device of every host (see `loop.py`).

    from deformable_detr_jax.training import train
    result = train(get_config(), "runs/shapes_tiny")    # configs/shapes_tiny.py

Rooms: `setup` (config -> objects, start-up checks), `mesh` (devices, shardings),
`optimizer` (param groups, schedule), `train_state`, `step` (jitted train/eval steps),
`checkpointing` (orbax, with `integrity` checksums), `resume` (what a workdir remembers of its
settings), `metrics` (JSONL, TensorBoard, progress), `initialization`
(pretrained weights), `recipes` (the default ConfigDict), `loop`.
"""

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
from deformable_detr_jax.training.optimizer import make_optimizer, param_group
from deformable_detr_jax.training.recipes import base_config
from deformable_detr_jax.training.setup import ConfigError
from deformable_detr_jax.training.to_pretrained import export_model
from deformable_detr_jax.training.train_state import (
    ModelSpec,
    TrainState,
    merged_model,
    model_from_weights,
    model_spec,
)

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "Checkpoints",
    "ConfigError",
    "ModelSpec",
    "NoCheckpointRestoresError",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "base_config",
    "export_model",
    "initialize_distributed",
    "make_data_mesh",
    "make_optimizer",
    "merged_model",
    "model_from_weights",
    "model_spec",
    "param_group",
    "save_model",
    "stack_micro_batches",
    "train",
]
