"""ConvNeXt and Swin backbones without torch: their config fields and transformers' config.json
form, the bad configs, feature map sizes at image sizes no multiple of the patch or window,
drop path, and the architecture read back off the exported weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import DeformableDetrConfig
from deformable_detr_jax.convert import infer_variant
from deformable_detr_jax.modeling.stochastic_depth import drop_path
from tests.random_models import SMALL, drawn_model, random_state_dict, small_config

CONVNEXT = dict(
    backbone_type="convnext",
    backbone_depths=(1, 2, 1, 1),
    backbone_hidden_sizes=(8, 16, 24, 32),
    backbone_patch_size=4,
)
SWIN = dict(
    backbone_type="swin",
    backbone_depths=(1, 2, 1, 1),
    backbone_hidden_sizes=(8, 16, 32, 64),
    backbone_num_heads=(1, 2, 2, 4),
    backbone_window_size=5,
)


def test_config_json_round_trip():
    for config in (
        DeformableDetrConfig.with_convnext(),
        DeformableDetrConfig.with_swin(two_stage=True, with_box_refine=True),
        DeformableDetrConfig(**SWIN, num_feature_levels=5, backbone_out_indices=(1, 2, 3, 4)),
        DeformableDetrConfig(**CONVNEXT, num_feature_levels=1, backbone_out_indices=(3,)),
    ):
        assert DeformableDetrConfig.from_hf(config.to_hf()) == config


def test_config_json_in_transformers_names():
    hf = DeformableDetrConfig.with_swin().to_hf()["backbone_config"]
    assert hf["model_type"] == "swin"
    assert (hf["embed_dim"], hf["depths"], hf["num_heads"]) == (96, [2, 2, 6, 2], [3, 6, 12, 24])
    assert (hf["window_size"], hf["patch_size"], hf["drop_path_rate"]) == (7, 4, 0.1)
    assert hf["out_features"] == ["stage2", "stage3", "stage4"] and hf["out_indices"] == [2, 3, 4]
    hf = DeformableDetrConfig(**CONVNEXT, num_feature_levels=1).to_hf()["backbone_config"]
    assert hf["model_type"] == "convnext" and hf["hidden_sizes"] == [8, 16, 24, 32]
    assert hf["out_features"] == ["stage4"] and hf["layer_scale_init_value"] == 1e-6
    # a transformers default: no out_features means the last stage alone
    config = DeformableDetrConfig.from_hf(
        {
            "use_timm_backbone": False,
            "num_feature_levels": 4,
            "backbone_config": {"model_type": "convnext"},
        }
    )
    assert config.backbone_out_stages == (3,) and config.backbone_hidden_sizes == (
        96,
        192,
        384,
        768,
    )


def test_resnet_config_json_unchanged():
    """The ResNet's config.json has no field of the new backbones."""
    hf = DeformableDetrConfig().to_hf()
    assert sorted(hf["backbone_config"]) == sorted(
        [
            "model_type",
            "num_channels",
            "embedding_size",
            "hidden_sizes",
            "depths",
            "layer_type",
            "hidden_act",
            "downsample_in_first_stage",
            "downsample_in_bottleneck",
            "out_features",
            "out_indices",
        ]
    )
    assert not [k for k in hf if k.startswith("backbone_") and k != "backbone_config"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"backbone_type": "vit"}, "backbone_type must be one of"),
        ({**SWIN, "backbone_hidden_sizes": (8, 16, 24, 32)}, "embed_dim \\* 2\\*\\*stage"),
        ({**SWIN, "backbone_num_heads": (3, 2, 2, 4)}, "backbone_num_heads"),
        ({**SWIN, "backbone_num_heads": (1, 2)}, "backbone_num_heads"),
        ({**CONVNEXT, "backbone_hidden_sizes": (8, 16)}, "one positive width per stage"),
        ({**CONVNEXT, "backbone_out_indices": (0, 1)}, "backbone_out_indices"),
        ({**CONVNEXT, "backbone_out_indices": (3, 2)}, "backbone_out_indices"),
        ({**CONVNEXT, "backbone_out_indices": (1, 2, 3, 4), "num_feature_levels": 3}, "at most"),
        ({**CONVNEXT, "dilation": True}, "dilation"),
        ({**CONVNEXT, "backbone_drop_path_rate": 1.0}, "backbone_drop_path_rate"),
        ({"backbone_out_indices": (2, 3, 4)}, "the ResNet's stages follow"),
    ],
)
def test_bad_backbone_config(fields, message):
    with pytest.raises(ValueError, match=message):
        DeformableDetrConfig(**fields)


@pytest.mark.parametrize(
    "backbone, message",
    [
        ({"model_type": "vit"}, "'vit' is not supported; only 'resnet'.*'convnext' and 'swin'"),
        ({"model_type": "swin", "use_absolute_embeddings": True}, "use_absolute_embeddings"),
        ({"model_type": "swin", "qkv_bias": False}, "qkv_bias"),
        ({"model_type": "convnext", "hidden_act": "relu"}, "hidden_act='relu'"),
        ({"model_type": "convnext", "out_features": ["stem", "stage4"]}, "stem"),
        ({"model_type": "convnext", "out_features": ["stage9"]}, "stage9"),
        ({"model_type": "convnext", "num_stages": 3}, "num_stages=3"),
    ],
)
def test_bad_backbone_config_json(backbone, message):
    with pytest.raises(ValueError, match=message):
        DeformableDetrConfig.from_hf({"use_timm_backbone": False, "backbone_config": backbone})


@pytest.mark.parametrize(
    "fields, levels, sizes",
    [
        # floor(67 / 4) = 16, floor(93 / 4) = 23, halved with floor
        (CONVNEXT, 4, [(8, 11), (4, 5), (2, 2)]),
        # ceil(67 / 4) = 17, ceil(93 / 4) = 24, halved with ceil
        (SWIN, 4, [(9, 12), (5, 6), (3, 3)]),
        ({**SWIN, "backbone_out_indices": (1, 2, 3, 4)}, 5, [(17, 24), (9, 12), (5, 6), (3, 3)]),
        ({**CONVNEXT, "backbone_out_indices": (1, 3)}, 4, [(16, 23), (4, 5)]),
    ],
)
def test_feature_map_sizes(fields, levels, sizes):
    """Shapes only: traced with `eval_shape` (nothing compiled or run)."""
    from deformable_detr_jax.modeling import DeformableDetrForObjectDetection

    config = DeformableDetrConfig(**{**SMALL, **fields, "num_feature_levels": levels})
    model = nnx.eval_shape(lambda: DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(3)))
    pixels = jax.ShapeDtypeStruct((2, 67, 93, 3), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 67, 93), jnp.bool_)
    features, out = nnx.eval_shape(
        lambda m, x, k: (m.model.backbone(x, k), m(x, k)), model, pixels, mask
    )
    out_sizes = [f.shape[1:3] for f, _ in features]
    assert out_sizes == sizes
    assert [k.shape[1:] for _, k in features] == sizes
    assert [f.shape[-1] for f, _ in features] == [
        fields["backbone_hidden_sizes"][s] for s in config.backbone_out_stages
    ]
    assert out.logits.shape == (2, SMALL["num_queries"], SMALL["num_labels"])
    assert out.pred_boxes.shape == (2, SMALL["num_queries"], 4)


def test_drop_path_is_per_sample_and_only_in_training():
    layer = drop_path(0.5, 4, nnx.Rngs(dropout=1))
    x = jnp.ones((64, 3, 3, 2))
    y = np.asarray(layer(x, deterministic=False))
    per_sample = y.reshape(64, -1)
    assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
    assert set(np.unique(per_sample)) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / 0.5
    np.testing.assert_array_equal(np.asarray(layer(x, deterministic=True)), np.asarray(x))
    assert drop_path(0.0, 4, nnx.Rngs(dropout=1)) is None


@pytest.mark.parametrize("fields", [CONVNEXT, SWIN])
def test_drop_path_in_the_model(fields):
    config = DeformableDetrConfig(
        **{**SMALL, **fields, "backbone_drop_path_rate": 0.5, "dropout": 0.0}
    )
    model = drawn_model(config, seed=4)
    pixels = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    evaluate = nnx.jit(lambda m, x: m(x).logits)
    eval_a, eval_b = (np.asarray(evaluate(model, pixels)) for _ in range(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    train = np.asarray(nnx.jit(lambda m, x: m(x, deterministic=False).logits)(model, pixels))
    assert np.abs(train - eval_a).max() > 1e-3


@pytest.mark.parametrize(
    "fields", [CONVNEXT, SWIN, {**SWIN, "backbone_mlp_ratio": 2.0, "backbone_out_indices": (1, 4)}]
)
def test_variant_read_off_the_weights(fields):
    """The backbone fields `infer_variant` reads off exported weights are the config's."""
    config = DeformableDetrConfig(**{**SMALL, **fields})
    weights = random_state_dict(config, seed=5)
    variant = infer_variant(weights, num_heads=SMALL["decoder_attention_heads"])
    for name in (
        "backbone_type",
        "backbone_depths",
        "backbone_hidden_sizes",
        "backbone_out_indices",
    ):
        assert variant[name] == getattr(config, name), name
    if config.backbone_type == "swin":
        assert variant["backbone_num_heads"] == config.backbone_num_heads
        assert variant["backbone_window_size"] == config.backbone_window_size
        assert variant["backbone_mlp_ratio"] == config.backbone_mlp_ratio
    assert variant["backbone_patch_size"] == config.backbone_patch_size


def test_convnext_image_too_small():
    config = DeformableDetrConfig(**{**SMALL, **CONVNEXT, "backbone_patch_size": 8})
    model = drawn_model(config, seed=7)
    with pytest.raises(ValueError, match="at least 64"):
        model(jnp.ones((1, 48, 96, 3)))


@pytest.mark.parametrize("fields", [CONVNEXT, SWIN])
def test_jitted_training_gradients_reach_the_backbone(fields):
    """Jitted, with drop path (`deterministic=False`, as training runs the model): the gradients
    of every backbone parameter are finite and non-zero, but for Swin's unused final norm
    (values are checked against transformers in tests/test_backbones_vs_transformers.py)."""
    from deformable_detr_jax.modeling.backbone import DeformableDetrConvEncoder

    config = DeformableDetrConfig(**{**SMALL, **fields, "backbone_drop_path_rate": 0.2})
    encoder = DeformableDetrConvEncoder(config, rngs=nnx.Rngs(9))
    pixels = jax.random.normal(jax.random.key(2), (2, 64, 72, 3))
    mask = jnp.ones((2, 64, 72), bool).at[0, :, 50:].set(False)

    def loss(m, x, k):
        return sum(jnp.sum(f * jnp.cos(f)) for f, _ in m(x, k, deterministic=False))

    grads = nnx.jit(nnx.grad(loss))(encoder, pixels, mask)
    flat = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert all(np.isfinite(g).all() for g in flat.values())
    zero = sorted(name for name, g in flat.items() if not g.any())
    expected = ["model.swin.layernorm.bias", "model.swin.layernorm.scale"]
    assert zero == (expected if fields is SWIN else [])


def test_no_original_naming_for_these_backbones():
    from deformable_detr_jax.convert import CheckpointFormatError, hub_to_original

    weights = random_state_dict(DeformableDetrConfig(**{**SMALL, **SWIN}), seed=10)
    with pytest.raises(CheckpointFormatError, match="only ResNet backbones, this model's is swin"):
        hub_to_original(weights)


def test_resnet_imagenet_weights_still_load(tmp_path):
    """A timm-named ResNet file (the hub's backbone keys without their prefix) still fills every
    ResNet backbone weight through `model.backbone_weights`."""
    from safetensors.numpy import save_file

    from deformable_detr_jax.convert.formats import HUB_BACKBONE_PREFIX, to_hub
    from deformable_detr_jax.convert.state_dict import (
        abstract_model,
        nnx_path_to_key,
        to_torch_layout,
    )
    from deformable_detr_jax.training.initialization import backbone_weights_from_resnet

    abstract = abstract_model(small_config())  # traced, not built: the names and shapes
    rng = np.random.default_rng(11)
    arrays = {
        ".".join(map(str, p)): rng.standard_normal(v.shape).astype(np.float32)
        for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Any(nnx.Param, nnx.BatchStat)))
        if p[:2] == ("model", "backbone")
    }
    hub = to_hub(
        {
            nnx_path_to_key(tuple(name.split("."))): to_torch_layout(name.rsplit(".")[-1], a)
            for name, a in arrays.items()
        }
    )
    timm = {
        k[len(HUB_BACKBONE_PREFIX) :]: np.ascontiguousarray(v)  # safetensors writes the buffer
        for k, v in hub.items()
        if k.startswith(HUB_BACKBONE_PREFIX)
    }
    assert "conv1.weight" in timm and "layer1.0.conv1.weight" in timm
    save_file({**timm, "fc.weight": np.ones((3, 2), np.float32)}, tmp_path / "resnet.safetensors")
    shapes = {name: a.shape for name, a in arrays.items()}
    loaded = backbone_weights_from_resnet(tmp_path / "resnet.safetensors", shapes)
    backbone = [name for name in arrays if name.startswith("model.backbone.")]
    assert sorted(loaded) == sorted(backbone)
    for name in backbone:
        np.testing.assert_array_equal(loaded[name], arrays[name], err_msg=name)
