"""What the checkpoint checksums cost: the CRC-32 of every train-state array (at each save, and
again at restore) against the save and the restore themselves, for a published model's state.

    .venv/bin/python benchmarks/checkpoint_integrity.py --model r50 --repeats 3

The state is the one `train.py` checkpoints for that model with the paper's optimizer (trained
parameters, AdamW moments of the three groups, frozen stem / layer1 / batch norms), filled with
random values (incompressible, as trained weights are), on one device. Times are medians of
`--repeats` runs: `checksums` is `integrity.tree_checksums` of the state (what `save` adds before
handing it to orbax, and what `restore` adds after reading), `save` is `Checkpoints.save` + `wait`
(asynchronous save made synchronous: the whole write), `restore` is `Checkpoints.restore`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="r50", choices=["r50", "shapes_tiny"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax

    from deformable_detr_jax.config import preset
    from deformable_detr_jax.training import Checkpoints, integrity, recipes
    from deformable_detr_jax.training import optimizer as optimizer_lib
    from deformable_detr_jax.training import train_state as state_lib

    if args.model == "r50":
        model, opt = preset("deformable-detr"), recipes.optimizer_group()
    else:
        recipe = recipes.shapes_tiny()
        model, opt = setup_model(recipe), recipe.optimizer
    spec = state_lib.model_spec(model, tuple(opt.frozen))
    labels = {n: optimizer_lib.param_group(n, opt) for n in spec.trainable}
    tx, _ = optimizer_lib.build_optimizer(opt, labels, 1000)
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    abstract = state_lib.abstract_train_state(spec, tx, mesh)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype), s.sharding), abstract
    )
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))

    times: dict[str, list[float]] = {"checksums": [], "save": [], "restore": []}
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = Checkpoints(folder, max_to_keep=1)
        for step in range(1, args.repeats + 1):
            start = time.perf_counter()
            integrity.tree_checksums(state)
            times["checksums"].append(time.perf_counter() - start)
            start = time.perf_counter()
            checkpoints.save(state, {"index": step}, {"total_steps": 0}, step=step)
            checkpoints.wait()
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            restored, _, _ = checkpoints.restore(abstract, step)
            jax.block_until_ready(restored)
            times["restore"].append(time.perf_counter() - start)
        checkpoints.close()
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "arrays": len(jax.tree.leaves(state)),
                "MB": round(nbytes / 1e6, 1),
                **{f"{k}_s": round(v, 3) for k, v in medians.items()},
                "checksum_MB_per_s": round(nbytes / 1e6 / medians["checksums"]),
                "checksums_of_save": round(medians["checksums"] / medians["save"], 3),
                "checksums_of_restore": round(medians["checksums"] / medians["restore"], 3),
            }
        )
    )


def setup_model(recipe):
    from deformable_detr_jax.training import settings, setup

    source = type("Source", (), {"num_labels": 3, "label_names": None})()
    return setup.model_config(settings.parse(recipe).model, source)


if __name__ == "__main__":
    main()
