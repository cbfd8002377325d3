"""`DeformableDetrConfig` against transformers' own `DeformableDetrConfig`: the forms it
writes are read, and what we write it accepts."""

from __future__ import annotations

import pytest

from deformable_detr_jax import DeformableDetrConfig
from tests import hf_reference as ref
from tests.random_models import BASIC_18, SMALL, TINY_BOTTLENECK, small_config

pytestmark = pytest.mark.torch


def test_hub_single_scale_dc5_reads_dilation():
    from transformers import DeformableDetrConfig as HFConfig

    hf = HFConfig(
        use_timm_backbone=True, backbone="resnet50", dilation=True, num_feature_levels=1
    ).to_dict()
    config = DeformableDetrConfig.from_hf(hf)
    assert config.dilation and config.num_feature_levels == 1
    assert config.backbone_out_stages == (3,)


@pytest.mark.parametrize("variant", sorted(ref.VARIANTS))
def test_transformers5_round_trip(variant):
    from transformers import DeformableDetrConfig as HFConfig

    hf = ref.hf_config(num_labels=7, **ref.VARIANTS[variant])
    config = DeformableDetrConfig.from_hf(hf.to_dict())
    assert config.num_labels == 7
    assert config.backbone_depth == 50
    for field, value in ref.VARIANTS[variant].items():
        assert getattr(config, field) == value
    back = HFConfig(**config.to_hf())  # transformers accepts what we write
    assert back.to_dict()["backbone_config"]["depths"] == [3, 4, 6, 3]
    assert DeformableDetrConfig.from_hf(back.to_dict()) == config


def test_basic_block_backbone_from_transformers():
    hf = ref.hf_config(depth_layout=((2, 2, 2, 2), "basic", (64, 128, 256, 512)))
    config = DeformableDetrConfig.from_hf(hf.to_dict())
    assert config.backbone_layer_type == "basic" and config.backbone_depth == 18


@pytest.mark.parametrize(
    "depth_layout, fields",
    [
        (TINY_BOTTLENECK, {}),
        (BASIC_18, {"position_embedding_type": "learned"}),
        (TINY_BOTTLENECK, {"num_feature_levels": 5, "with_box_refine": True, "two_stage": True}),
        (TINY_BOTTLENECK, {"num_feature_levels": 1, "activation_function": "gelu"}),
    ],
)
def test_small_config_is_the_transformers_small_config(depth_layout, fields):
    """The torch-free tests' configs are the ones the parity tests build in transformers."""
    hf = ref.hf_config(depth_layout=depth_layout, **{**SMALL, **fields})
    assert small_config(depth_layout, **fields) == DeformableDetrConfig.from_hf(hf.to_dict())
