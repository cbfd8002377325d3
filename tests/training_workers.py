"""Support for the training tests: a tiny recipe, synthetic batches, and subprocess workers.

A helper module (no tests). The workers run in subprocesses because they need JAX configured
before it starts (8 fake CPU devices via XLA_FLAGS, or `jax.distributed` across two processes);
tests start them with `tests.subprocess_utils.start`, so that they die with the test:

    python -m tests.training_workers train --out OUT.npz --steps 3 [--accum 2]
        [--devices N] [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I]
        [--checkpoint-every K] [--fail-restore STEP] [--keep-compile-cache]

trains the tiny model on `SyntheticBatches` with `training.train` and saves the final trained
parameters. The tiny recipe for `train.py` is `get_config` below (a config file can import
it).
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

TINY_MODEL = dict(
    d_model=64,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    dropout=0.1,
    num_queries=8,
    num_feature_levels=1,
    encoder_n_points=2,
    decoder_n_points=2,
    num_labels=3,
    backbone_layer_type="basic",
    backbone_depths=(1, 1, 1, 1),
    backbone_hidden_sizes=(8, 16, 32, 32),
    backbone_embedding_size=8,
)
IMAGE = 64
MAX_BOXES = 4


def tiny_model_config(**overrides):
    from deformable_detr_jax import DeformableDetrConfig

    return DeformableDetrConfig(**{**TINY_MODEL, **overrides})


def get_config():
    """The tiny recipe: shapes at 64 x 64, 3 labels, nothing written but checkpoints."""
    from deformable_detr_jax.training.recipes import base_config

    config = base_config(tiny_model_config(num_labels=3))
    config.model.num_labels = 3
    data = config.data
    data.source = "shapes"
    data.batch_size = 4
    data.max_boxes = MAX_BOXES
    data.pad_to = (IMAGE, IMAGE)
    data.num_threads = 1
    data.backend = "python"
    data.shapes.num_train = 64
    data.shapes.num_eval = 8
    data.shapes.image_size = (IMAGE, IMAGE)
    data.shapes.max_objects = 3
    data.augment.scales = (IMAGE,)
    data.augment.max_size = IMAGE
    data.augment.crop_prob = 0.0
    data.augment.eval_size = IMAGE
    data.augment.eval_max_size = IMAGE
    config.optimizer.lr = 1e-3
    config.optimizer.lr_backbone = 1e-4
    config.optimizer.lr_drop_epochs = (2,)
    train = config.train
    train.num_steps = 20
    train.log_every = 1
    train.checkpoint_every = 5
    train.keep_checkpoints = 10
    train.eval_at_end = False
    train.save_model = False
    train.tensorboard = False
    return config


class SyntheticBatches:
    """Deterministic training batches: global batch `t` is a function of `(seed, t)` only, and this
    process gets rows `[process_index * bs, (process_index + 1) * bs)` of it. Random images
    (never zeros), 1..MAX_BOXES random valid boxes per image. `state()` / `restore()` resume.

    `accum`: each global batch is handed out in `accum` consecutive parts (micro-batches), so
    that a run with accumulation sees the same images per step as one without.
    `nan_from`: batches from this index on have NaN pixels (to make the loss non-finite).
    """

    def __init__(
        self,
        global_batch: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        seed: int = 0,
        num_labels: int = 3,
        fixed: bool = False,
        accum: int = 1,
        nan_from: int | None = None,
        image: int = IMAGE,
    ):
        if global_batch % (process_count * accum):
            raise ValueError("global_batch must split over the processes and micro-batches")
        self.bs = global_batch // process_count
        self.accum = accum
        self.global_batch, self.process_index = global_batch, process_index
        self.seed, self.num_labels, self.fixed, self.nan_from = seed, num_labels, fixed, nan_from
        self.image = image
        self.index = 0
        self.num_records = 1000 * global_batch

    def _global(self, t: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0 if self.fixed else t])
        n, size = self.global_batch, self.image
        pixel_values = rng.normal(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
        pixel_mask = np.ones((n, size, size), bool)
        pixel_mask[:, :, size - 8 :] = rng.random((n, 1, 1)) < 0.5  # some images padded
        count = rng.integers(1, MAX_BOXES + 1, n)
        mask = np.arange(MAX_BOXES)[None] < count[:, None]
        centre = rng.uniform(0.3, 0.7, (n, MAX_BOXES, 2))
        extent = rng.uniform(0.1, 0.4, (n, MAX_BOXES, 2))
        boxes = np.concatenate([centre, extent], -1).astype(np.float32)
        labels = rng.integers(0, self.num_labels, (n, MAX_BOXES)).astype(np.int32)
        if self.nan_from is not None and t >= self.nan_from:
            pixel_values[:] = np.nan
        return dict(
            pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels, boxes=boxes, mask=mask
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        step, part = divmod(self.index, self.accum)
        batch = self._global(step)
        self.index += 1
        micro = self.bs // self.accum
        start = self.process_index * self.bs + part * micro
        return {k: v[start : start + micro] for k, v in batch.items()}

    def state(self) -> dict[str, int]:
        return {"index": self.index}

    def restore(self, state) -> None:
        self.index = int(state["index"])


def flat_params(state) -> dict[str, np.ndarray]:
    import jax

    return {k: np.asarray(jax.device_get(v)) for k, v in {**state.params, **state.frozen}.items()}


def _fail_restore_here(step: int) -> None:
    """This process alone cannot read checkpoint `step` (the others can)."""
    from deformable_detr_jax.training import checkpointing

    read = checkpointing.read_step

    def failing_read(directory, at, abstract_state=None):
        if int(at) == step:
            raise checkpointing.CheckpointCorruptError(at, directory, "injected on this process")
        return read(directory, at, abstract_state)

    checkpointing.read_step = failing_read


def _keep_compile_cache() -> None:
    """Several processes on CPU keep the persistent cache on (training turns it off): fills a
    cache the way a version of this package without that check did."""
    from deformable_detr_jax import compile_cache

    compile_cache.shared_cache_problem = lambda *args, **kwargs: None


def _train_worker(args) -> None:
    import jax

    from deformable_detr_jax import compile_cache

    if args.keep_compile_cache:
        _keep_compile_cache()
    compile_cache.programs_read()  # counts from here on
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if args.coordinator:
        from deformable_detr_jax.training import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from deformable_detr_jax.training import make_data_mesh, train

    if args.fail_restore is not None and jax.process_index() == jax.process_count() - 1:
        _fail_restore_here(args.fail_restore)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("deformable_detr_jax.training.loop").setLevel(logging.INFO)
    devices = jax.devices()[: args.devices] if args.devices else None
    mesh = make_data_mesh(devices)
    config = get_config()
    config.model.dropout = args.dropout
    config.train.param_dtype = "float64" if args.x64 else "float32"
    config.data.batch_size = args.batch
    config.train.num_steps = args.steps
    config.train.grad_accum_steps = args.accum
    config.train.checkpoint_every = args.checkpoint_every
    config.train.log_every = args.steps
    data = SyntheticBatches(
        args.batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=1,
        accum=args.accum,
    )
    result = train(
        config,
        args.workdir,
        mesh=mesh,
        train_data=data,
        model_config=tiny_model_config(dropout=args.dropout),
    )
    from deformable_detr_jax.training.train_state import init_weights

    initial = init_weights(
        result.spec, int(config.train.seed), mesh, jax.numpy.float64 if args.x64 else None
    )
    initial = {f"init:{k}": np.asarray(jax.device_get(v)) for d in initial for k, v in d.items()}
    np.savez(args.out, **flat_params(result.state), **initial)
    read, _ = compile_cache.programs_read()
    print(
        f"worker done: {mesh.size} devices, {jax.process_count()} processes, {read} programs "
        "read from the compilation cache",
        flush=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("train")
    worker.add_argument("--out", required=True)
    worker.add_argument("--workdir", required=True)
    worker.add_argument("--steps", type=int, default=3)
    worker.add_argument("--batch", type=int, default=8)
    worker.add_argument("--accum", type=int, default=1)
    worker.add_argument("--devices", type=int, default=0)
    worker.add_argument("--dropout", type=float, default=0.1)
    worker.add_argument("--x64", action="store_true", help="float64 weights and compute")
    worker.add_argument("--coordinator", default=None)
    worker.add_argument("--num-processes", type=int, default=1)
    worker.add_argument("--process-id", type=int, default=0)
    worker.add_argument("--checkpoint-every", type=int, default=0)
    worker.add_argument(
        "--fail-restore",
        type=int,
        default=None,
        help="the last process cannot read this checkpoint step",
    )
    worker.add_argument(
        "--keep-compile-cache",
        action="store_true",
        help="several processes on CPU keep the persistent cache on",
    )
    args = parser.parse_args(argv)
    if args.command == "train":
        _train_worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
