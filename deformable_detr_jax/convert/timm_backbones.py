"""timm's ImageNet ConvNeXt and Swin state dicts -> the hub's backbone names (no prefix).

Written from timm's `models/convnext.py` and `models/swin_transformer.py` (their modules and
`checkpoint_filter_fn`); the hub names are transformers' (`formats`, transformers 4 for Swin).

ConvNeXt (`convnext_tiny` ...): `stem.0` (patchify conv) / `stem.1` (norm),
`stages.S.downsample.0/1` (norm, 2x2 conv), `stages.S.blocks.B.conv_dw`, `.norm`,
`.mlp.fc1/fc2`, `.gamma` (layer scale, `(C,)` as transformers' `layer_scale_parameter`);
`head.*` and `norm_pre.*` dropped. The facebookresearch files timm's filter converts
(`downsample_layers.0.0/1` stem, `downsample_layers.S.0/1`, `stages.S.B.dwconv`, `.pwconv1/2`,
`.gamma`, final `norm`, `head`) are read too.

Swin (`swin_tiny_patch4_window7_224` ...): `patch_embed.proj/norm`, `layers.S.blocks.B.norm1`,
`.attn.qkv` (fused, rows query, key, value in that order: timm's `reshape(B, N, 3, heads, -1)`),
`.attn.proj`, `.attn.relative_position_bias_table`, `.norm2`, `.mlp.fc1/fc2`; the
`relative_position_index` / `attn_mask` buffers, the final `norm` (transformers'
`swin.layernorm`, unused by its backbone) and `head.*` dropped. Patch merging: timm since 0.9
puts it at the start of stage S >= 1 (`layers.S.downsample`), transformers (and timm before, and
Microsoft's original files) at the end of stage S - 1; the layout is read off the keys
(`layers.0.downsample` only exists in the old one), as timm's filter shifts old files. timm's
merged 2x2 patch order (`reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)`: column
offset major, row offset minor, i.e. [0::2, 0::2], [1::2, 0::2], [0::2, 1::2], [1::2, 1::2]) is
transformers' (and the original's) concatenation order, so `downsample.norm` / `.reduction`
are copied as they are (timm's filter does not permute them either).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from deformable_detr_jax.convert.errors import CheckpointKeyError
from deformable_detr_jax.convert.formats import KeyTemplate, RenameTable, rename_key


def _rows(pairs: Iterable[tuple[str, str]]) -> RenameTable:
    return tuple((KeyTemplate(a), KeyTemplate(b)) for a, b in pairs)


_CONVNEXT_BLOCK = "encoder.stages.{s}.layers.{b}."
CONVNEXT_TIMM = _rows(
    (
        ("stem.0.", "embeddings.patch_embeddings."),
        ("stem.1.", "embeddings.layernorm."),
        ("stages.{s}.downsample.0.", "encoder.stages.{s}.downsampling_layer.0."),
        ("stages.{s}.downsample.1.", "encoder.stages.{s}.downsampling_layer.1."),
        ("stages.{s}.blocks.{b}.conv_dw.", _CONVNEXT_BLOCK + "dwconv."),
        ("stages.{s}.blocks.{b}.norm.", _CONVNEXT_BLOCK + "layernorm."),
        ("stages.{s}.blocks.{b}.mlp.fc1.", _CONVNEXT_BLOCK + "pwconv1."),
        ("stages.{s}.blocks.{b}.mlp.fc2.", _CONVNEXT_BLOCK + "pwconv2."),
        ("stages.{s}.blocks.{b}.gamma", _CONVNEXT_BLOCK + "layer_scale_parameter"),
    )
)
# facebookresearch/ConvNeXt's names (the stem row first: it is downsample_layers.0).
CONVNEXT_FB = _rows(
    (
        ("downsample_layers.0.0.", "embeddings.patch_embeddings."),
        ("downsample_layers.0.1.", "embeddings.layernorm."),
        ("downsample_layers.{s}.0.", "encoder.stages.{s}.downsampling_layer.0."),
        ("downsample_layers.{s}.1.", "encoder.stages.{s}.downsampling_layer.1."),
        ("stages.{s}.{b}.dwconv.", _CONVNEXT_BLOCK + "dwconv."),
        ("stages.{s}.{b}.norm.", _CONVNEXT_BLOCK + "layernorm."),
        ("stages.{s}.{b}.pwconv1.", _CONVNEXT_BLOCK + "pwconv1."),
        ("stages.{s}.{b}.pwconv2.", _CONVNEXT_BLOCK + "pwconv2."),
        ("stages.{s}.{b}.gamma", _CONVNEXT_BLOCK + "layer_scale_parameter"),
    )
)
_SWIN_BLOCK = "encoder.layers.{s}.blocks.{b}."
_SWIN_COMMON = (
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("patch_embed.norm.", "embeddings.norm."),
    ("layers.{s}.blocks.{b}.norm1.", _SWIN_BLOCK + "layernorm_before."),
    ("layers.{s}.blocks.{b}.attn.qkv.", _SWIN_BLOCK + "attention.self.qkv."),
    (
        "layers.{s}.blocks.{b}.attn.relative_position_bias_table",
        _SWIN_BLOCK + "attention.self.relative_position_bias_table",
    ),
    ("layers.{s}.blocks.{b}.attn.proj.", _SWIN_BLOCK + "attention.output.dense."),
    ("layers.{s}.blocks.{b}.norm2.", _SWIN_BLOCK + "layernorm_after."),
    ("layers.{s}.blocks.{b}.mlp.fc1.", _SWIN_BLOCK + "intermediate.dense."),
    ("layers.{s}.blocks.{b}.mlp.fc2.", _SWIN_BLOCK + "output.dense."),
)
# timm >= 0.9: the merging that starts stage s+1 is transformers' end of stage s.
SWIN_TIMM = _rows((*_SWIN_COMMON, ("layers.{s+1}.downsample.", "encoder.layers.{s}.downsample.")))
# timm < 0.9 and Microsoft's files: at the end of stage s, as transformers.
SWIN_OLD = _rows((*_SWIN_COMMON, ("layers.{s}.downsample.", "encoder.layers.{s}.downsample.")))

# Classifier parts and buffers that are no weights of the backbone.
_DROPPED = {
    "convnext": re.compile(r"^(head|norm_pre)\."),
    "convnext_fb": re.compile(r"^(head|norm)\."),
    "swin": re.compile(r"^(head|norm)\.|(^|\.)(relative_position_index|attn_mask)$"),
}
_QKV = re.compile(r"(.*\.attention\.self\.)qkv\.(weight|bias)")

NAMINGS = {
    "convnext": "timm ConvNeXt",
    "convnext_fb": "facebookresearch ConvNeXt",
    "swin": "timm Swin",
}


def timm_naming(keys: Iterable[str]) -> str | None:
    """ "convnext" (timm), "convnext_fb" (facebookresearch), "swin" (timm or Microsoft's), or
    None: not one of these namings."""
    keys = set(keys)
    if {"stem.0.weight", "stages.0.blocks.0.conv_dw.weight"} <= keys:
        return "convnext"
    if {"downsample_layers.0.0.weight", "stages.0.0.dwconv.weight"} <= keys:
        return "convnext_fb"
    if {"patch_embed.proj.weight", "layers.0.blocks.0.attn.qkv.weight"} <= keys:
        return "swin"
    return None


def timm_to_hub(state_dict: Mapping[str, Any], naming: str) -> dict[str, Any]:
    """A `timm_naming` state dict in the hub's backbone names (without `HUB_BACKBONE_PREFIX`),
    the fused `qkv` split into query, key and value.

    Raises:
      CheckpointKeyError: keys of no backbone weight this model has (ConvNeXt V2's `grn`, an
        absolute position embedding, ...), all listed.
    """
    if naming == "swin":
        old = any(k.startswith("layers.0.downsample.") for k in state_dict)
        table = SWIN_OLD if old else SWIN_TIMM
    else:
        table = CONVNEXT_TIMM if naming == "convnext" else CONVNEXT_FB
    out, unexpected = {}, []
    for key, value in state_dict.items():
        if _DROPPED[naming].search(key):
            continue
        hub = rename_key(key, table, reverse=False)
        if hub is None:
            unexpected.append(key)
            continue
        fused = _QKV.fullmatch(hub)
        if fused is None:
            out[hub] = value
            continue
        for name, part in zip(("query", "key", "value"), np.split(np.asarray(value), 3)):
            out[f"{fused[1]}{name}.{fused[2]}"] = part
    if unexpected:
        raise CheckpointKeyError.from_problems(
            f"{NAMINGS[naming]} state dict",
            unexpected=unexpected,
            hint="These are no weights of transformers' ConvNextBackbone / SwinBackbone (a "
            "ConvNeXt V2, an absolute position embedding, ...); this package has no such "
            "backbone.",
        )
    return out
