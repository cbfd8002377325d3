"""Builds transformers' Deformable DETR with random weights: the oracle of the parity tests.

Every parameter and buffer is perturbed away from transformers' initialisation (which
zeroes the sampling-offset and attention-weight projections and leaves batch-norm
statistics at 0/1), so that a wrong layout, a swapped axis or a missed term shows up.

Importing this module does not import torch or transformers (the functions that need them
do), so torch-free test modules may use its plain data (`VARIANTS`, `two_images`, ...);
calling `hf_config`, `random_hf_model` or `state_dict_numpy` makes a test a `torch` test.
"""

from __future__ import annotations

import re

import numpy as np

FULL_SIZE = dict(
    d_model=256,
    encoder_layers=6,
    decoder_layers=6,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_ffn_dim=1024,
    decoder_ffn_dim=1024,
    num_queries=300,
    num_feature_levels=4,
    encoder_n_points=4,
    decoder_n_points=4,
    num_labels=91,
)

VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale": {"num_feature_levels": 1},
}


def hf_config(depth_layout=((3, 4, 6, 3), "bottleneck", (256, 512, 1024, 2048)), **kwargs):
    from transformers import DeformableDetrConfig as HFConfig
    from transformers import ResNetConfig

    depths, layer_type, hidden_sizes = depth_layout
    kwargs = {**FULL_SIZE, **kwargs}
    levels = kwargs["num_feature_levels"]
    backbone = ResNetConfig(
        depths=list(depths),
        layer_type=layer_type,
        hidden_sizes=list(hidden_sizes),
        out_features=["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"],
    )
    return HFConfig(use_timm_backbone=False, backbone_config=backbone, **kwargs)


# Tiny ConvNeXt and Swin backbones (transformers' ConvNextConfig / SwinConfig field names):
# two blocks in one stage, 3 / 5 windows and patches that the test images are no multiples of.
TINY_BACKBONES = {
    "convnext": dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], patch_size=4),
    "swin": dict(embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=5),
    "swin_patch3": dict(
        embed_dim=8,
        depths=[2, 1, 1],
        num_heads=[2, 2, 4],
        window_size=3,
        patch_size=3,
        mlp_ratio=2.0,
    ),
}


def hf_config_with_backbone(kind: str, out_features=None, **kwargs):
    """transformers' config with a `TINY_BACKBONES[kind]` ConvNeXt or Swin backbone
    (`out_features` default: the last three stages, or the last with one level)."""
    from transformers import ConvNextConfig, SwinConfig
    from transformers import DeformableDetrConfig as HFConfig

    kwargs = {**FULL_SIZE, **kwargs}
    fields = TINY_BACKBONES[kind]
    stages = len(fields["depths"])
    if out_features is None:
        last = [f"stage{i}" for i in range(1, stages + 1)]
        out_features = last[-3:] if kwargs["num_feature_levels"] > 1 else last[-1:]
    factory = ConvNextConfig if kind == "convnext" else SwinConfig
    backbone = factory(**fields, out_features=list(out_features))
    return HFConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, **kwargs
    )


def random_hf_model(config, seed: int = 0):
    """`transformers.DeformableDetrForObjectDetection(config)` in eval mode, every weight random."""
    import torch
    from transformers import DeformableDetrForObjectDetection as HFModel

    torch.manual_seed(seed)
    model = HFModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                tensor.copy_(randn(tensor) * 0.1)
            elif ".normalization.weight" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.add_(randn(tensor) * 0.02)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def to_hub_naming(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames transformers-5 keys to the hub files' names (timm backbone, old attention).

    Written from the key names of the published `SenseTime/deformable-detr*` files,
    independently of the converter's table.
    """
    out = {}
    for key, value in state_dict.items():
        new = key
        m = re.match(
            r"model\.backbone\.model\.embedder\.embedder\.(convolution|normalization)"
            r"\.(.*)",
            key,
        )
        if m:
            new = f"model.backbone.conv_encoder.model.{'conv1' if m[1] == 'convolution' else 'bn1'}.{m[2]}"
        m = re.match(r"model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.*)", key)
        if m:
            stage, block, rest = int(m[1]), m[2], m[3]
            prefix = f"model.backbone.conv_encoder.model.layer{stage + 1}.{block}."
            r = re.match(r"layer\.(\d+)\.(convolution|normalization)\.(.*)", rest)
            if r:
                kind = "conv" if r[2] == "convolution" else "bn"
                new = f"{prefix}{kind}{int(r[1]) + 1}.{r[3]}"
            r = re.match(r"shortcut\.(convolution|normalization)\.(.*)", rest)
            if r:
                new = f"{prefix}downsample.{0 if r[1] == 'convolution' else 1}.{r[2]}"
        new = new.replace(".self_attn.o_proj.", ".self_attn.out_proj.")
        new = re.sub(r"\.layers\.(\d+)\.mlp\.fc([12])\.", r".layers.\1.fc\2.", new)
        out[new] = value
    return out


def two_images(seed: int = 0, sizes=((192, 256), (150, 200))):
    """Two random images of different sizes padded bottom-right: NCHW pixels and the mask."""
    rng = np.random.default_rng(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixels = np.zeros((len(sizes), 3, height, width), np.float32)
    mask = np.zeros((len(sizes), height, width), np.int64)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = rng.standard_normal((3, h, w))
        mask[i, :h, :w] = 1
    return pixels, mask
