"""The ConvNeXt or Swin backbone a hub-named state dict holds, read off its keys and shapes.

Called by `variant.infer_variant` when the backbone is no ResNet. ConvNeXt: stages, blocks and
widths from `encoder.stages.S.layers.B.dwconv`, the patch size from the stem, no layer scale when
no `layer_scale_parameter` (its initial value is not in the weights). Swin (transformers 4 names,
see `formats.SWIN_V4_TO_V5`): blocks per stage, widths from `layernorm_before`, heads and window
from the relative position bias table `((2 window - 1)**2, heads)`, the MLP ratio from
`intermediate.dense`. Both: `out_indices` from `hidden_states_norms.stageN`, left out (the
default) when they are the default stages of the number of feature levels.

`backbone_file_fields` describes an ImageNet backbone file the same way (a ResNet's too), and
`backbone_mismatches` lists where it and a config disagree (`model.backbone_weights`).
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping

from deformable_detr_jax import backbone_config
from deformable_detr_jax.convert.errors import CheckpointKeyError
from deformable_detr_jax.convert.formats import HUB_BACKBONE_PREFIX as _BODY

# A key that only this backbone has -> the backbone type.
MARKERS = {
    _BODY + "embeddings.patch_embeddings.weight": "convnext",
    _BODY + "embeddings.patch_embeddings.projection.weight": "swin",
}


def backbone_kind(shapes: Mapping[str, tuple]) -> str:
    """ "convnext", "swin" or "resnet" (anything else: the ResNet's keys are checked)."""
    for key, kind in MARKERS.items():
        if key in shapes:
            return kind
    return "resnet"


def _counts(keys, pattern: str, first: int = 0) -> dict[int, int]:
    """Stage index -> number of distinct block indices, from `pattern` with groups (s, b); the
    stages numbered from `first`."""
    regex = re.compile(re.escape(_BODY) + pattern)
    blocks: dict[int, set[int]] = {}
    for key in keys:
        m = regex.match(key)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stages = sorted(blocks)
    bad = [s for s in stages if sorted(blocks[s]) != list(range(len(blocks[s])))]
    if stages != list(range(first, first + len(stages))) or bad or not stages:
        raise CheckpointKeyError.from_problems(
            "state dict (reading the backbone)",
            mis_shaped=[f"backbone stages/blocks are numbered {dict(sorted(blocks.items()))}"],
        )
    return {s: len(blocks[s]) for s in stages}


def _out_indices(shapes: Mapping[str, tuple], fields: dict, levels: int) -> tuple[int, ...]:
    regex = re.compile(re.escape(_BODY) + r"hidden_states_norms\.stage(\d+)\.weight")
    indices = tuple(sorted({int(m[1]) for k in shapes if (m := regex.fullmatch(k))}))
    config = types.SimpleNamespace(**fields, backbone_out_indices=(), num_feature_levels=levels)
    default = tuple(s + 1 for s in backbone_config.out_stages(config))
    return () if indices == default else indices


def backbone_variant(shapes: Mapping[str, tuple], kind: str, levels: int) -> dict:
    """`DeformableDetrConfig` backbone fields of a ConvNeXt or Swin state dict (hub names)."""
    reader = _convnext if kind == "convnext" else _swin
    fields = reader(shapes)
    fields["backbone_out_indices"] = _out_indices(shapes, fields, levels)
    return fields


def _convnext(shapes: Mapping[str, tuple]) -> dict:
    depths = _counts(shapes, r"encoder\.stages\.(\d+)\.layers\.(\d+)\.")
    fields = {
        "backbone_type": "convnext",
        "backbone_patch_size": shapes[_BODY + "embeddings.patch_embeddings.weight"][-1],
        "backbone_depths": tuple(depths.values()),
        "backbone_hidden_sizes": tuple(
            shapes[f"{_BODY}encoder.stages.{s}.layers.0.dwconv.weight"][0] for s in depths
        ),
    }
    if f"{_BODY}encoder.stages.0.layers.0.layer_scale_parameter" not in shapes:
        fields["backbone_layer_scale_init_value"] = 0.0
    return fields


def _swin(shapes: Mapping[str, tuple]) -> dict:
    depths = _counts(shapes, r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
    block = _BODY + "encoder.layers.{s}.blocks.0."
    tables = [
        shapes[block.format(s=s) + "attention.self.relative_position_bias_table"] for s in depths
    ]
    widths = [shapes[block.format(s=s) + "layernorm_before.weight"][0] for s in depths]
    window = (math.isqrt(tables[0][0]) + 1) // 2
    hidden = shapes[block.format(s=0) + "intermediate.dense.weight"][0]
    return {
        "backbone_type": "swin",
        "backbone_patch_size": shapes[_BODY + "embeddings.patch_embeddings.projection.weight"][-1],
        "backbone_depths": tuple(depths.values()),
        "backbone_hidden_sizes": tuple(widths),
        "backbone_num_heads": tuple(t[1] for t in tables),
        "backbone_window_size": window,
        "backbone_mlp_ratio": hidden / widths[0],
    }


def backbone_file_fields(shapes: Mapping[str, tuple]) -> dict | None:
    """The backbone fields of an ImageNet backbone's weights in hub names (under
    `HUB_BACKBONE_PREFIX`): a ConvNeXt or Swin (`backbone_variant`'s fields, with
    `layer_scale` for a ConvNeXt) or a timm / torchvision ResNet; None when none is there."""
    kind = backbone_kind(shapes)
    if kind != "resnet":
        fields = _convnext(shapes) if kind == "convnext" else _swin(shapes)
        if kind == "convnext":
            fields["layer_scale"] = fields.pop("backbone_layer_scale_init_value", None) is None
        return fields
    if not {_BODY + "conv1.weight", _BODY + "layer1.0.conv1.weight"} <= set(shapes):
        return None
    depths = _counts(shapes, r"layer(\d+)\.(\d+)\.", first=1)
    last = "conv3" if _BODY + "layer1.0.conv3.weight" in shapes else "conv2"
    return {
        "backbone_type": "resnet",
        "backbone_layer_type": "bottleneck" if last == "conv3" else "basic",
        "backbone_depths": tuple(depths.values()),
        "backbone_hidden_sizes": tuple(
            shapes[f"{_BODY}layer{s}.0.{last}.weight"][0] for s in depths
        ),
        "backbone_embedding_size": shapes[_BODY + "conv1.weight"][0],
    }


def backbone_mismatches(fields: Mapping, config) -> list[str]:
    """`"name: file X, config Y"` for each `backbone_file_fields` entry the config (a
    `DeformableDetrConfig`) contradicts; only the type when that differs."""
    if fields["backbone_type"] != config.backbone_type:
        return [f"backbone_type: file {fields['backbone_type']!r}, config {config.backbone_type!r}"]
    out = []
    for name, value in fields.items():
        if name == "layer_scale":
            wanted = config.backbone_layer_scale_init_value > 0
            if value != wanted:
                file, conf = ("yes", "no") if value else ("no", "yes")
                out.append(
                    f"layer scale: file {file}, config {conf} "
                    f"(backbone_layer_scale_init_value={config.backbone_layer_scale_init_value})"
                )
        elif name != "backbone_type" and value != getattr(config, name):
            out.append(f"{name}: file {value!r}, config {getattr(config, name)!r}")
    return out
