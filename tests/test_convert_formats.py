"""Key maps hub <-> transformers <-> original, variant inference, config checks.

The oracles are real module trees: tiny transformers `DeformableDetrForObjectDetection`
models (HF ResNet backbone) for the four published variants, and a skeleton of the
fundamentalvision `DeformableDETR` whose attributes are copied from its `__init__`s
(`models/deformable_detr.py`, `deformable_transformer.py`, `backbone.py`, torchvision's
ResNet with FrozenBatchNorm2d); torch's own `state_dict()` then gives the original keys,
shared head copies included. Both trees are filled with random values.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest

from deformable_detr_jax.convert import (
    CheckpointFormatError,
    CheckpointKeyError,
    ConfigMismatchError,
    check_config_against_variant,
    config_fields,
    detect_format,
    fill_tied_heads,
    hub_to_original,
    hub_to_transformers,
    infer_variant,
    original_to_hub,
    read_safetensors,
    to_hub,
    to_transformers,
    transformers_to_hub,
    variant_from_original_args,
)

TINY = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=48,
    decoder_ffn_dim=40,
    num_queries=10,
    num_labels=7,
    encoder_n_points=2,
    decoder_n_points=3,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
)
BACKBONE = dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[2, 1, 1, 1])
VARIANTS = {
    "plain": dict(num_feature_levels=4, with_box_refine=False, two_stage=False),
    "box_refine": dict(num_feature_levels=4, with_box_refine=True, two_stage=False),
    "two_stage": dict(num_feature_levels=4, with_box_refine=True, two_stage=True),
    "single_scale": dict(num_feature_levels=1, with_box_refine=False, two_stage=False),
}

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    """(variant name, HF state dict, original state dict, HF model, saved-file state dict)."""
    import torch

    from tests.torch_module_trees import OriginalDeformableDETR, hf_model, randomize

    name = request.param
    torch.manual_seed(0)
    hf = hf_model(name)
    hf_sd = randomize(hf, 1)
    original = OriginalDeformableDETR(**VARIANTS[name])
    original_sd = randomize(original, 2)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    saved = read_safetensors(folder / "model.safetensors")
    return name, hf_sd, original_sd, hf, saved


def _shapes(sd):
    return {k: np.shape(v) for k, v in sd.items()}


def _assert_equal_dicts(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


_HUB_BACKBONE = re.compile(
    r"model\.backbone\.conv_encoder\.model\.(conv1|bn1|layer[1-4]\.\d+\."
    r"(conv[1-3]|bn[1-3]|downsample\.[01]))\.(weight|bias|running_mean|running_var)"
)


def test_detect_format(models):
    _, hf_sd, original_sd, _, saved = models
    assert detect_format(hf_sd) == "transformers"
    assert detect_format(saved) == "transformers"  # save_pretrained's mixed layout
    assert detect_format(transformers_to_hub(hf_sd)) == "hub"
    assert detect_format(original_sd) == "original"
    with pytest.raises(CheckpointFormatError, match="not Deformable DETR"):
        detect_format(["encoder.layer.0.attention.self.query.weight", "pooler.dense.bias"])


def test_hub_naming_is_timm_and_transformers_4(models):
    _, hf_sd, original_sd, _, _ = models
    hub = transformers_to_hub(hf_sd)
    backbone = {k for k in hub if k.startswith("model.backbone.")}
    assert backbone and all(_HUB_BACKBONE.fullmatch(k) for k in backbone), sorted(backbone)[:5]
    assert "model.backbone.conv_encoder.model.layer1.0.downsample.0.weight" in hub
    assert "model.backbone.conv_encoder.model.bn1.running_mean" in hub
    # The original backbone body keys are the hub ones under another prefix.
    body = {k.removeprefix("backbone.0.body.") for k in original_sd if k.startswith("backbone.0.")}
    assert body == {k.removeprefix("model.backbone.conv_encoder.model.") for k in backbone}
    assert "model.decoder.layers.1.self_attn.out_proj.weight" in hub
    assert "model.encoder.layers.0.fc1.weight" in hub
    assert not [k for k in hub if ".o_proj." in k or ".mlp." in k]


def test_transformers_hub_round_trip(models):
    _, hf_sd, _, _, _ = models
    hub = transformers_to_hub(hf_sd)
    assert len(hub) == len(hf_sd)
    back = hub_to_transformers(hub)
    assert set(back) == set(hf_sd)
    for key in hf_sd:
        assert back[key] is hf_sd[key]  # a pure rename
    assert transformers_to_hub(hub) == hub  # idempotent on hub names
    assert to_transformers(hf_sd).keys() == hf_sd.keys()


def test_saved_layout_and_tied_heads(models):
    name, hf_sd, _, _, saved = models
    hub_full = transformers_to_hub(hf_sd)
    hub_saved = transformers_to_hub(saved)
    assert set(hub_saved) < set(hub_full)  # save_pretrained drops tied copies
    assert set(hub_to_transformers(hub_saved, saved_layout=True)) == set(saved)
    _assert_equal_dicts(fill_tied_heads(hub_saved, infer_variant(saved)), hub_full)


def test_original_to_hub_matches_transformers(models):
    import torch

    name, hf_sd, original_sd, hf, _ = models
    hub = original_to_hub(original_sd)
    assert _shapes(hub) == _shapes(transformers_to_hub(hf_sd))
    # Strict load into transformers: every key and shape exactly right.
    weights = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in to_transformers(original_sd).items()
    }
    hf.load_state_dict(weights, strict=True)
    loaded = hf.state_dict()
    for layer in range(TINY["decoder_layers"]):
        fused = original_sd[f"transformer.decoder.layers.{layer}.self_attn.in_proj_weight"]
        d = TINY["d_model"]
        for i, part in enumerate("qkv"):
            key = f"model.decoder.layers.{layer}.self_attn.{part}_proj.weight"
            np.testing.assert_array_equal(loaded[key].numpy(), fused[i * d : (i + 1) * d])
    np.testing.assert_array_equal(
        loaded["model.decoder.layers.0.encoder_attn_layer_norm.weight"].numpy(),
        original_sd["transformer.decoder.layers.0.norm1.weight"],
    )
    np.testing.assert_array_equal(
        loaded["model.decoder.layers.0.self_attn_layer_norm.weight"].numpy(),
        original_sd["transformer.decoder.layers.0.norm2.weight"],
    )
    np.testing.assert_array_equal(
        loaded["model.encoder.layers.1.final_layer_norm.bias"].numpy(),
        original_sd["transformer.encoder.layers.1.norm2.bias"],
    )


def test_original_round_trips(models):
    _, hf_sd, original_sd, _, saved = models
    _assert_equal_dicts(hub_to_original(original_to_hub(original_sd)), original_sd)
    exported = hub_to_original(transformers_to_hub(hf_sd))
    assert _shapes(exported) == _shapes(original_sd)
    _assert_equal_dicts(original_to_hub(exported), transformers_to_hub(hf_sd))
    # From a save_pretrained file (tied copies absent): every original copy is written.
    assert _shapes(hub_to_original(saved)) == _shapes(original_sd)


def test_infer_variant_from_every_naming(models):
    name, hf_sd, original_sd, _, saved = models
    expected = {
        **{k: TINY[k] for k in TINY if k != "num_queries"},
        **VARIANTS[name],
        "position_embedding_type": "sine",
        "backbone_layer_type": "bottleneck",
        "backbone_depths": tuple(BACKBONE["depths"]),
        "backbone_hidden_sizes": tuple(BACKBONE["hidden_sizes"]),
        "backbone_embedding_size": BACKBONE["embedding_size"],
    }
    if not VARIANTS[name]["two_stage"]:
        expected["num_queries"] = TINY["num_queries"]
    for state_dict in (hf_sd, original_sd, saved, transformers_to_hub(hf_sd)):
        assert infer_variant(state_dict) == expected


def test_config_check(models):
    name, hf_sd, _, hf, _ = models
    variant = infer_variant(hf_sd)
    check_config_against_variant(hf.config.to_dict(), variant)  # transformers config.json
    check_config_against_variant(variant, variant)
    # Other heads with the same heads*points are consistent with the weights.
    check_config_against_variant({"encoder_attention_heads": 4, "encoder_n_points": 4}, variant)
    wrong = {
        **hf.config.to_dict(),
        "id2label": {str(i): f"c{i}" for i in range(80)},
        "with_box_refine": not variant["with_box_refine"],
        "decoder_layers": 6,
        "decoder_n_points": 4,
    }
    with pytest.raises(ConfigMismatchError) as info:
        check_config_against_variant(wrong, variant)
    message = str(info.value)
    assert "4 setting(s)" in message
    for expected in (
        "num_labels: config says 80, the weights have 7",
        "with_box_refine",
        "decoder_layers: config says 6",
        "decoder attention",
    ):
        assert expected in message


def test_config_check_with_package_config(models):
    from deformable_detr_jax.config import DeformableDetrConfig as JaxConfig

    _, hf_sd, _, _, _ = models
    with pytest.raises(ConfigMismatchError, match="d_model: config says 256, the weights have 64"):
        check_config_against_variant(JaxConfig(), infer_variant(hf_sd))
    assert config_fields(JaxConfig())["backbone_depths"] == (3, 4, 6, 3)


def test_heads_assumption():
    from tests.torch_module_trees import hf_model

    hf_sd = {k: v.numpy() for k, v in hf_model("plain").state_dict().items()}
    variant = infer_variant(hf_sd, num_heads=4)
    assert (variant["encoder_attention_heads"], variant["encoder_n_points"]) == (4, 4)
    assert (variant["decoder_attention_heads"], variant["decoder_n_points"]) == (4, 6)
    with pytest.raises(ConfigMismatchError, match="heads"):
        infer_variant(hf_sd, num_heads=5)


def test_box_refinement_without_decoder_copies():
    """Files that dropped the model.decoder.bbox_embed copies: per-layer heads differ."""
    import torch

    from tests.torch_module_trees import hf_model, randomize

    torch.manual_seed(0)
    hub = transformers_to_hub(randomize(hf_model("box_refine"), 3))
    stripped = {k: v for k, v in hub.items() if not k.startswith("model.decoder.bbox_embed.")}
    assert infer_variant(stripped)["with_box_refine"]
    shared = {k: v for k, v in stripped.items() if not k.startswith("bbox_embed.1.")}
    shared.update(
        {"bbox_embed.1." + k[13:]: v for k, v in shared.items() if k.startswith("bbox_embed.0.")}
    )
    assert not infer_variant(shared)["with_box_refine"]


def test_num_batches_tracked_dropped(models):
    _, hf_sd, original_sd, _, _ = models
    extra = "model.backbone.conv_encoder.model.bn1.num_batches_tracked"
    assert extra not in transformers_to_hub({**transformers_to_hub(hf_sd), extra: np.array(3)})
    counters = {"backbone.0.body.layer1.0.bn1.num_batches_tracked": np.array(3)}
    assert (
        original_to_hub({**original_sd, **counters}).keys() == original_to_hub(original_sd).keys()
    )


def test_original_key_errors_list_everything(models):
    _, _, original_sd, _, _ = models
    bad = dict(original_sd)
    bad["transformer.decoder.layers.0.self_attn.in_proj_weight"] = np.ones((10, 64), np.float32)
    bad["detr.class_embed.weight"] = np.ones(3)
    bad["transformer.decoder.layers.0.extra.weight"] = np.ones(3)
    with pytest.raises(CheckpointKeyError) as info:
        original_to_hub(bad)
    error = info.value
    assert error.unexpected == (
        "detr.class_embed.weight",
        "transformer.decoder.layers.0.extra.weight",
    )
    assert len(error.mis_shaped) == 1 and "in_proj_weight: (10, 64)" in error.mis_shaped[0]
    assert "2 key(s) unexpected" in str(error) and "detr.class_embed.weight" in str(error)


def test_export_key_errors(models):
    _, hf_sd, _, _, _ = models
    hub = transformers_to_hub(hf_sd)
    del hub["model.decoder.layers.1.self_attn.k_proj.bias"]
    hub["model.decoder.layers.0.mystery.weight"] = np.ones(2)
    with pytest.raises(CheckpointKeyError) as info:
        hub_to_original(hub)
    assert info.value.missing == ("model.decoder.layers.1.self_attn.k_proj.bias",)
    assert "model.decoder.layers.0.mystery.weight" in info.value.unexpected


def test_infer_variant_missing_keys(models):
    _, hf_sd, _, _, _ = models
    hub = {k: v for k, v in transformers_to_hub(hf_sd).items() if "level_embed" not in k}
    hub = {k: v for k, v in hub.items() if not k.startswith("model.encoder.")}
    with pytest.raises(CheckpointKeyError, match="model.level_embed") as info:
        infer_variant(hub)
    assert "model.encoder.layers.0.fc1.weight" in info.value.missing


def test_variant_from_original_args(models):
    name, _, original_sd, _, _ = models
    args = argparse.Namespace(
        hidden_dim=TINY["d_model"],
        nheads=8,
        enc_layers=TINY["encoder_layers"],
        dec_layers=TINY["decoder_layers"],
        dim_feedforward=48,
        enc_n_points=2,
        dec_n_points=3,
        num_queries=TINY["num_queries"],
        dilation=True,
        position_embedding="sine",
        backbone="resnet50",
        lr=2e-4,
        **VARIANTS[name],
    )
    fields = variant_from_original_args(args)
    assert fields["dilation"] is True and fields["backbone_depths"] == (3, 4, 6, 3)
    assert fields["two_stage_num_proposals"] == TINY["num_queries"]
    variant = infer_variant(original_sd)
    # The skeleton's decoder FFN (40) and ResNet differ from these args: both reported.
    with pytest.raises(ConfigMismatchError) as info:
        check_config_against_variant(fields, variant)
    assert "decoder_ffn_dim: config says 48, the weights have 40" in str(info.value)
    assert "backbone_depths" in str(info.value)
    assert "encoder_ffn_dim" not in str(info.value)


def test_to_hub_dispatch(models):
    _, hf_sd, original_sd, _, saved = models
    want = original_to_hub(original_sd)
    assert to_hub(original_sd).keys() == want.keys()
    assert to_hub(hf_sd).keys() == transformers_to_hub(hf_sd).keys()
    assert set(to_hub(saved)) <= set(want)
