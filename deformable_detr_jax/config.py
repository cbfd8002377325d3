"""`DeformableDetrConfig`: every setting that changes what the model computes.

Field names follow transformers' `DeformableDetrConfig` so that a hub `config.json` maps
one-to-one; `from_hf` / `to_hf` translate the backbone description (timm name or an HF
`ResNetConfig`) and `id2label`. Presets reproduce the published SenseTime variants.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from deformable_detr_jax import backbone_config as other_backbones

# ResNet depth -> (block type, blocks per stage). Widths are the torchvision ones.
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
_HIDDEN_SIZES = {"basic": (64, 128, 256, 512), "bottleneck": (256, 512, 1024, 2048)}
_ACTIVATIONS = ("relu", "gelu", "silu", "swish", "gelu_new", "quick_gelu")

# Loss weights that transformers 5 types as int (it refuses 1.0); written as ints when whole.
_HF_INT_FIELDS = (
    "class_cost",
    "bbox_cost",
    "giou_cost",
    "bbox_loss_coefficient",
    "giou_loss_coefficient",
)

# transformers config fields that are carried over unchanged (same name, same meaning).
_HF_FIELDS = (
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "activation_function",
    "num_queries",
    "num_feature_levels",
    "encoder_n_points",
    "decoder_n_points",
    "two_stage",
    "two_stage_num_proposals",
    "with_box_refine",
    "position_embedding_type",
    "dilation",
    "auxiliary_loss",
    "class_cost",
    "bbox_cost",
    "giou_cost",
    "bbox_loss_coefficient",
    "giou_loss_coefficient",
    "eos_coefficient",
    "focal_alpha",
    "init_std",
    "init_xavier_std",
)


@dataclasses.dataclass(frozen=True)
class DeformableDetrConfig:
    """Configuration of `DeformableDetrForObjectDetection` (defaults: `SenseTime/deformable-detr`).

    The backbone (`backbone_type`) is a ResNet described by `backbone_layer_type`,
    `backbone_depths`, `backbone_hidden_sizes` and `backbone_embedding_size` (defaults:
    ResNet-50); use `DeformableDetrConfig.with_resnet(depth)` or `preset(...)` rather than setting
    them by hand. A ConvNeXt or Swin backbone (`backbone_type="convnext"` / `"swin"`, transformers'
    `ConvNextBackbone` / `SwinBackbone`) uses `backbone_depths`, `backbone_hidden_sizes` and the
    fields below them (see `backbone_config.py`; `with_convnext` / `with_swin` give the tiny ones).
    `id2label` is stored as a tuple of `(id, name)` pairs so that the config stays hashable
    (it is static data of the compiled model); `config.id2label_dict` gives the mapping.
    """

    # Transformer.
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 1024
    decoder_ffn_dim: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "relu"
    num_queries: int = 300
    num_feature_levels: int = 4
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    two_stage: bool = False
    two_stage_num_proposals: int = 300
    with_box_refine: bool = False
    position_embedding_type: str = "sine"
    # Heads.
    num_labels: int = 91
    id2label: tuple[tuple[int, str], ...] | None = None
    # Backbone (ResNet; DC5 = dilation in the last stage).
    backbone_layer_type: str = "bottleneck"
    backbone_depths: tuple[int, ...] = (3, 4, 6, 3)
    backbone_hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    backbone_embedding_size: int = 64
    dilation: bool = False
    # Backbone kind; ConvNeXt and Swin fields (backbone_config.py; unused by the ResNet).
    backbone_type: str = "resnet"
    backbone_patch_size: int = 4
    backbone_num_heads: tuple[int, ...] = ()
    backbone_window_size: int = 7
    backbone_mlp_ratio: float = 4.0
    backbone_layer_scale_init_value: float = 1e-6
    backbone_drop_path_rate: float = 0.0
    backbone_out_indices: tuple[int, ...] = ()
    # Backbone stages recomputed in the backward pass (`modeling/remat.py`): () = none, else one
    # True / False per stage. Not part of what the model computes, nor of config.json.
    backbone_remat: tuple[bool, ...] = ()
    # Loss and matching as transformers' config.json has them (its defaults), kept only for
    # `from_hf` / `to_hf` round trips: no setting of a run. Training reads the recipe's
    # `model.loss.*` (`criterion.loss.LossConfig`); `--config.model.bbox_loss_coefficient` is an
    # error naming `model.loss.bbox_loss_coefficient`.
    auxiliary_loss: bool = False
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    bbox_loss_coefficient: float = 5.0
    giou_loss_coefficient: float = 2.0
    eos_coefficient: float = 0.1
    focal_alpha: float = 0.25
    # Initialisation of a fresh model.
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    # Which `pallas_kernels.ms_deform_attn` implementation the attention layers call.
    msda_implementation: str = "auto"

    def __post_init__(self):
        if self.id2label is not None:
            pairs = self.id2label.items() if isinstance(self.id2label, Mapping) else self.id2label
            pairs = tuple(sorted((int(k), str(v)) for k, v in pairs))
            object.__setattr__(self, "id2label", pairs)
            if len(pairs) != self.num_labels:
                raise ValueError(
                    f"id2label has {len(pairs)} entries but num_labels={self.num_labels}; "
                    "give one name per label or leave id2label unset"
                )
        object.__setattr__(self, "backbone_depths", tuple(int(d) for d in self.backbone_depths))
        for name in ("backbone_hidden_sizes", "backbone_num_heads", "backbone_out_indices"):
            object.__setattr__(self, name, tuple(int(d) for d in getattr(self, name)))
        object.__setattr__(self, "backbone_remat", tuple(self.backbone_remat))
        if self.backbone_type != "resnet" and self.backbone_out_indices:
            # out_indices that name the default stages are the default (one config, one value)
            default = other_backbones.out_stages(self.replace(backbone_out_indices=()))
            if tuple(i - 1 for i in self.backbone_out_indices) == default:
                object.__setattr__(self, "backbone_out_indices", ())
        self._validate()

    def _validate(self) -> None:
        self._validate_sizes()
        self._validate_backbone()
        self._validate_choices()

    def _validate_sizes(self) -> None:
        """Positive widths and counts; heads and GroupNorm(32) dividing d_model."""
        for name in (
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "num_queries",
            "encoder_n_points",
            "decoder_n_points",
            "two_stage_num_proposals",
            "num_labels",
            "backbone_embedding_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_feature_levels not in (1, 3, 4, 5):
            raise ValueError(
                f"num_feature_levels must be 1 (C5 alone) or 3..5 (C3..C5 plus up to two extra "
                f"stride-2 levels), got {self.num_feature_levels}"
            )
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(
                    f"d_model={self.d_model} must be divisible by {name}={getattr(self, name)}"
                )
        if self.d_model % 32:
            raise ValueError(
                f"d_model={self.d_model} must be a multiple of 32 (input_proj uses GroupNorm(32))"
            )

    def _validate_backbone(self) -> None:
        """The ResNet's block type, four stage depths and four widths (ConvNeXt and Swin:
        `backbone_config.validate`)."""
        if self.backbone_type not in other_backbones.BACKBONE_TYPES:
            raise ValueError(
                f"backbone_type must be one of {other_backbones.BACKBONE_TYPES}, got "
                f"{self.backbone_type!r}"
            )
        other_backbones.validate_remat(self)
        if self.backbone_type != "resnet":
            other_backbones.validate(self)
            return
        if self.backbone_out_indices:
            raise ValueError(
                "backbone_out_indices is for ConvNeXt and Swin; the ResNet's stages follow "
                f"num_feature_levels, got {self.backbone_out_indices}"
            )
        if self.backbone_layer_type not in _HIDDEN_SIZES:
            raise ValueError(
                f"backbone_layer_type must be 'basic' or 'bottleneck', got "
                f"{self.backbone_layer_type!r}"
            )
        if len(self.backbone_depths) != 4 or min(self.backbone_depths) < 1:
            raise ValueError(
                f"backbone_depths must be 4 positive block counts (one per ResNet stage), got "
                f"{self.backbone_depths}; use DeformableDetrConfig.with_resnet(depth) for "
                f"depth in {sorted(RESNET_DEPTHS)}"
            )
        if len(self.backbone_hidden_sizes) != 4:
            raise ValueError(
                f"backbone_hidden_sizes must have 4 entries, got {self.backbone_hidden_sizes}"
            )

    def _validate_choices(self) -> None:
        """Named options, the two-stage/box-refine pairing and dropout rates."""
        if self.position_embedding_type not in ("sine", "learned"):
            raise ValueError(
                "position_embedding_type must be 'sine' or 'learned', got "
                f"{self.position_embedding_type!r}"
            )
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function must be one of {_ACTIVATIONS}, got "
                f"{self.activation_function!r}"
            )
        if self.two_stage and not self.with_box_refine:
            raise ValueError("two_stage=True requires with_box_refine=True (as in transformers)")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    # ----------------------------------------------------------------------------------
    # Derived values.

    @property
    def id2label_dict(self) -> dict[int, str]:
        if self.id2label is None:
            return {i: f"LABEL_{i}" for i in range(self.num_labels)}
        return dict(self.id2label)

    @property
    def backbone_depth(self) -> int | None:
        """18/34/50/101 when the backbone is a standard ResNet, else None."""
        if self.backbone_type != "resnet":
            return None
        for depth, (layer_type, depths) in RESNET_DEPTHS.items():
            if (layer_type, depths, _HIDDEN_SIZES[layer_type]) == (
                self.backbone_layer_type,
                self.backbone_depths,
                self.backbone_hidden_sizes,
            ) and self.backbone_embedding_size == 64:
                return depth
        return None

    @property
    def backbone_out_stages(self) -> tuple[int, ...]:
        """Backbone stages (0-based) whose outputs feed the transformer: ResNet C3..C5, or C5
        alone; ConvNeXt and Swin `backbone_out_indices` (default: the last three, or the last)."""
        if self.backbone_type != "resnet":
            return other_backbones.out_stages(self)
        return (1, 2, 3) if self.num_feature_levels > 1 else (3,)

    @property
    def num_decoder_predictions(self) -> int:
        """Number of class/box heads: one per decoder layer, plus one for two-stage proposals."""
        return self.decoder_layers + (1 if self.two_stage else 0)

    @property
    def variant(self) -> str:
        if self.two_stage:
            return "two-stage"
        if self.with_box_refine:
            return "box-refine"
        return "single-scale" if self.num_feature_levels == 1 else "plain"

    def replace(self, **changes: Any) -> DeformableDetrConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def with_resnet(cls, depth: int, **kwargs: Any) -> DeformableDetrConfig:
        """A config whose backbone is the standard ResNet-`depth` (18, 34, 50 or 101)."""
        return cls(**resnet_fields(depth), **kwargs)

    @classmethod
    def with_convnext(cls, **kwargs: Any) -> DeformableDetrConfig:
        """A ConvNeXt-T backbone (`facebook/convnext-tiny-224`'s); `kwargs` replace fields."""
        return cls(**{**CONVNEXT_TINY, **kwargs})

    @classmethod
    def with_swin(cls, **kwargs: Any) -> DeformableDetrConfig:
        """A Swin-T backbone (`microsoft/swin-tiny-patch4-window7-224`'s); `kwargs` replace
        fields."""
        return cls(**{**SWIN_TINY, **kwargs})

    # ----------------------------------------------------------------------------------
    # transformers config.json.

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> DeformableDetrConfig:
        """Reads a transformers `config.json` (a dict, a path to the file, or its folder).

        Accepts the hub form (`use_timm_backbone: true, backbone: "resnet50"`) and the form
        transformers 5 writes (`backbone_config` with `model_type: "resnet"` and its
        depths/layer_type/hidden_sizes). `num_labels` comes from `id2label` when present.
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path) as f:
                    config = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"no transformers config.json at {path}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        model_type = config.get("model_type", "deformable_detr")
        if model_type != "deformable_detr":
            raise ValueError(f"config model_type is {model_type!r}, expected 'deformable_detr'")
        kwargs: dict[str, Any] = {k: config[k] for k in _HF_FIELDS if k in config}
        id2label = config.get("id2label")
        if id2label:
            pairs = tuple(sorted((int(k), str(v)) for k, v in id2label.items()))
            kwargs["num_labels"] = len(pairs)
            # transformers' placeholder names (LABEL_i) mean "no names": keep None
            if any(name != f"LABEL_{i}" for i, name in pairs):
                kwargs["id2label"] = pairs
        elif "num_labels" in config:
            kwargs["num_labels"] = int(config["num_labels"])
        if config.get("num_channels", 3) != 3:
            raise ValueError(f"num_channels must be 3 (RGB), got {config['num_channels']}")
        kwargs.update(_backbone_from_hf(config))
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The transformers 5 `config.json` dict (HF ResNet, ConvNeXt or Swin backbone config)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _HF_FIELDS}
        for name in _HF_INT_FIELDS:
            if float(out[name]).is_integer():
                out[name] = int(out[name])
        out.update(
            model_type="deformable_detr",
            architectures=["DeformableDetrForObjectDetection"],
            is_encoder_decoder=True,
            num_channels=3,
            use_timm_backbone=False,
            id2label={str(k): v for k, v in self.id2label_dict.items()},
            label2id={v: k for k, v in self.id2label_dict.items()},
        )
        if self.backbone_type != "resnet":
            out["backbone_config"] = other_backbones.to_hf(self)
            return out
        stages = [f"stage{i + 1}" for i in self.backbone_out_stages]
        out["backbone_config"] = {
            "model_type": "resnet",
            "num_channels": 3,
            "embedding_size": self.backbone_embedding_size,
            "hidden_sizes": list(self.backbone_hidden_sizes),
            "depths": list(self.backbone_depths),
            "layer_type": self.backbone_layer_type,
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
            "downsample_in_bottleneck": False,
            "out_features": stages,
            "out_indices": [i + 1 for i in self.backbone_out_stages],
        }
        return out


def resnet_fields(depth: int) -> dict[str, Any]:
    """Backbone fields of the standard ResNet of this depth."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
    layer_type, depths = RESNET_DEPTHS[depth]
    return dict(
        backbone_layer_type=layer_type,
        backbone_depths=depths,
        backbone_hidden_sizes=_HIDDEN_SIZES[layer_type],
        backbone_embedding_size=64,
    )


def _backbone_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    backbone_config = config.get("backbone_config")
    if backbone_config is None or backbone_config.get("model_type") == "timm_backbone":
        name = (backbone_config or {}).get("backbone") or config.get("backbone") or "resnet50"
        if not config.get("use_timm_backbone", True) and backbone_config is None:
            raise ValueError("config has use_timm_backbone=false but no backbone_config")
        digits = name.removeprefix("resnet")
        if not name.startswith("resnet") or not digits.isdigit():
            raise ValueError(
                f"backbone {name!r} is not supported; only ResNet backbones "
                f"(resnet{'/'.join(map(str, sorted(RESNET_DEPTHS)))}) are"
            )
        fields = resnet_fields(int(digits))
        if (backbone_config or {}).get("output_stride") == 16:
            fields["dilation"] = True
        return fields
    if backbone_config.get("model_type") in ("convnext", "swin"):
        return other_backbones.from_hf(backbone_config)
    if backbone_config.get("model_type") != "resnet":
        raise ValueError(
            f"backbone_config model_type {backbone_config.get('model_type')!r} is not "
            "supported; only 'resnet' (or a timm resnet name), 'convnext' and 'swin' are"
        )
    if backbone_config.get("downsample_in_bottleneck", False):
        raise ValueError(
            "backbone_config.downsample_in_bottleneck=true (stride on the 1x1 conv) is not "
            "supported; Deformable DETR checkpoints use the stride on the 3x3 conv"
        )
    if backbone_config.get("downsample_in_first_stage", False):
        raise ValueError("backbone_config.downsample_in_first_stage=true is not supported")
    if backbone_config.get("num_channels", 3) != 3:
        raise ValueError("backbone_config.num_channels must be 3")
    fields = dict(
        backbone_layer_type=backbone_config.get("layer_type", "bottleneck"),
        backbone_depths=tuple(backbone_config.get("depths", (3, 4, 6, 3))),
        backbone_hidden_sizes=tuple(
            backbone_config.get("hidden_sizes", _HIDDEN_SIZES["bottleneck"])
        ),
        backbone_embedding_size=int(backbone_config.get("embedding_size", 64)),
    )
    out = backbone_config.get("out_features")
    levels = config.get("num_feature_levels", 4)
    expected = ["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"]
    if out is not None and list(out) != expected:
        raise ValueError(
            f"backbone_config.out_features={out} but num_feature_levels={levels} needs {expected}"
        )
    return fields


# The tiny ImageNet backbones (transformers' ConvNextConfig() / SwinConfig() defaults; Swin's
# drop path as the Swin-T classification recipe).
CONVNEXT_TINY: dict[str, Any] = dict(
    backbone_type="convnext",
    backbone_depths=(3, 3, 9, 3),
    backbone_hidden_sizes=(96, 192, 384, 768),
    backbone_patch_size=4,
    backbone_layer_scale_init_value=1e-6,
)
SWIN_TINY: dict[str, Any] = dict(
    backbone_type="swin",
    backbone_depths=(2, 2, 6, 2),
    backbone_hidden_sizes=(96, 192, 384, 768),
    backbone_num_heads=(3, 6, 12, 24),
    backbone_patch_size=4,
    backbone_window_size=7,
    backbone_drop_path_rate=0.1,
)

# The published SenseTime checkpoints (COCO, 91 label ids as in the hub configs).
PRESETS: dict[str, dict[str, Any]] = {
    "deformable-detr": {},
    "deformable-detr-single-scale": {"num_feature_levels": 1},
    "deformable-detr-single-scale-dc5": {"num_feature_levels": 1, "dilation": True},
    "deformable-detr-with-box-refine": {"with_box_refine": True},
    "deformable-detr-with-box-refine-two-stage": {"with_box_refine": True, "two_stage": True},
}


def preset(name: str, **overrides: Any) -> DeformableDetrConfig:
    """The config of a published variant, e.g. `preset("deformable-detr-with-box-refine")`.

    The `SenseTime/` prefix is optional. Overrides replace preset fields.
    """
    key = name.removeprefix("SenseTime/")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DeformableDetrConfig(**{**PRESETS[key], **overrides})
