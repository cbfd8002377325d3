"""The ResNet backbone alone, forward and forward+backward, JAX against transformers' PyTorch.

    .venv/bin/python benchmarks/backbone.py                      # R50, batch 2, 384 x 512
    .venv/bin/python benchmarks/backbone.py --batch 1 --size 800 1216 --repeats 3

The loss is the sum of squares of the returned feature maps (C3..C5); gradients are taken
w.r.t. the parameters the paper's recipe trains (stem and layer1 frozen, as
`training/settings/groups.DEFAULT_FROZEN`; batch norms frozen everywhere). JAX: the package's
`ResNetBackbone` (1x1 convolutions as matrix products, `modeling/backbone.py`), jitted, and
with `--conv1x1` also the same model with every 1x1 convolution as `nnx.Conv`'s
`lax.conv_general_dilated` (what autodiff gave before), with the per-convolution timings of the
two backward convolutions (input and filter gradient). PyTorch: transformers' `ResNetBackbone`
with frozen batch norm (`DeformableDetrConvEncoder`), eval mode, the same parameters frozen.
JAX and PyTorch are timed interleaved, one repeat each in turn; medians, after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def jax_backbone(config, batch, height, width, seed=0):
    """`(forward, forward_backward)` thunks of the package's backbone on a random batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deformable_detr_jax.modeling.backbone import ResNetBackbone
    from deformable_detr_jax.training.settings.groups import DEFAULT_FROZEN
    from deformable_detr_jax.training.train_state import param_name

    model = ResNetBackbone(config, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    frozen_prefixes = [
        p.replace(r"^model\.backbone\.model\.", "").replace("\\", "") for p in DEFAULT_FROZEN
    ]
    flat = dict(nnx.to_flat_state(params))
    trained = {
        k: v
        for k, v in flat.items()
        if not any(param_name(k).startswith(f) for f in frozen_prefixes)
    }
    fixed = {k: v for k, v in flat.items() if k not in trained}
    x = jnp.asarray(
        np.random.default_rng(seed).standard_normal((batch, height, width, 3)), jnp.float32
    )

    def loss(trained, fixed, rest, x):
        features = nnx.merge(graphdef, nnx.from_flat_state({**trained, **fixed}), rest)(x)
        return sum(jnp.sum(f.astype(jnp.float32) ** 2) for f in features)

    forward = jax.jit(loss)
    grad = jax.jit(jax.grad(loss))
    return (
        lambda: jax.block_until_ready(forward(trained, fixed, rest, x)),
        lambda: jax.block_until_ready(grad(trained, fixed, rest, x)),
    )


def torch_backbone(config, batch, height, width, seed=0):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf = transformers.DeformableDetrConfig.from_dict(config.to_hf())
    model = transformers.DeformableDetrForObjectDetection(hf).model.backbone.eval()
    # transformers 5 freezes the whole backbone (its name filter, "stage.1", never matches the
    # ResNet's "stages.1"): train layer2..4 as the paper and the JAX side do
    for name, param in model.named_parameters():
        param.requires_grad_(not ("embedder" in name or "stages.0." in name))
    x = torch.randn(batch, 3, height, width)
    mask = torch.ones(batch, height, width, dtype=torch.long)

    def loss():
        return sum((f**2).sum() for f, _ in model(x, mask))

    def forward():
        with torch.no_grad():
            return float(loss())

    def forward_backward():
        model.zero_grad(set_to_none=True)
        loss().backward()

    return forward, forward_backward


def conv_gradients(batch, height, width, repeats):
    """Per 1x1 / 3x3 convolution of the R50 layers 2..4: forward, input gradient and filter
    gradient of `lax.conv_general_dilated`, and the filter gradient of the matrix product."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(0)
    h, w = height // 4, width // 4
    cases = [
        ("layer2 1x1 256->128", h, w, 256, 128, 1, 1),
        ("layer2 shortcut 1x1/2 256->512", h, w, 256, 512, 1, 2),
        ("layer2 3x3/2 128", h, w, 128, 128, 3, 2),
        ("layer2 3x3 128", h // 2, w // 2, 128, 128, 3, 1),
        ("layer2 1x1 128->512", h // 2, w // 2, 128, 512, 1, 1),
        ("layer3 1x1 1024->256", h // 4, w // 4, 1024, 256, 1, 1),
        ("layer3 3x3 256", h // 4, w // 4, 256, 256, 3, 1),
        ("layer4 3x3 512", h // 8, w // 8, 512, 512, 3, 1),
    ]
    rows = []
    for name, hh, ww, cin, cout, k, s in cases:
        x = jnp.asarray(rng.standard_normal((batch, hh, ww, cin)), jnp.float32)
        kern = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.05, jnp.float32)

        def conv(x, kern, s=s, k=k):
            return lax.conv_general_dilated(
                x, kern, (s, s), ((k // 2, k // 2),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        def matmul(x, kern, s=s):
            return lax.dot_general(x[:, ::s, ::s], kern[0, 0], (((3,), (0,)), ((), ())))

        g = jnp.asarray(rng.standard_normal(conv(x, kern).shape), jnp.float32)
        fns = {
            "forward": jax.jit(conv),
            "input grad": jax.jit(
                lambda x, kern, g, conv=conv: jax.vjp(lambda x: conv(x, kern), x)[1](g)
            ),
            "filter grad": jax.jit(
                lambda x, kern, g, conv=conv: jax.vjp(lambda f: conv(x, f), kern)[1](g)
            ),
        }
        if k == 1:
            fns["filter grad, matmul"] = jax.jit(
                lambda x, kern, g, matmul=matmul: jax.vjp(lambda f: matmul(x, f), kern)[1](g)
            )
        args = {"forward": (x, kern)}
        row = {"conv": name}
        for key, fn in fns.items():
            a = args.get(key, (x, kern, g))
            jax.block_until_ready(fn(*a))
            run = lambda fn=fn, a=a: jax.block_until_ready(fn(*a))  # noqa: E731
            row[key] = statistics.median(_time(run, repeats))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--conv1x1",
        action="store_true",
        help="also the 1x1 convolutions as lax.conv, and per-convolution times",
    )
    args = parser.parse_args(argv)
    import jax

    from deformable_detr_jax.config import preset
    from deformable_detr_jax.modeling import backbone as backbone_lib

    config = preset("deformable-detr")
    height, width = args.size
    runs = {"jax": jax_backbone(config, args.batch, height, width)}
    if args.conv1x1:
        dot = backbone_lib.pointwise_conv
        backbone_lib.pointwise_conv = lambda conv, x, stride=1: conv(x)
        runs["jax, 1x1 as lax.conv"] = jax_backbone(config, args.batch, height, width)
        for fn in runs["jax, 1x1 as lax.conv"]:
            fn()  # traced (and compiled) with the patched function
        backbone_lib.pointwise_conv = dot
    if not args.no_torch:
        runs["torch"] = torch_backbone(config, args.batch, height, width)
    times = {name: ([], []) for name in runs}
    for fns in runs.values():  # warm-up (compiles)
        for fn in fns:
            fn()
    for _ in range(args.repeats):
        for name, fns in runs.items():
            for fn, out in zip(fns, times[name]):
                out.extend(_time(fn, 1))
    print(
        f"ResNet-50 backbone, batch {args.batch}, {height}x{width}, float32, stem + layer1 "
        f"frozen, {jax.default_backend()}, median of {args.repeats}"
    )
    print("| implementation | forward s | forward+backward s |\n|---|---:|---:|")
    for name, (fwd, fwd_bwd) in times.items():
        print(f"| {name} | {statistics.median(fwd):.3f} | {statistics.median(fwd_bwd):.3f} |")
    if args.conv1x1:
        print(
            "\n| convolution | forward ms | input grad ms | filter grad ms | filter grad as "
            "matmul ms |\n|---|---:|---:|---:|---:|"
        )
        for row in conv_gradients(args.batch, height, width, args.repeats):
            extra = row.get("filter grad, matmul")
            print(
                f"| {row['conv']} | {row['forward'] * 1e3:.1f} | {row['input grad'] * 1e3:.1f} "
                f"| {row['filter grad'] * 1e3:.1f} | "
                f"{'' if extra is None else f'{extra * 1e3:.1f}'} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
