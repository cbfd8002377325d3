"""PyTorch module trees for the key-map tests (tests/test_convert_formats.py): tiny
transformers `DeformableDetrForObjectDetection` models and a skeleton of fundamentalvision's
`DeformableDETR`. Imports torch: import it only inside tests marked `torch`."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

from tests.test_convert_formats import BACKBONE, TINY, VARIANTS


def randomize(module: nn.Module, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g))
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def hf_model(variant: str) -> DeformableDetrForObjectDetection:
    levels = VARIANTS[variant]["num_feature_levels"]
    out = ["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"]
    config = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=ResNetConfig(**BACKBONE, out_features=out),
        **TINY,
        **VARIANTS[variant],
    )
    return DeformableDetrForObjectDetection(config)


# --- skeleton of fundamentalvision's DeformableDETR (attribute names only, no forward) ---


class _FrozenBatchNorm2d(nn.Module):
    def __init__(self, n):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.ones(n))


class _Bottleneck(nn.Module):  # torchvision.models.resnet.Bottleneck
    def __init__(self, cin, cout, downsample):
        super().__init__()
        width = cout // 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), _FrozenBatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, bias=False), _FrozenBatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), _FrozenBatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _FrozenBatchNorm2d(cout))
            if downsample
            else None
        )


class _Body(nn.Module):  # IntermediateLayerGetter(resnet) keeps conv1, bn1, layer1..layer4
    def __init__(self, embedding_size, hidden_sizes, depths):
        super().__init__()
        self.conv1 = nn.Conv2d(3, embedding_size, 7, bias=False)
        self.bn1 = _FrozenBatchNorm2d(embedding_size)
        cin = embedding_size
        for stage, (cout, depth) in enumerate(zip(hidden_sizes, depths, strict=True)):
            blocks = [_Bottleneck(cin if b == 0 else cout, cout, b == 0) for b in range(depth)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            cin = cout


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Body(**BACKBONE)


class _MSDeformAttn(nn.Module):
    def __init__(self, d_model, n_levels, n_heads, n_points):
        super().__init__()
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)


class _EncoderLayer(nn.Module):
    def __init__(self, d, ffn, levels, heads, points):
        super().__init__()
        self.self_attn = _MSDeformAttn(d, levels, heads, points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm2 = nn.LayerNorm(d)


class _DecoderLayer(nn.Module):
    def __init__(self, d, ffn, levels, heads, points):
        super().__init__()
        self.cross_attn = _MSDeformAttn(d, levels, heads, points)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm3 = nn.LayerNorm(d)


class _Stack(nn.Module):
    def __init__(self, layer, n):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(n)])
        self.bbox_embed = None
        self.class_embed = None


class _Transformer(nn.Module):
    def __init__(self, d, levels, two_stage):
        super().__init__()
        heads = TINY["encoder_attention_heads"]
        enc = _EncoderLayer(d, TINY["encoder_ffn_dim"], levels, heads, TINY["encoder_n_points"])
        dec = _DecoderLayer(d, TINY["decoder_ffn_dim"], levels, heads, TINY["decoder_n_points"])
        self.encoder = _Stack(enc, TINY["encoder_layers"])
        self.decoder = _Stack(dec, TINY["decoder_layers"])
        self.level_embed = nn.Parameter(torch.empty(levels, d))
        if two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d)
        else:
            self.reference_points = nn.Linear(d, 2)


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)])


class OriginalDeformableDETR(nn.Module):
    def __init__(self, num_feature_levels, with_box_refine, two_stage):
        super().__init__()
        d = TINY["d_model"]
        self.transformer = _Transformer(d, num_feature_levels, two_stage)
        self.class_embed = nn.Linear(d, TINY["num_labels"])
        self.bbox_embed = _MLP(d)
        if not two_stage:
            self.query_embed = nn.Embedding(TINY["num_queries"], 2 * d)
        if num_feature_levels > 1:  # C3..C5 by 1x1 convs, then stride-2 3x3 convs
            outs = BACKBONE["hidden_sizes"][1:]
            proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in outs]
            in_channels = outs[-1]
            for _ in range(num_feature_levels - len(outs)):
                proj.append(nn.Sequential(nn.Conv2d(in_channels, d, 3, 2, 1), nn.GroupNorm(32, d)))
                in_channels = d
        else:  # C5 alone
            proj = [
                nn.Sequential(nn.Conv2d(BACKBONE["hidden_sizes"][-1], d, 1), nn.GroupNorm(32, d))
            ]
        self.input_proj = nn.ModuleList(proj)
        self.backbone = nn.Sequential(_Backbone(), nn.Identity())  # Joiner(backbone, sine)
        num_pred = TINY["decoder_layers"] + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(
                copy.deepcopy(self.class_embed) for _ in range(num_pred)
            )
            self.bbox_embed = nn.ModuleList(copy.deepcopy(self.bbox_embed) for _ in range(num_pred))
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            self.class_embed = nn.ModuleList([self.class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([self.bbox_embed for _ in range(num_pred)])
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
