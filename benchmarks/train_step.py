"""Images per second of one Deformable DETR training step, and transformers' PyTorch model doing
the same step (forward + loss + backward + AdamW) on the same device and batch.

    .venv/bin/python benchmarks/train_step.py --model shapes_tiny            # JAX only
    .venv/bin/python benchmarks/train_step.py --model r50 --batch 2 --size 800 1216 --torch

`--model`: `shapes_tiny` (configs/shapes_tiny.py's model at 96 x 96), `tiny` (the test model),
or a published variant on ResNet-50: `r50` (plain), `r50-box-refine`, `r50-two-stage`. The batch
is random images with 1..10 random boxes each (never zeros). JAX: the jitted `train_step` of
`deformable_detr_jax.training` (state donated, the paper's optimizer: clipping, three groups,
AdamW), on every local device (`--devices`), float32 or `--dtype bfloat16`. PyTorch:
`transformers.DeformableDetrForObjectDetection` built from the same config (random weights),
`loss.backward()` and `torch.optim.AdamW` with the same groups, on CUDA when available. Timings
are medians over `--steps` steps after `--warmup` steps; the JAX figure waits for each step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

MODELS = ("shapes_tiny", "tiny", "r50", "r50-box-refine", "r50-two-stage")


def model_config(name: str):
    from deformable_detr_jax.config import preset

    if name == "r50":
        return preset("deformable-detr", dropout=0.0)
    if name == "r50-box-refine":
        return preset("deformable-detr-with-box-refine", dropout=0.0)
    if name == "r50-two-stage":
        return preset("deformable-detr-with-box-refine-two-stage", dropout=0.0)
    if name == "tiny":
        sys.path.insert(0, ".")
        from tests.test_training_workers import tiny_model_config

        return tiny_model_config(dropout=0.0)
    sys.path.insert(0, "configs")
    import shapes_tiny

    from deformable_detr_jax.config import DeformableDetrConfig

    fields = {
        k: v for k, v in shapes_tiny.get_config().model.items() if hasattr(DeformableDetrConfig, k)
    }
    fields.update(num_labels=3, id2label=None, dropout=0.0)
    return DeformableDetrConfig(**fields)


def synthetic_batch(batch: int, height: int, width: int, num_labels: int, max_boxes: int = 10,
                    seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    count = rng.integers(1, max_boxes + 1, batch)
    mask = np.arange(max_boxes)[None] < count[:, None]
    boxes = np.concatenate(
        [
            rng.uniform(0.25, 0.75, (batch, max_boxes, 2)),
            rng.uniform(0.05, 0.4, (batch, max_boxes, 2)),
        ],
        -1,
    ).astype(np.float32)
    return {
        "pixel_values": rng.normal(size=(batch, height, width, 3)).astype(np.float32),
        "pixel_mask": np.ones((batch, height, width), bool),
        "labels": rng.integers(0, num_labels, (batch, max_boxes)).astype(np.int32),
        "boxes": boxes,
        "mask": mask,
    }


def time_jax(config, batch, args) -> dict[str, float]:
    import jax

    from deformable_detr_jax.loss import LossConfig
    from deformable_detr_jax.training import mesh as mesh_lib
    from deformable_detr_jax.training import optimizer as optimizer_lib
    from deformable_detr_jax.training import recipes
    from deformable_detr_jax.training.step import make_train_step
    from deformable_detr_jax.training.train_state import (
        create_train_state,
        init_weights,
        model_spec,
    )

    devices = jax.local_devices()[: args.devices] if args.devices else jax.local_devices()
    mesh = mesh_lib.make_data_mesh(devices)
    opt = recipes.optimizer_group()
    spec = model_spec(config, tuple(opt.frozen))
    labels = {n: optimizer_lib.param_group(n, opt) for n in spec.trainable}
    tx, _ = optimizer_lib.make_optimizer(opt, labels, 1000)
    params, frozen = init_weights(spec, 0, mesh)
    state = create_train_state(params, frozen, tx, mesh)
    loss = LossConfig.preset("original", config.num_labels)
    dtype = None if args.dtype == "float32" else jax.numpy.bfloat16
    step = make_train_step(spec, loss, tx, mesh, state, compute_dtype=dtype)
    device_batch = mesh_lib.host_to_global({k: v[None] for k, v in batch.items()}, mesh, 1)
    key = jax.device_put(jax.random.key(0), mesh_lib.replicated(mesh))
    start = time.perf_counter()
    state, metrics = step(state, device_batch, key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, device_batch, key)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"step_s": median, "images_per_s": len(batch["mask"]) / median,
            "first_step_s": compile_s, "loss": float(metrics["loss"]), "devices": len(devices)}  # fmt: skip


def time_torch(config, batch, args) -> dict[str, float]:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.DeformableDetrConfig.from_dict(config.to_hf())
    # the same criterion as the JAX side (the "original" preset: aux losses, class weight 2)
    hf.auxiliary_loss = True
    hf.class_cost, hf.bbox_cost, hf.giou_cost = 2, 5, 2
    hf.disable_custom_kernels = True
    model = transformers.DeformableDetrForObjectDetection(hf).to(device).train()
    groups = {"default": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if "backbone" in name and ("embedder" in name or "stages.0." in name):
            param.requires_grad_(False)
            continue
        if "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(param)
        elif "backbone" in name:
            groups["backbone"].append(param)
        else:
            groups["default"].append(param)
    optimizer = torch.optim.AdamW(
        [{"params": groups["default"], "lr": 2e-4}, {"params": groups["backbone"], "lr": 2e-5},
         {"params": groups["linear_proj"], "lr": 2e-5}], weight_decay=1e-4,
    )  # fmt: skip
    pixel_values = torch.from_numpy(batch["pixel_values"].transpose(0, 3, 1, 2).copy()).to(device)
    pixel_mask = torch.from_numpy(batch["pixel_mask"].astype(np.int64)).to(device)
    labels = [
        {"class_labels": torch.from_numpy(batch["labels"][i][batch["mask"][i]].astype(np.int64)).to(device),
         "boxes": torch.from_numpy(batch["boxes"][i][batch["mask"][i]]).to(device)}
        for i in range(len(batch["mask"]))
    ]  # fmt: skip
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"step_s": median, "images_per_s": len(batch["mask"]) / median, "first_step_s": first,
            "loss": loss, "device": device}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="shapes_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", type=int, default=0, help="local devices (0: all)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--torch", action="store_true", help="also time transformers' PyTorch model"
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    import jax

    config = model_config(args.model)
    height, width = args.size or (
        (96, 96)
        if args.model == "shapes_tiny"
        else (64, 64)
        if args.model == "tiny"
        else (800, 1216)
    )
    batch = synthetic_batch(args.batch, height, width, config.num_labels)
    results = {"model": args.model, "batch": args.batch, "size": [height, width],
               "dtype": args.dtype, "backend": jax.default_backend()}  # fmt: skip
    results["jax"] = time_jax(config, batch, args)
    print(f"jax   {args.model} batch {args.batch} {height}x{width} {args.dtype} on "
          f"{results['jax']['devices']} {jax.default_backend()} device(s): "
          f"{results['jax']['images_per_s']:.2f} img/s ({results['jax']['step_s'] * 1e3:.1f} ms/step, "
          f"first step {results['jax']['first_step_s']:.1f} s)")  # fmt: skip
    if args.torch:
        results["torch"] = time_torch(config, batch, args)
        speedup = results["jax"]["images_per_s"] / results["torch"]["images_per_s"]
        results["speedup"] = speedup
        print(f"torch {args.model} on {results['torch']['device']}: "
              f"{results['torch']['images_per_s']:.2f} img/s ({results['torch']['step_s'] * 1e3:.1f} "
              f"ms/step); JAX / PyTorch = {speedup:.2f}x")  # fmt: skip
        if results["backend"] == "gpu" and results["torch"]["device"] == "cuda":
            print(f"# goal training step >= 2x transformers on the same GPU and batch: "
                  f"{speedup:.2f}x {'PASS' if speedup >= 2 else 'FAIL'}")  # fmt: skip
        else:
            print("# goal training step >= 2x transformers: not measured here (needs a GPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
