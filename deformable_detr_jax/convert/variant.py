"""The architecture a state dict holds, read off its keys and shapes; config checks.

`infer_variant(state_dict)` returns `DeformableDetrConfig` field names (d_model, layer
counts, FFN widths, levels, with_box_refine, two_stage, num_labels, num_queries, heads and
points, position embedding, ResNet description), so a config can be built from it or
checked against it with `check_config_against_variant`, which lists every contradiction.

Shapes cannot tell everything:
- heads: `sampling_offsets` has heads*levels*points*2 outputs and `attention_weights`
  heads*levels*points, so only heads*points is known. `infer_variant` assumes `num_heads`
  (8, as every published checkpoint) and derives points; the config check compares the
  product, so a config with other heads and points that multiply out is accepted.
- dilation (DC5) changes strides, not weights; two-stage models have no query embedding,
  so `num_queries` / `two_stage_num_proposals` are unknown; dropout and loss settings.
  These need a config, or the `args` of an original checkpoint
  (`variant_from_original_args`).
- box refinement: the `model.decoder.bbox_embed.*` copies say so; files that dropped
  them still have per-layer `bbox_embed.N` that differ (without refinement they are one
  shared module, equal by construction).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deformable_detr_jax.convert.backbone_variant import backbone_kind, backbone_variant
from deformable_detr_jax.convert.errors import CheckpointKeyError, ConfigMismatchError
from deformable_detr_jax.convert.formats import HUB_BACKBONE_PREFIX as _BODY
from deformable_detr_jax.convert.formats import to_hub

DEFAULT_NUM_HEADS = 8


def _indices(keys: list[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := regex.match(k))})


def _boxes_differ(hub: Mapping[str, Any]) -> bool:
    """Whether some `bbox_embed.N` (N > 0) differs from `bbox_embed.0`."""
    first = {k[len("bbox_embed.0.") :]: v for k, v in hub.items() if k.startswith("bbox_embed.0.")}
    for key, value in hub.items():
        m = re.match(r"bbox_embed\.(\d+)\.(.*)", key)
        if m and m[1] != "0" and m[2] in first:
            if np.shape(value) != np.shape(first[m[2]]) or not np.array_equal(value, first[m[2]]):
                return True
    return False


def infer_variant(
    state_dict: Mapping[str, Any], *, num_heads: int = DEFAULT_NUM_HEADS
) -> dict[str, Any]:
    """Config fields read off a state dict in any naming (see the module docstring).

    Raises:
      CheckpointKeyError: keys every variant has are missing, or shapes disagree.
      ConfigMismatchError: heads*points is not divisible by `num_heads`.
    """
    hub = to_hub(state_dict)
    shapes = {k: tuple(np.shape(v)) for k, v in hub.items()}
    keys = list(shapes)
    two_stage = "model.enc_output.weight" in shapes
    class_heads = [
        k for k in keys if re.fullmatch(r"(model\.decoder\.)?class_embed\.\d+\.weight", k)
    ]
    kind = backbone_kind(shapes)
    _require_keys(shapes, two_stage=two_stage, class_heads=class_heads, resnet=kind == "resnet")
    num_levels, d_model = shapes["model.level_embed"]
    heads_points, labels, stages, layer_counts = _read_shapes(
        shapes, class_heads, num_levels, resnet=kind == "resnet"
    )
    _check_heads(heads_points, d_model, num_heads)
    variant = {
        "d_model": d_model,
        "encoder_layers": len(layer_counts["encoder"]),
        "decoder_layers": len(layer_counts["decoder"]),
        "encoder_ffn_dim": shapes["model.encoder.layers.0.fc1.weight"][0],
        "decoder_ffn_dim": shapes["model.decoder.layers.0.fc1.weight"][0],
        "num_feature_levels": num_levels,
        "with_box_refine": any(k.startswith("model.decoder.bbox_embed.") for k in keys)
        or _boxes_differ(hub),
        "two_stage": two_stage,
        "num_labels": labels[0],
        "encoder_attention_heads": num_heads,
        "decoder_attention_heads": num_heads,
        "encoder_n_points": heads_points["encoder"] // num_heads,
        "decoder_n_points": heads_points["decoder"] // num_heads,
        "position_embedding_type": "learned"
        if "model.backbone.position_embedding.row_embeddings.weight" in shapes
        else "sine",
    }
    if kind == "resnet":
        variant.update(_resnet_variant(shapes, stages))
    else:
        variant.update(backbone_variant(shapes, kind, num_levels))
    if not two_stage:
        variant["num_queries"] = shapes["model.query_position_embeddings.weight"][0]
    return variant


def _resnet_variant(shapes: Mapping[str, tuple], stages: list[list[int]]) -> dict[str, Any]:
    bottleneck = f"{_BODY}layer1.0.conv3.weight" in shapes
    last_conv = "conv3" if bottleneck else "conv2"
    return {
        "backbone_layer_type": "bottleneck" if bottleneck else "basic",
        "backbone_depths": tuple(len(blocks) for blocks in stages),
        "backbone_hidden_sizes": tuple(
            shapes[f"{_BODY}layer{s}.0.{last_conv}.weight"][0] for s in range(1, 5)
        ),
        "backbone_embedding_size": shapes[_BODY + "conv1.weight"][0],
    }


def _require_keys(
    shapes: Mapping[str, tuple], *, two_stage: bool, class_heads: list[str], resnet: bool = True
):
    """The keys every variant has (with a ResNet backbone: its stem and stages); one
    CheckpointKeyError listing the missing ones."""
    required = [
        "model.level_embed",
        "model.encoder.layers.0.fc1.weight",
        "model.decoder.layers.0.fc1.weight",
        "model.encoder.layers.0.self_attn.attention_weights.weight",
        "model.decoder.layers.0.encoder_attn.attention_weights.weight",
        "model.encoder.layers.0.self_attn.sampling_offsets.weight",
        "model.decoder.layers.0.encoder_attn.sampling_offsets.weight",
        *([_BODY + "conv1.weight"] if resnet else []),
        *([f"{_BODY}layer{s}.0.conv1.weight" for s in range(1, 5)] if resnet else []),
        *([] if two_stage else ["model.query_position_embeddings.weight"]),
        *([] if class_heads else ["class_embed.0.weight"]),
    ]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise CheckpointKeyError.from_problems(
            "state dict (reading the architecture)",
            missing=missing,
            hint="Is this a Deformable DETR detection checkpoint?",
        )


def _read_shapes(
    shapes: Mapping[str, tuple], class_heads: list[str], num_levels: int, resnet: bool = True
):
    """heads*points per attention side, the class heads' label counts, the backbone's block
    indices per stage and the layer indices per side; one CheckpointKeyError listing every
    shape or numbering that disagrees."""
    keys = list(shapes)
    mis_shaped, heads_points = [], {}
    for side, attn in (("encoder", "self_attn"), ("decoder", "encoder_attn")):
        prefix = f"model.{side}.layers.0.{attn}."
        rows = shapes[prefix + "attention_weights.weight"][0]
        offsets = shapes[prefix + "sampling_offsets.weight"][0]
        if rows % num_levels or offsets != 2 * rows:
            mis_shaped.append(
                f"{prefix}attention_weights/sampling_offsets: {rows}/{offsets} outputs, need "
                f"heads*levels*points / twice that with levels={num_levels}"
            )
        heads_points[side] = rows // num_levels
    labels = sorted({shapes[k][0] for k in class_heads})
    if len(labels) > 1:
        mis_shaped.append(f"class heads disagree on num_labels: {labels}")
    stages = [_indices(keys, rf"{re.escape(_BODY)}layer{s}\.(\d+)\.") for s in range(1, 5)]
    if not resnet:  # ConvNeXt / Swin: backbone_variant reads the stages
        stages = []
    layer_counts = {
        side: _indices(keys, rf"model\.{side}\.layers\.(\d+)\.") for side in ("encoder", "decoder")
    }
    for name, found in [
        *zip(("layer1", "layer2", "layer3", "layer4"), stages),
        *layer_counts.items(),
    ]:
        if found != list(range(len(found))):
            mis_shaped.append(f"{name} blocks are numbered {found}, expected 0..{len(found) - 1}")
    if mis_shaped:
        raise CheckpointKeyError.from_problems("state dict", mis_shaped=mis_shaped)
    return heads_points, labels, stages, layer_counts


def _check_heads(heads_points: Mapping[str, int], d_model: int, num_heads: int) -> None:
    for side, product in heads_points.items():
        if product % num_heads or d_model % num_heads:
            raise ConfigMismatchError(
                f"{side} attention has heads*points={product} and d_model={d_model}, which "
                f"{num_heads} heads do not divide; give the checkpoint's number of heads "
                "(a config with encoder/decoder_attention_heads)"
            )


# transformers config.json nesting -> flat config field names.
_HF_BACKBONE_FIELDS = {
    "layer_type": "backbone_layer_type",
    "depths": "backbone_depths",
    "hidden_sizes": "backbone_hidden_sizes",
    "embedding_size": "backbone_embedding_size",
}
# Fields compared as products (heads cannot be told from points by shapes alone).
_PRODUCTS = {
    "encoder": ("encoder_attention_heads", "encoder_n_points"),
    "decoder": ("decoder_attention_heads", "decoder_n_points"),
}


def config_fields(config: Any) -> dict[str, Any]:
    """Flat config fields of a `DeformableDetrConfig`, a dict of its fields, a transformers
    `config.json` dict (nested `backbone_config`, `id2label`, timm `backbone` name), or any
    object with those attributes."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        fields = dict(config)
    else:
        fields = dict(vars(config))
    backbone = fields.get("backbone_config")
    if isinstance(backbone, Mapping) and backbone.get("model_type", "resnet") == "resnet":
        for name, field in _HF_BACKBONE_FIELDS.items():
            if name in backbone:
                fields.setdefault(field, backbone[name])
    elif isinstance(fields.get("backbone"), str) and "backbone_depths" not in fields:
        name = fields["backbone"]
        if name.startswith("resnet") and name[6:].isdigit():
            from deformable_detr_jax.config import RESNET_DEPTHS, resnet_fields

            if int(name[6:]) in RESNET_DEPTHS:
                fields.update(resnet_fields(int(name[6:])))
    if fields.get("id2label") and "num_labels" not in fields:
        fields["num_labels"] = len(fields["id2label"])
    return fields


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_config_against_variant(config: Any, variant: Mapping[str, Any]) -> None:
    """Raises ConfigMismatchError listing every field where `config` contradicts `variant`.

    Fields the config does not set are not compared; heads and points are compared as
    their product (see the module docstring).
    """
    fields = config_fields(config)
    problems = []
    product_fields = {f for pair in _PRODUCTS.values() for f in pair}
    for name, value in variant.items():
        if name in product_fields or name not in fields:
            continue
        if not _same(fields[name], value):
            problems.append(f"{name}: config says {fields[name]!r}, the weights have {value!r}")
    for side, (heads, points) in _PRODUCTS.items():
        if all(f in fields for f in (heads, points)) and all(f in variant for f in (heads, points)):
            got, want = fields[heads] * fields[points], variant[heads] * variant[points]
            if got != want:
                problems.append(
                    f"{side} attention: config {heads}={fields[heads]} x {points}="
                    f"{fields[points]} = {got} sampling points per level, the weights have {want}"
                )
    if problems:
        raise ConfigMismatchError(
            f"the config contradicts the weights in {len(problems)} setting(s):\n  "
            + "\n  ".join(problems)
            + "\nUse the config.json that came with the weights, or leave the config out to "
            "infer the architecture from the weights."
        )


# fundamentalvision main.py argument -> config field(s), for checkpoints with `args`.
_ORIGINAL_ARGS = {
    "hidden_dim": ("d_model",),
    "enc_layers": ("encoder_layers",),
    "dec_layers": ("decoder_layers",),
    "dim_feedforward": ("encoder_ffn_dim", "decoder_ffn_dim"),
    "nheads": ("encoder_attention_heads", "decoder_attention_heads"),
    "enc_n_points": ("encoder_n_points",),
    "dec_n_points": ("decoder_n_points",),
    "num_feature_levels": ("num_feature_levels",),
    "num_queries": ("num_queries", "two_stage_num_proposals"),
    "with_box_refine": ("with_box_refine",),
    "two_stage": ("two_stage",),
    "dilation": ("dilation",),
    "dropout": ("dropout",),
}
_ORIGINAL_POSITION_EMBEDDINGS = {
    "sine": "sine",
    "v2": "sine",
    "learned": "learned",
    "v3": "learned",
}


def variant_from_original_args(args: Any) -> dict[str, Any]:
    """Config fields from the `args` namespace of a fundamentalvision checkpoint.

    This is where heads, dilation and the number of queries of a two-stage model are
    recorded. Arguments that are absent are left out.
    """
    fields = config_fields(args)
    out = {
        target: fields[name]
        for name, targets in _ORIGINAL_ARGS.items()
        if name in fields
        for target in targets
    }
    if fields.get("position_embedding") in _ORIGINAL_POSITION_EMBEDDINGS:
        out["position_embedding_type"] = _ORIGINAL_POSITION_EMBEDDINGS[fields["position_embedding"]]
    if isinstance(fields.get("backbone"), str):
        backbone = config_fields({"backbone": fields["backbone"]})
        out.update({k: v for k, v in backbone.items() if k.startswith("backbone_")})
    return out
