"""timm-named ImageNet ConvNeXt / Swin weights through `model.backbone_weights`.

Oracles:
- timm itself (`test_timm_weights_against_timm`): timm's `ConvNeXt` / `SwinTransformer` with
  every parameter perturbed, its `state_dict()` saved, loaded into our backbone; our stage
  outputs equal timm's `forward_intermediates` (layer-normed without affine: our output norms
  stay fresh). timm imports torchvision, which this torch lacks: the test runs an installed
  timm when torchvision is there, else the source of a pytorch-image-models checkout named by
  `$TIMM_SOURCE` with torchvision stubbed (timm's model code never calls it), else skips.
  The old layouts (Microsoft's Swin, facebookresearch's ConvNeXt) are written by this file's
  own inverse of timm's `checkpoint_filter_fn`, checked by running that filter on them.
- transformers (`test_timm_weights_against_transformers`, lane 1, no timm needed): a
  `ConvNextBackbone` / `SwinBackbone` with random weights renamed to timm's names by the
  mapping below (written from timm's modules, not by the code under test).
- Torch-free: a timm-shaped file fills every backbone weight where timm's names say; files of
  another backbone (a ResNet for a Swin config, Swin-S for Swin-T, ...) are one
  `ConfigMismatchError` naming both, raised before the model's initialisation is traced.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from deformable_detr_jax import DeformableDetrConfig
from deformable_detr_jax.convert.errors import CheckpointKeyError, ConfigMismatchError
from deformable_detr_jax.modeling.backbone import DeformableDetrConvEncoder
from deformable_detr_jax.training.initialization import backbone_weights_from_resnet
from tests.random_models import SMALL

# all four stages out, so that the stem and the first stage are compared too
CONVNEXT = dict(
    backbone_type="convnext",
    backbone_depths=(1, 2, 1, 1),
    backbone_hidden_sizes=(8, 16, 24, 32),
    backbone_out_indices=(1, 2, 3, 4),
)
SWIN = dict(
    backbone_type="swin",
    backbone_depths=(1, 2, 1, 2),
    backbone_hidden_sizes=(8, 16, 32, 64),
    backbone_num_heads=(1, 2, 2, 4),
    backbone_window_size=3,
    backbone_out_indices=(1, 2, 3, 4),
)
FIELDS = {"convnext": CONVNEXT, "swin": SWIN}
# ConvNeXt: sizes no multiple of 4 (the stem floors, as timm's and transformers' do). Swin:
# every stage a multiple of the window (96 / 4 / 8 = 3): timm pads a window after its cyclic
# shift, transformers before it, so they agree only where there is no window padding.
SIZES = {"convnext": (70, 102), "swin": (96, 192)}
LAYER_NORM_EPS = {"convnext": 1e-6, "swin": 1e-5}  # transformers' hidden_states_norms
CASES = ["convnext", "convnext_fb", "swin", "swin_old"]


# ------------------------------------------------------------------------ timm's names, by hand


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


_HF_TO_TIMM = {
    "convnext": [
        (r"embeddings\.patch_embeddings\.(\w+)", r"stem.0.\1"),
        (r"embeddings\.layernorm\.(\w+)", r"stem.1.\1"),
        (r"encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.(\w+)", r"stages.\1.downsample.\2.\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.(\w+)", r"stages.\1.blocks.\2.conv_dw.\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(\w+)", r"stages.\1.blocks.\2.norm.\3"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv(\d)\.(\w+)", r"stages.\1.blocks.\2.mlp.fc\3.\4"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter", r"stages.\1.blocks.\2.gamma"),
    ],
    "swin": [
        (r"swin\.embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
        (r"swin\.embeddings\.norm\.(\w+)", r"patch_embed.norm.\1"),
        (r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.(\w+)", r"layers.\1.blocks.\2.norm1.\3"),
        (r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.(\w+)", r"layers.\1.blocks.\2.norm2.\3"),
        (r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.(\w+)", r"layers.\1.blocks.\2.attn.proj.\3"),
        (
            r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.relative_position_bias\.relative_position_bias_table",
            r"layers.\1.blocks.\2.attn.relative_position_bias_table",
        ),
        (r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc\d)\.(\w+)", r"layers.\1.blocks.\2.mlp.\3.\4"),
        (r"swin\.layernorm\.(\w+)", r"norm.\1"),
    ],
}  # fmt: skip


def hf_to_timm(hf: dict[str, np.ndarray], kind: str, rng) -> dict[str, np.ndarray]:
    """A transformers ConvNextBackbone / SwinBackbone state dict in timm's names (new layout),
    with a classifier head as timm's models have."""
    out, width = {}, 0
    for key, value in hf.items():
        if key.startswith("hidden_states_norms."):
            continue
        qkv = re.fullmatch(
            r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.q_proj\.(\w+)", key
        )
        down = re.fullmatch(r"swin\.encoder\.layers\.(\d+)\.downsample\.(.+)", key)
        if qkv:  # timm's fused projection: rows query, key, value
            parts = [hf[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"layers.{qkv[1]}.blocks.{qkv[2]}.attn.qkv.{qkv[3]}"] = np.concatenate(parts)
        elif re.search(r"\.attention\.[kv]_proj\.", key):
            continue
        elif down:  # transformers' merging ends stage s, timm's starts stage s + 1
            out[f"layers.{int(down[1]) + 1}.downsample.{down[2]}"] = value
        else:
            name = _rename(key, _HF_TO_TIMM[kind])
            assert name is not None, key
            out[name] = value
        width = max(width, value.shape[0])
    if kind == "convnext":
        out["head.norm.weight"] = rng.normal(size=(width,)).astype(np.float32)
        out["head.norm.bias"] = rng.normal(size=(width,)).astype(np.float32)
    out["head.fc.weight"] = rng.normal(size=(5, width)).astype(np.float32)
    out["head.fc.bias"] = rng.normal(size=(5,)).astype(np.float32)
    return out


def timm_to_old_swin(state: dict[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
    """timm's Swin state dict as Microsoft's files (and timm < 0.9) name it: merging at the end
    of stage s, `head.weight`, with the `relative_position_index` and `attn_mask` buffers."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        key = f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else key.replace("head.fc.", "head.")
        out[key] = value
        block = re.fullmatch(r"(layers\.\d+\.blocks\.(\d+)\.)norm1\.weight", key)
        if block:
            out[block[1] + "attn.relative_position_index"] = np.arange(window**4).reshape(
                window**2, window**2
            )
            if int(block[2]) % 2:
                out[block[1] + "attn_mask"] = np.full((4, window**2, window**2), -100.0, np.float32)
    return out


_TIMM_TO_FB = [
    (r"stem\.(\d)\.(\w+)", r"downsample_layers.0.\1.\2"),
    (r"stages\.(\d+)\.downsample\.(\d)\.(\w+)", r"downsample_layers.\1.\2.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(\w+)", r"stages.\1.\2.dwconv.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.norm\.(\w+)", r"stages.\1.\2.norm.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.(\w+)", r"stages.\1.\2.pwconv\3.\4"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.gamma", r"stages.\1.\2.gamma"),
    (r"head\.norm\.(\w+)", r"norm.\1"),
    (r"head\.fc\.(\w+)", r"head.\1"),
]


def timm_to_fb_convnext(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's ConvNeXt state dict in facebookresearch/ConvNeXt's names."""
    return {_rename(k, _TIMM_TO_FB): v for k, v in state.items()}


def save_case(state: dict[str, np.ndarray], case: str, folder) -> str:
    """The new layouts as timm's model.safetensors; the old ones as the `.pth` training
    checkpoints they come in (`{"model": state_dict}`)."""
    if case in ("convnext", "swin"):
        path = os.path.join(folder, f"{case}.safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
        return path
    import torch

    path = os.path.join(folder, f"{case}.pth")
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, path)
    return path


# ------------------------------------------------------------------------------ our side


def our_features(kind: str, path: str, pixels: np.ndarray) -> list[np.ndarray]:
    """Our backbone's stage outputs (NCHW) with the file loaded through `model.backbone_weights`;
    every backbone weight but the output norms (fresh: identity) must come from the file."""
    config = DeformableDetrConfig(**SMALL, **FIELDS[kind])
    encoder = DeformableDetrConvEncoder(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(encoder)
    flat = nnx.to_flat_state(state)
    names = ["model.backbone." + ".".join(map(str, p)) for p, _ in flat]
    shapes = {n: v.shape for n, (_, v) in zip(names, flat) if isinstance(v, nnx.Param)}
    loaded = backbone_weights_from_resnet(path, shapes, config)
    fresh = {n for n in shapes if n not in loaded}
    assert fresh and all(
        re.search(r"\.hidden_states_norms\.|\.swin\.layernorm\.", n) for n in fresh
    )
    flat = [
        (p, v.replace(jnp.asarray(loaded[n]))) if n in loaded else (p, v)
        for n, (p, v) in zip(names, flat)
    ]
    encoder = nnx.merge(graphdef, nnx.from_flat_state(flat))
    for norm in encoder.model.hidden_states_norms.values():
        np.testing.assert_array_equal(norm.scale[...], 1.0)
        np.testing.assert_array_equal(norm.bias[...], 0.0)
    maps = nnx.jit(lambda b, x: b(x))(encoder.model, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    return [np.asarray(f).transpose(0, 3, 1, 2) for f in maps]


def _compare(got, want, what):
    assert len(got) == len(want) == 4
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what} stage {i + 1}: {a.shape} vs {b.shape}"
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=f"{what} stage {i + 1}")
    return max(float(np.abs(a - b).max()) for a, b in zip(got, want))


def _pixels(kind: str, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 3, *SIZES[kind])).astype(np.float32)


# ------------------------------------------------------------------------------ timm oracle

_TORCHVISION = [
    "torchvision",
    "torchvision.datasets",
    "torchvision.models",
    "torchvision.models.feature_extraction",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.utils",
]


@pytest.fixture(scope="module")
def timm_modules():
    """timm's `convnext` and `swin_transformer` modules: an installed timm, or the checkout at
    `$TIMM_SOURCE` with torchvision stubbed; sys.modules and sys.path restored afterwards."""
    installed = importlib.util.find_spec("timm") and importlib.util.find_spec("torchvision")
    source = os.environ.get("TIMM_SOURCE", "")
    if not installed and not os.path.isfile(
        os.path.join(source, "timm", "models", "swin_transformer.py")
    ):
        pytest.skip(
            "no timm to compare with: timm is not installed with torchvision and $TIMM_SOURCE "
            f"({source!r}) is no pytorch-image-models checkout (git clone "
            "https://github.com/huggingface/pytorch-image-models; TIMM_SOURCE=<that folder>)"
        )
    before = set(sys.modules)
    # the stubs only while timm is imported: transformers, imported later in this process,
    # must not find a torchvision
    with pytest.MonkeyPatch.context() as patch:
        if not installed:
            patch.syspath_prepend(source)
            for name in _TORCHVISION:
                patch.setitem(sys.modules, name, mock.MagicMock(name=name))
        from timm.models import convnext, swin_transformer
    try:
        yield types.SimpleNamespace(convnext=convnext, swin=swin_transformer)
    finally:
        for name in set(sys.modules) - before:
            if name == "timm" or name.startswith("timm."):
                del sys.modules[name]


def _timm_model(timm_modules, kind: str):
    import torch

    torch.manual_seed(21)
    if kind == "convnext":
        fields = CONVNEXT
        model = timm_modules.convnext.ConvNeXt(
            depths=fields["backbone_depths"], dims=fields["backbone_hidden_sizes"], num_classes=5
        )
    else:
        fields = SWIN
        model = timm_modules.swin.SwinTransformer(
            img_size=SIZES["swin"],
            patch_size=4,
            embed_dim=fields["backbone_hidden_sizes"][0],
            depths=fields["backbone_depths"],
            num_heads=fields["backbone_num_heads"],
            window_size=fields["backbone_window_size"],
            always_partition=True,  # as transformers' SwinBackbone: no window clamping
            strict_img_size=False,  # the shift mask of the input's own size
            num_classes=5,
            drop_path_rate=0.0,
        )
    gen = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES)
def test_timm_weights_against_timm(case, timm_modules, tmp_path):
    """Our backbone with a timm file equals timm's model of that file (stage outputs, layer-
    normed as our fresh output norms do), in timm's current layout and the old ones."""
    import torch

    kind = case.split("_")[0]
    model = _timm_model(timm_modules, kind)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    module = timm_modules.convnext if kind == "convnext" else timm_modules.swin
    if case == "convnext_fb":
        state = timm_to_fb_convnext(state)
    elif case == "swin_old":
        state = timm_to_old_swin(state, SWIN["backbone_window_size"])
    if case != kind:  # timm's own filter turns our old layout back into its model's state dict
        back = module.checkpoint_filter_fn({"model": _tensors(state)}, model)
        assert sorted(back) == sorted(model.state_dict())
        for key, value in back.items():
            np.testing.assert_array_equal(value.numpy(), model.state_dict()[key].numpy(), key)
    path = save_case(state, case, tmp_path)

    pixels = _pixels(kind, seed=23)
    with torch.no_grad():
        stages = model.forward_intermediates(torch.from_numpy(pixels), intermediates_only=True)
    want = [
        torch.nn.functional.layer_norm(
            s.permute(0, 2, 3, 1), s.shape[1:2], eps=LAYER_NORM_EPS[kind]
        )
        .permute(0, 3, 1, 2)
        .numpy()
        for s in stages
    ]
    diff = _compare(our_features(kind, path, pixels), want, case)
    print(f"{case} vs timm: max |diff| {diff:.2e}")


def _tensors(state):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


# ---------------------------------------------------------------------- transformers oracle


def _hf_backbone(kind: str):
    import torch
    from transformers import ConvNextBackbone, ConvNextConfig, SwinBackbone, SwinConfig

    fields = FIELDS[kind]
    common = dict(
        depths=list(fields["backbone_depths"]),
        out_features=[f"stage{i}" for i in fields["backbone_out_indices"]],
    )
    if kind == "convnext":
        model = ConvNextBackbone(
            ConvNextConfig(hidden_sizes=list(fields["backbone_hidden_sizes"]), **common)
        )
    else:
        config = SwinConfig(
            embed_dim=fields["backbone_hidden_sizes"][0],
            num_heads=list(fields["backbone_num_heads"]),
            window_size=fields["backbone_window_size"],
            **common,
        )
        model = SwinBackbone(config)
    gen = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "hidden_states_norms" in name:  # fresh, as ours stay
                tensor.copy_(torch.ones_like(tensor) if name.endswith("weight") else 0 * tensor)
            else:
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.torch
@pytest.mark.parametrize("case", CASES)
def test_timm_weights_against_transformers(case, tmp_path):
    """transformers' backbone, renamed to timm's names by this file's mapping, through
    `model.backbone_weights`: our features equal transformers' (float32, 1e-4)."""
    import torch

    kind = case.split("_")[0]
    model = _hf_backbone(kind)
    hf = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    state = hf_to_timm(hf, kind, np.random.default_rng(32))
    if case == "convnext_fb":
        state = timm_to_fb_convnext(state)
    elif case == "swin_old":
        state = timm_to_old_swin(state, SWIN["backbone_window_size"])
    path = save_case(state, case, tmp_path)

    pixels = _pixels(kind, seed=33)
    with torch.no_grad():
        want = [f.numpy() for f in model(torch.from_numpy(pixels)).feature_maps]
    diff = _compare(our_features(kind, path, pixels), want, case)
    print(f"{case} vs transformers: max |diff| {diff:.2e}")


# --------------------------------------------------------------------------------- torch-free


def timm_swin_shapes(embed=8, depths=(1, 2, 1, 2), heads=(1, 2, 2, 4), window=3, mlp=4):
    """Shapes of timm's `SwinTransformer` state dict (current layout), from its modules."""
    shapes = {
        "patch_embed.proj.weight": (embed, 3, 4, 4),
        "patch_embed.proj.bias": (embed,),
        "patch_embed.norm.weight": (embed,),
        "patch_embed.norm.bias": (embed,),
    }
    for s, (depth, h) in enumerate(zip(depths, heads)):
        dim = embed * 2**s
        if s:
            shapes[f"layers.{s}.downsample.norm.weight"] = (2 * dim,)
            shapes[f"layers.{s}.downsample.norm.bias"] = (2 * dim,)
            shapes[f"layers.{s}.downsample.reduction.weight"] = (dim, 2 * dim)
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}."
            shapes |= {
                p + "norm1.weight": (dim,),
                p + "norm1.bias": (dim,),
                p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                p + "attn.qkv.weight": (3 * dim, dim),
                p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim),
                p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,),
                p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (mlp * dim, dim),
                p + "mlp.fc1.bias": (mlp * dim,),
                p + "mlp.fc2.weight": (dim, mlp * dim),
                p + "mlp.fc2.bias": (dim,),
            }
    last = embed * 2 ** (len(depths) - 1)
    return shapes | {"norm.weight": (last,), "norm.bias": (last,), "head.fc.weight": (5, last)}


def timm_convnext_shapes(dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), gamma=True):
    shapes = {
        "stem.0.weight": (dims[0], 3, 4, 4),
        "stem.0.bias": (dims[0],),
        "stem.1.weight": (dims[0],),
        "stem.1.bias": (dims[0],),
    }
    for s, (dim, depth) in enumerate(zip(dims, depths)):
        if s:
            shapes[f"stages.{s}.downsample.0.weight"] = (dims[s - 1],)
            shapes[f"stages.{s}.downsample.0.bias"] = (dims[s - 1],)
            shapes[f"stages.{s}.downsample.1.weight"] = (dim, dims[s - 1], 2, 2)
            shapes[f"stages.{s}.downsample.1.bias"] = (dim,)
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}."
            shapes |= {
                p + "conv_dw.weight": (dim, 1, 7, 7),
                p + "conv_dw.bias": (dim,),
                p + "norm.weight": (dim,),
                p + "norm.bias": (dim,),
                p + "mlp.fc1.weight": (4 * dim, dim),
                p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.fc2.weight": (dim, 4 * dim),
                p + "mlp.fc2.bias": (dim,),
            }
            if gamma:
                shapes[p + "gamma"] = (dim,)
    return shapes | {"head.norm.weight": (dims[-1],), "head.fc.weight": (5, dims[-1])}


def timm_resnet_shapes(widths=(8, 16, 32, 64), depths=(1, 1, 1, 1)):
    """A basic-block ResNet as timm / torchvision name it."""
    shapes = {"conv1.weight": (widths[0], 3, 7, 7), "bn1.weight": (widths[0],)}
    previous = widths[0]
    for s, (width, depth) in enumerate(zip(widths, depths), start=1):
        for b in range(depth):
            p = f"layer{s}.{b}."
            shapes[p + "conv1.weight"] = (width, previous if b == 0 else width, 3, 3)
            shapes[p + "bn1.weight"] = (width,)
            shapes[p + "conv2.weight"] = (width, width, 3, 3)
            shapes[p + "bn2.weight"] = (width,)
        previous = width
    return shapes | {"fc.weight": (5, widths[-1])}


def _random_file(shapes, path, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    save_file(arrays, path)
    return arrays


def test_timm_shaped_files_fill_every_backbone_weight(tmp_path):
    """Without torch: a timm-shaped ConvNeXt and Swin file fill every backbone weight (but the
    output norms), each from the timm name it should come from (fused qkv split in the order
    query, key, value; Swin's merging moved to the end of the previous stage)."""
    from deformable_detr_jax.convert.state_dict import to_nnx_layout

    for kind, shapes in (("convnext", timm_convnext_shapes()), ("swin", timm_swin_shapes())):
        config = DeformableDetrConfig(**SMALL, **FIELDS[kind])
        abstract = nnx.eval_shape(lambda c=config: DeformableDetrConvEncoder(c, rngs=nnx.Rngs(0)))
        flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
        model_shapes = {"model.backbone." + ".".join(map(str, p)): v.shape for p, v in flat}
        arrays = _random_file(shapes, tmp_path / f"{kind}.safetensors")
        loaded = backbone_weights_from_resnet(
            tmp_path / f"{kind}.safetensors", model_shapes, config
        )
        fresh = set(model_shapes) - set(loaded)
        assert fresh and all(re.search(r"hidden_states_norms|swin\.layernorm", n) for n in fresh)
        body = "model.backbone.model."
        if kind == "convnext":
            picks = {
                "stages.2.blocks.0.gamma": "encoder.stages.2.layers.0.layer_scale_parameter",
                "stages.1.downsample.0.weight": "encoder.stages.1.downsampling_layer.0.scale",
                "stages.3.downsample.1.weight": "encoder.stages.3.downsampling_layer.1.kernel",
                "stem.0.weight": "embeddings.patch_embeddings.kernel",
                "stages.1.blocks.1.mlp.fc2.weight": "encoder.stages.1.layers.1.pwconv2.kernel",
            }
        else:
            block = "swin.encoder.layers.1.blocks.1."
            qkv = arrays["layers.1.blocks.1.attn.qkv.weight"]
            for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
                np.testing.assert_array_equal(
                    loaded[f"{body}{block}attention.{part}.kernel"], qkv[16 * i : 16 * (i + 1)].T
                )
            bias = arrays["layers.2.blocks.0.attn.qkv.bias"]
            np.testing.assert_array_equal(
                loaded[f"{body}swin.encoder.layers.2.blocks.0.attention.v_proj.bias"], bias[64:]
            )
            picks = {
                "layers.1.downsample.reduction.weight": "swin.encoder.layers.0.downsample.reduction.kernel",
                "layers.3.downsample.norm.weight": "swin.encoder.layers.2.downsample.norm.scale",
                "layers.1.blocks.1.attn.relative_position_bias_table": block
                + "attention.relative_position_bias.relative_position_bias_table",
                "patch_embed.proj.weight": "swin.embeddings.patch_embeddings.projection.kernel",
            }  # fmt: skip
        for timm_name, ours in picks.items():
            leaf = ours.rsplit(".", 1)[-1]
            want = to_nnx_layout(leaf, arrays[timm_name])
            np.testing.assert_array_equal(loaded[body + ours], want, err_msg=timm_name)


def _swin_config(**fields):
    return DeformableDetrConfig(**SMALL, **{**SWIN, **fields})


@pytest.mark.parametrize(
    "shapes, config, says",
    [
        (
            timm_resnet_shapes(),
            _swin_config(),
            ["holds a resnet backbone", "backbone_type: file 'resnet', config 'swin'"],
        ),
        (
            timm_swin_shapes(depths=(1, 2, 3, 2)),  # "Swin-S" for a "Swin-T" config
            _swin_config(),
            ["holds a swin backbone", "backbone_depths: file (1, 2, 3, 2), config (1, 2, 1, 2)"],
        ),
        (
            timm_swin_shapes(window=5, embed=16),
            _swin_config(),
            [
                "backbone_window_size: file 5, config 3",
                "backbone_hidden_sizes: file (16, 32, 64, 128), config (8, 16, 32, 64)",
            ],
        ),
        (
            timm_convnext_shapes(),
            _swin_config(),
            ["timm ConvNeXt names", "backbone_type: file 'convnext', config 'swin'"],
        ),
        (
            timm_convnext_shapes(gamma=False),
            DeformableDetrConfig(**SMALL, **CONVNEXT),
            ["layer scale: file no, config yes"],
        ),
        (
            timm_swin_shapes(),
            DeformableDetrConfig(**SMALL, **CONVNEXT),
            ["timm Swin names", "backbone_type: file 'swin', config 'convnext'"],
        ),
        (
            {"encoder.layers.0.fc1.weight": (4, 4)},  # no backbone at all
            _swin_config(),
            ["holds no ResNet, ConvNeXt or Swin backbone"],
        ),
    ],
    ids=["resnet-for-swin", "swin-s-for-t", "window", "convnext-for-swin", "layer-scale",
         "swin-for-convnext", "no-backbone"],
)  # fmt: skip
def test_file_of_another_backbone(shapes, config, says, tmp_path):
    """One ConfigMismatchError naming the file, what it holds and what the config wants."""
    _random_file(shapes, tmp_path / "imagenet.safetensors")
    with pytest.raises(ConfigMismatchError) as error:
        backbone_weights_from_resnet(tmp_path / "imagenet.safetensors", {}, config)
    message = str(error.value)
    assert "model.backbone_weights=" in message and "imagenet.safetensors" in message
    for text in says:
        assert text in message


@pytest.mark.parametrize(
    "extra, naming",
    [
        ({"absolute_pos_embed": (1, 576, 8)}, "swin"),
        ({"stages.0.blocks.0.mlp.grn.weight": (32,)}, "convnext"),  # ConvNeXt V2
    ],
)
def test_timm_keys_of_no_backbone_weight(extra, naming, tmp_path):
    shapes = timm_swin_shapes() if naming == "swin" else timm_convnext_shapes()
    _random_file(shapes | extra, tmp_path / "timm.safetensors")
    config = DeformableDetrConfig(**SMALL, **FIELDS[naming])
    with pytest.raises(CheckpointKeyError, match=re.escape(next(iter(extra)))):
        backbone_weights_from_resnet(tmp_path / "timm.safetensors", {}, config)


def test_wrong_backbone_file_before_the_weights_are_initialised(tmp_path, monkeypatch):
    """A training run's `model.backbone_weights` is read and checked before the model's
    initialisation is traced: the ConfigError comes without `init_weights` being called."""
    from deformable_detr_jax.training import run as run_lib
    from deformable_detr_jax.training import train_state as state_lib
    from deformable_detr_jax.training.settings import ConfigError

    _random_file(timm_resnet_shapes(), tmp_path / "resnet.safetensors")
    config = _swin_config()

    def traced(*args, **kwargs):
        raise AssertionError("the initialisation was traced before the file was checked")

    monkeypatch.setattr(state_lib, "init_weights", traced)
    run = types.SimpleNamespace(
        settings=types.SimpleNamespace(
            model=types.SimpleNamespace(
                backbone_weights=str(tmp_path / "resnet.safetensors"), init_from=""
            ),
            train=types.SimpleNamespace(seed=0),
        ),
        spec=state_lib.model_spec(config, ()),
        model=config,
        mesh=None,
    )
    with pytest.raises(ConfigError, match="backbone_type: file 'resnet', config 'swin'"):
        run_lib.initial_weights(run)
