"""`DeformableDetrConfig`: reading the hub's config.json form, presets, bad settings (the
configs transformers builds and reads back: tests/test_config_vs_transformers.py)."""

from __future__ import annotations

import json

import pytest

from deformable_detr_jax import PRESETS, DeformableDetrConfig, preset

# The shape of the hub's SenseTime/deformable-detr-with-box-refine-two-stage config.json.
HUB_TWO_STAGE = {
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["DeformableDetrForObjectDetection"],
    "attention_dropout": 0.0,
    "auxiliary_loss": False,
    "backbone": "resnet50",
    "bbox_cost": 5,
    "bbox_loss_coefficient": 5,
    "class_cost": 1,
    "d_model": 256,
    "decoder_attention_heads": 8,
    "decoder_ffn_dim": 1024,
    "decoder_layers": 6,
    "decoder_n_points": 4,
    "dice_loss_coefficient": 1,
    "dilation": False,
    "dropout": 0.1,
    "encoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "encoder_layerdrop": 0.0,
    "encoder_layers": 6,
    "encoder_n_points": 4,
    "eos_coefficient": 0.1,
    "focal_alpha": 0.25,
    "giou_cost": 2,
    "giou_loss_coefficient": 2,
    "id2label": {str(i): f"class{i}" for i in range(91)},
    "init_std": 0.02,
    "init_xavier_std": 1.0,
    "is_encoder_decoder": True,
    "mask_loss_coefficient": 1,
    "max_position_embeddings": 1024,
    "model_type": "deformable_detr",
    "num_feature_levels": 4,
    "num_queries": 300,
    "position_embedding_type": "sine",
    "two_stage": True,
    "two_stage_num_proposals": 300,
    "use_pretrained_backbone": True,
    "use_timm_backbone": True,
    "with_box_refine": True,
}


def test_from_hub_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HUB_TWO_STAGE))
    for source in (HUB_TWO_STAGE, path, tmp_path, str(path)):
        config = DeformableDetrConfig.from_hf(source)
        assert config.two_stage and config.with_box_refine
        assert config.num_labels == 91 and config.id2label_dict[90] == "class90"
        assert config.backbone_depth == 50
        assert config.num_decoder_predictions == 7


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_with_resnet(depth):
    assert DeformableDetrConfig.with_resnet(depth).backbone_depth == depth


def test_presets():
    assert set(PRESETS) >= {
        "deformable-detr",
        "deformable-detr-with-box-refine",
        "deformable-detr-with-box-refine-two-stage",
        "deformable-detr-single-scale",
    }
    assert preset("SenseTime/deformable-detr-with-box-refine-two-stage").two_stage
    assert preset("deformable-detr-single-scale-dc5").dilation
    assert preset("deformable-detr", num_labels=3).num_labels == 3
    with pytest.raises(ValueError, match="unknown preset"):
        preset("deformable-detr-large")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_feature_levels": 6}, "num_feature_levels"),
        ({"num_feature_levels": 0}, "num_feature_levels"),
        ({"num_feature_levels": 2}, "num_feature_levels"),
        ({"backbone_depths": (3, 4, 6)}, "backbone_depths"),
        ({"backbone_layer_type": "wide"}, "backbone_layer_type"),
        ({"two_stage": True}, "with_box_refine"),
        ({"d_model": 250}, "d_model"),
        ({"num_labels": 3, "id2label": {0: "a"}}, "id2label"),
        ({"position_embedding_type": "rope"}, "position_embedding_type"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeformableDetrConfig(**kwargs)


def test_unsupported_backbone_depth():
    with pytest.raises(ValueError, match="depth"):
        DeformableDetrConfig.with_resnet(152)
    with pytest.raises(ValueError, match="resnet"):
        DeformableDetrConfig.from_hf({**HUB_TWO_STAGE, "backbone": "swin_tiny"})


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DeformableDetrConfig.from_hf(tmp_path)
