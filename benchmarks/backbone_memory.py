"""Memory of one training step per backbone rematerialisation setting, read off XLA's buffer
assignment of the compiled step (compiled, never run).

    nice -n 19 .venv/bin/python benchmarks/backbone_memory.py                 # all rows
    nice -n 19 .venv/bin/python benchmarks/backbone_memory.py --backbone swin-l \
        --remat none all --size 640 1066 --json out.json

The step is the package's (`training.step.make_train_step`: model, matcher, loss, gradients,
clipping and AdamW over the recipe's parameter groups, state donated), compiled for this
process's devices as a run's first call compiles it (on CPU `CpuTrainStep.compile`, with its
sized options), traced on abstract inputs: no weight is made and nothing is executed. Models:
two-stage Deformable DETR with box refinement (the `SenseTime/deformable-detr-with-box-refine-
two-stage` transformer) on `swin-l` (transformers' Swin-L: embed 192, depths 2-2-18-2, heads
6-12-24-48, `--window` 12 as `microsoft/swin-large-patch4-window12-384`; drop path 0.2, nothing
frozen, as configs/two_stage_swin_t_coco.py), `convnext-l` (depths 3-3-27-3, widths
192-384-768-1536; drop path 0, nothing frozen, as configs/two_stage_convnext_t_coco.py) or `r50`
(configs/two_stage_r50_coco.py: stem and layer1 frozen). Batch `--batch` random-sized images
padded to `--size`, 100 box slots, float32 (`--dtype bfloat16` for bfloat16 compute).

Settings (`model.backbone_remat`): `none`, `stageN` (that stage alone recomputed in the
backward pass), `all`. Columns from `compiled.memory_analysis()`: arguments (weights, optimizer
state, batch), outputs, temporaries (what the step keeps alive besides them: activations saved
for the backward pass, gradients, workspace), aliased (outputs written over donated arguments)
and their total, argument + output - aliased + temporaries: the step's device memory at its
peak as XLA assigns buffers for this platform. Another platform's compiler assigns its own
(GPU: another fusion and scheduling), so a CPU figure is an estimate of a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BACKBONES = ("swin-l", "convnext-l", "r50")
SETTINGS = ("none", "stage1", "stage2", "stage3", "stage4", "all")
GIB = 1024**3


def model_config(backbone: str, window: int, remat: str):
    """The two-stage, box-refine model on `backbone`, its stages recomputed per `remat`."""
    from deformable_detr_jax.config import preset

    variant = "deformable-detr-with-box-refine-two-stage"
    if backbone == "swin-l":
        fields = dict(
            backbone_type="swin",
            backbone_depths=(2, 2, 18, 2),
            backbone_hidden_sizes=(192, 384, 768, 1536),
            backbone_num_heads=(6, 12, 24, 48),
            backbone_window_size=window,
            backbone_drop_path_rate=0.2,
        )
    elif backbone == "convnext-l":
        fields = dict(
            backbone_type="convnext",
            backbone_depths=(3, 3, 27, 3),
            backbone_hidden_sizes=(192, 384, 768, 1536),
        )
    else:
        fields = {}
    flags = {"none": (), "all": (True,) * 4}.get(remat)
    if flags is None:
        stage = int(remat.removeprefix("stage"))
        flags = tuple(i + 1 == stage for i in range(4))
    return preset(variant, **fields, backbone_remat=flags)


def abstract_inputs(config, frozen, batch: int, height: int, width: int, mesh):
    """`(spec, tx, state, batch, key)`: the step's inputs as shapes and shardings only."""
    import jax
    import jax.numpy as jnp

    from deformable_detr_jax.training import mesh as mesh_lib
    from deformable_detr_jax.training import optimizer as optimizer_lib
    from deformable_detr_jax.training import recipes
    from deformable_detr_jax.training.train_state import abstract_train_state, model_spec

    opt = recipes.optimizer_group()
    opt.frozen = frozen
    spec = model_spec(config, tuple(frozen))
    labels = {n: optimizer_lib.param_group(n, opt) for n in spec.trainable}
    tx, _ = optimizer_lib.build_optimizer(opt, labels, 1000)
    state = abstract_train_state(spec, tx, mesh)
    sharding = mesh_lib.batch_sharding(mesh, 1)
    boxes = 100
    shapes = {
        "pixel_values": ((1, batch, height, width, 3), jnp.float32),
        "pixel_mask": ((1, batch, height, width), jnp.bool_),
        "labels": ((1, batch, boxes), jnp.int32),
        "boxes": ((1, batch, boxes, 4), jnp.float32),
        "mask": ((1, batch, boxes), jnp.bool_),
    }
    batch_in = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=mesh_lib.replicated(mesh))
    return spec, tx, state, batch_in, key


def measure(backbone: str, remat: str, args) -> dict:
    """Compiles the step of one setting; its memory analysis and the compile time."""
    import jax

    from deformable_detr_jax.criterion.loss import LossConfig
    from deformable_detr_jax.training import mesh as mesh_lib
    from deformable_detr_jax.training.settings import OptimizerSettings
    from deformable_detr_jax.training.step import make_train_step

    config = model_config(backbone, args.window, remat)
    frozen = OptimizerSettings().frozen if backbone == "r50" else ()
    mesh = mesh_lib.make_data_mesh(jax.local_devices()[:1])
    height, width = args.size
    spec, tx, state, batch, key = abstract_inputs(config, frozen, args.batch, height, width, mesh)
    loss = LossConfig.preset("original", config.num_labels)
    dtype = None if args.dtype == "float32" else jax.numpy.bfloat16
    step = make_train_step(spec, loss, tx, mesh, state, compute_dtype=dtype)
    start = time.perf_counter()
    if hasattr(step, "compile"):  # CPU: what the first call compiles, with its sized options
        compiled = step.compile(state, batch, key)
    else:
        compiled = step.lower(state, batch, key).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    row = dict(
        backbone=backbone,
        remat=remat,
        flags=config.backbone_remat,
        argument=memory.argument_size_in_bytes,
        output=memory.output_size_in_bytes,
        temp=memory.temp_size_in_bytes,
        alias=memory.alias_size_in_bytes,
        compile_s=round(seconds, 1),
    )
    row["total"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    return row


def print_row(row: dict) -> None:
    gib = {k: row[k] / GIB for k in ("argument", "output", "temp", "alias", "total")}
    print(
        f"| {row['backbone']} | {row['remat']} | {gib['argument']:.2f} | {gib['output']:.2f} | "
        f"{gib['alias']:.2f} | {gib['temp']:.2f} | {gib['total']:.2f} | {row['compile_s']:.0f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--remat", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--window", type=int, default=12, help="Swin-L's window (12 or 7)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", default=None, help="append each row to this file (JSON lines)")
    args = parser.parse_args()
    import jax

    height, width = args.size
    print(
        f"# {jax.devices()[0].platform}, jax {jax.__version__}, batch {args.batch}, "
        f"{height}x{width}, {args.dtype}, Swin window {args.window}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    print(
        "| backbone | remat | argument GiB | output GiB | aliased GiB | temp GiB | total GiB "
        "| compile s |",
        flush=True,
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for backbone in args.backbone:
        for remat in args.remat:
            row = measure(backbone, remat, args)
            print_row(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**row, "size": args.size, "batch": args.batch}) + "\n")
    print(f"# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)


if __name__ == "__main__":
    main()
