"""The ConvNeXt and Swin backbones of `DeformableDetrConfig`: checks and transformers' naming.

`DeformableDetrConfig` describes its backbone with flat `backbone_*` fields (so that each is one
training setting): `backbone_type` ("resnet", "convnext" or "swin"), `backbone_depths` (blocks
per stage) and `backbone_hidden_sizes` (channels per stage) for all three, and for ConvNeXt / Swin
`backbone_patch_size`, `backbone_drop_path_rate`, `backbone_out_indices` (transformers'
`out_indices`: 1-based stage numbers, `()` = the last three stages, or the last alone with one
feature level), ConvNeXt's `backbone_layer_scale_init_value`, Swin's `backbone_num_heads`,
`backbone_window_size` and `backbone_mlp_ratio` (Swin's `embed_dim` is `backbone_hidden_sizes[0]`,
each stage doubling it). This module checks those fields and translates them from and to
transformers' `backbone_config` (`ConvNextConfig` / `SwinConfig` field names); the ResNet stays
in `config.py`. `backbone_remat` (any backbone: which stages `modeling/remat.py` recomputes in the
backward pass) is checked here too. It reads the config by attribute and does not import
`config.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BACKBONE_TYPES = ("resnet", "convnext", "swin")

# transformers' defaults (ConvNextConfig / SwinConfig) for a backbone_config that leaves them out.
_CONVNEXT_DEFAULTS = {"depths": (3, 3, 9, 3), "hidden_sizes": (96, 192, 384, 768)}
_SWIN_DEFAULTS = {"depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "embed_dim": 96}

# backbone_config fields these modules do not implement, with the only value accepted.
_FIXED = {
    "convnext": {"num_channels": 3, "hidden_act": "gelu"},
    "swin": {
        "num_channels": 3,
        "hidden_act": "gelu",
        "qkv_bias": True,
        "use_absolute_embeddings": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-5,
    },
}


def out_stages(config: Any) -> tuple[int, ...]:
    """0-based stages whose outputs feed the transformer (ConvNeXt / Swin)."""
    if config.backbone_out_indices:
        return tuple(i - 1 for i in config.backbone_out_indices)
    last = len(config.backbone_depths) - 1
    if config.num_feature_levels == 1:
        return (last,)
    return tuple(range(max(last - 2, 0), last + 1))


def validate(config: Any) -> None:
    """ConvNeXt / Swin fields of `config` (ValueError naming the field and what is accepted)."""
    kind = config.backbone_type
    depths, sizes = config.backbone_depths, config.backbone_hidden_sizes
    if not depths or min(depths) < 1:
        raise ValueError(f"backbone_depths must be positive block counts, got {depths}")
    if len(sizes) != len(depths) or min(sizes) < 1:
        raise ValueError(
            f"backbone_hidden_sizes must give one positive width per stage ({len(depths)} stages "
            f"in backbone_depths), got {sizes}"
        )
    if config.dilation:
        raise ValueError(f"dilation (DC5) is a ResNet option; the {kind} backbone has none")
    for name in ("backbone_patch_size", "backbone_window_size"):
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(config, name)!r}")
    if not 0.0 <= config.backbone_drop_path_rate < 1.0:
        raise ValueError(
            f"backbone_drop_path_rate must be in [0, 1), got {config.backbone_drop_path_rate}"
        )
    if kind == "swin":
        _validate_swin(config)
    elif config.backbone_layer_scale_init_value < 0:
        raise ValueError(
            "backbone_layer_scale_init_value must be >= 0 (0: no layer scale), got "
            f"{config.backbone_layer_scale_init_value}"
        )
    _validate_out_indices(config)


def validate_remat(config: Any) -> None:
    """`backbone_remat` (any backbone): `()` or one True / False per stage."""
    remat, stages = config.backbone_remat, len(config.backbone_depths)
    if remat and (len(remat) != stages or not all(isinstance(r, bool) for r in remat)):
        raise ValueError(
            f"backbone_remat must be () (no stage recomputed) or one True/False per backbone "
            f"stage ({stages} in backbone_depths), e.g. {(True,) * stages}; got {remat!r}"
        )


def _validate_swin(config: Any) -> None:
    sizes, heads = config.backbone_hidden_sizes, config.backbone_num_heads
    doubling = tuple(sizes[0] * 2**i for i in range(len(sizes)))
    if sizes != doubling:
        raise ValueError(
            f"Swin's stage widths are embed_dim * 2**stage: backbone_hidden_sizes must be "
            f"{doubling} for embed_dim={sizes[0]}, got {sizes}"
        )
    if len(heads) != len(sizes) or any(h < 1 or s % h for s, h in zip(sizes, heads)):
        raise ValueError(
            f"backbone_num_heads must give one head count per Swin stage, each dividing its "
            f"width {sizes}, got {heads}"
        )
    if config.backbone_mlp_ratio <= 0:
        raise ValueError(f"backbone_mlp_ratio must be positive, got {config.backbone_mlp_ratio}")


def _validate_out_indices(config: Any) -> None:
    indices, stages = config.backbone_out_indices, len(config.backbone_depths)
    if indices and (
        list(indices) != sorted(set(indices)) or indices[0] < 1 or indices[-1] > stages
    ):
        raise ValueError(
            f"backbone_out_indices must be increasing stage numbers in 1..{stages} (transformers' "
            f"out_indices without the stem, 0), got {indices}"
        )
    outs = out_stages(config)
    levels = config.num_feature_levels
    if (levels == 1 and len(outs) != 1) or len(outs) > levels:
        raise ValueError(
            f"the backbone gives {len(outs)} feature maps (stages {[s + 1 for s in outs]}) but "
            f"num_feature_levels={levels}: give at most that many backbone_out_indices, one when "
            "num_feature_levels=1"
        )


# ------------------------------------------------------------------------------------------
# transformers' backbone_config.


def from_hf(backbone_config: Mapping[str, Any]) -> dict[str, Any]:
    """`DeformableDetrConfig` fields of a ConvNeXt or Swin `backbone_config` dict."""
    kind = backbone_config["model_type"]
    for name, value in _FIXED[kind].items():
        if name in backbone_config and backbone_config[name] != value:
            raise ValueError(
                f"backbone_config.{name}={backbone_config[name]!r} is not supported for the "
                f"{kind} backbone; only {value!r}"
            )
    if kind == "convnext":
        depths = tuple(backbone_config.get("depths") or _CONVNEXT_DEFAULTS["depths"])
        fields = dict(
            backbone_hidden_sizes=tuple(
                backbone_config.get("hidden_sizes") or _CONVNEXT_DEFAULTS["hidden_sizes"]
            ),
            backbone_layer_scale_init_value=float(
                backbone_config.get("layer_scale_init_value", 1e-6)
            ),
            backbone_drop_path_rate=float(backbone_config.get("drop_path_rate", 0.0)),
        )
        stages = backbone_config.get("num_stages", len(depths))
        if stages != len(depths):
            raise ValueError(
                f"backbone_config.num_stages={stages} but depths has {len(depths)} entries"
            )
    else:
        depths = tuple(backbone_config.get("depths") or _SWIN_DEFAULTS["depths"])
        embed_dim = int(backbone_config.get("embed_dim", _SWIN_DEFAULTS["embed_dim"]))
        fields = dict(
            backbone_hidden_sizes=tuple(embed_dim * 2**i for i in range(len(depths))),
            backbone_num_heads=tuple(
                backbone_config.get("num_heads") or _SWIN_DEFAULTS["num_heads"]
            ),
            backbone_window_size=int(backbone_config.get("window_size", 7)),
            backbone_mlp_ratio=float(backbone_config.get("mlp_ratio", 4.0)),
            backbone_drop_path_rate=float(backbone_config.get("drop_path_rate", 0.1)),
        )
    fields.update(
        backbone_type=kind,
        backbone_depths=depths,
        backbone_patch_size=_patch_size(backbone_config),
        backbone_out_indices=_out_indices(backbone_config, len(depths)),
    )
    return fields


def _patch_size(backbone_config: Mapping[str, Any]) -> int:
    size = backbone_config.get("patch_size", 4)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"backbone_config.patch_size must be square, got {size}")
        size = size[0]
    return int(size)


def _out_indices(backbone_config: Mapping[str, Any], stages: int) -> tuple[int, ...]:
    """transformers' out_indices (out_features when only they are given; the last stage when
    neither is, as transformers defaults)."""
    indices = backbone_config.get("out_indices")
    features = backbone_config.get("out_features")
    names = ["stem"] + [f"stage{i}" for i in range(1, stages + 1)]
    if indices is None and features is not None:
        unknown = [f for f in features if f not in names]
        if unknown:
            raise ValueError(
                f"backbone_config.out_features has {unknown}; the stages are {names[1:]}"
            )
        indices = [names.index(f) for f in features]
    if indices is None:
        return (stages,)
    indices = tuple(int(i) + (stages + 1 if int(i) < 0 else 0) for i in indices)
    if 0 in indices:
        raise ValueError(
            "backbone_config.out_features includes the stem; only stages (stage1..) can feed "
            "Deformable DETR here"
        )
    return indices


def to_hf(config: Any) -> dict[str, Any]:
    """transformers' `backbone_config` dict of a ConvNeXt or Swin `DeformableDetrConfig`."""
    stages = [s + 1 for s in out_stages(config)]
    common = {
        "model_type": config.backbone_type,
        "num_channels": 3,
        "patch_size": config.backbone_patch_size,
        "depths": list(config.backbone_depths),
        "hidden_act": "gelu",
        "drop_path_rate": config.backbone_drop_path_rate,
        "out_features": [f"stage{i}" for i in stages],
        "out_indices": stages,
    }
    if config.backbone_type == "convnext":
        return {
            **common,
            "num_stages": len(config.backbone_depths),
            "hidden_sizes": list(config.backbone_hidden_sizes),
            "layer_scale_init_value": config.backbone_layer_scale_init_value,
        }
    return {
        **common,
        **_FIXED["swin"],
        "embed_dim": config.backbone_hidden_sizes[0],
        "num_heads": list(config.backbone_num_heads),
        "window_size": config.backbone_window_size,
        "mlp_ratio": config.backbone_mlp_ratio,
    }
