"""Parity of the JAX model with transformers' `DeformableDetrForObjectDetection`.

Full-size transformer (d_model 256, 6+6 layers, 8 heads, 4 levels, 4 points, 300 queries)
on a ResNet-50, random weights, two images of different sizes padded with a real mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import DeformableDetrConfig, convert_state_dict
from tests import hf_reference as ref

RTOL = ATOL = 1e-4
# one fixed seed per variant: the same random weights in every process and every run
SEEDS = {"plain": 101, "box_refine": 102, "single_scale": 103, "two_stage": 104}

pytestmark = pytest.mark.torch


def _torch_outputs(model, pixels, mask):
    import torch

    labels = [  # labels only make transformers return every layer's auxiliary outputs
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    ] * len(pixels)
    with torch.no_grad():
        out = model(
            pixel_values=torch.from_numpy(pixels),
            pixel_mask=torch.from_numpy(mask),
            labels=[
                {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in t.items()}
                for t in labels
            ],
        )
    return out


def _compare(jax_out, torch_out, rtol, atol, valid_tokens=None):
    """Compares every output; `valid_tokens (bs, len_v)` limits the encoder comparison.

    On padded positions the sine position embedding divides by a zero row count (as in
    the original), giving arguments near -3e6 whose float32 sin/cos differ between
    libraries. Those positions are masked out of every attention, so they never reach the
    detections; float64 runs compare them too.
    """
    import torch

    def check(name, ours, theirs):
        np.testing.assert_allclose(
            np.asarray(ours), theirs.detach().numpy(), rtol=rtol, atol=atol, err_msg=name
        )

    check("logits", jax_out.logits, torch_out.logits)
    check("pred_boxes", jax_out.pred_boxes, torch_out.pred_boxes)
    check("init_reference_points", jax_out.init_reference_points, torch_out.init_reference_points)
    check(
        "intermediate_hidden_states",
        jax_out.intermediate_hidden_states,
        torch_out.intermediate_hidden_states,
    )
    check(
        "intermediate_reference_points",
        jax_out.intermediate_reference_points,
        torch_out.intermediate_reference_points,
    )
    encoder_ours = np.asarray(jax_out.encoder_last_hidden_state)
    encoder_theirs = torch_out.encoder_last_hidden_state
    if valid_tokens is not None:
        encoder_ours = encoder_ours[valid_tokens]
        encoder_theirs = encoder_theirs[torch.from_numpy(valid_tokens)]
    check("encoder_last_hidden_state", encoder_ours, encoder_theirs)
    aux = torch_out.auxiliary_outputs
    assert len(aux) == jax_out.intermediate_logits.shape[1] - 1
    for i, layer in enumerate(aux):
        check(f"layer {i} logits", jax_out.intermediate_logits[:, i], layer["logits"])
        check(f"layer {i} boxes", jax_out.intermediate_boxes[:, i], layer["pred_boxes"])
    if torch_out.enc_outputs_class is not None:
        check("enc_outputs_class", jax_out.enc_outputs_class, torch_out.enc_outputs_class)
        check(
            "enc_outputs_coord_logits",
            jax_out.enc_outputs_coord_logits,
            torch_out.enc_outputs_coord_logits,
        )
    else:
        assert jax_out.enc_outputs_class is None


def _max_diff(jax_out, torch_out) -> float:
    return float(np.max(np.abs(np.asarray(jax_out.logits) - torch_out.logits.numpy())))


@pytest.mark.parametrize("variant", ["plain", "box_refine", "single_scale", "two_stage"])
def test_float32_parity(variant, record_property):
    hf_cfg = ref.hf_config(auxiliary_loss=True, **ref.VARIANTS[variant])
    model = ref.random_hf_model(hf_cfg, seed=SEEDS[variant])
    pixels, mask = ref.two_images(seed=1)
    torch_out = _torch_outputs(model, pixels, mask)

    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    ours = convert_state_dict(ref.state_dict_numpy(model), config)
    jax_out = ours(jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask))
    record_property("max_abs_logits_diff", _max_diff(jax_out, torch_out))
    valid = _valid_tokens(ours, mask)
    if variant == "two_stage":
        # float32 rounding can reorder near-tied proposal scores in the top-k; the
        # encoder side is compared here, the whole model in float64 below.
        np.testing.assert_allclose(
            np.asarray(jax_out.enc_outputs_class),
            torch_out.enc_outputs_class.numpy(),
            rtol=RTOL,
            atol=ATOL,
        )
        np.testing.assert_allclose(
            np.asarray(jax_out.encoder_last_hidden_state)[valid],
            torch_out.encoder_last_hidden_state.numpy()[valid],
            rtol=RTOL,
            atol=ATOL,
        )
        return
    _compare(jax_out, torch_out, RTOL, ATOL, valid)


def _valid_tokens(model, mask) -> np.ndarray:
    """`(bs, len_v)` True on flattened feature positions that are real pixels."""
    from deformable_detr_jax.modeling.backbone import downsample_mask

    shapes = _level_shapes(model.config, *mask.shape[1:])
    return np.concatenate(
        [
            np.asarray(downsample_mask(jnp.asarray(mask, bool), *s)).reshape(len(mask), -1)
            for s in shapes
        ],
        1,
    )


def _level_shapes(config, height, width):
    def down(x, times):  # stride-2 convs and pools with "same" padding: ceil(x / 2)
        for _ in range(times):
            x = (x - 1) // 2 + 1
        return x

    first = 3 if config.num_feature_levels > 1 else 5
    return [
        (down(height, first + i), down(width, first + i)) for i in range(config.num_feature_levels)
    ]


@pytest.mark.parametrize("variant", ["two_stage", "box_refine"])
def test_float64_parity(variant, monkeypatch):
    """Both sides in float64, `atol=1e-9`: no top-k tie can flip."""
    from transformers.models.deformable_detr import modeling_deformable_detr as hf_modeling

    from deformable_detr_jax.modeling.two_stage import proposal_pos_embed

    hf_cfg = ref.hf_config(auxiliary_loss=True, **ref.VARIANTS[variant])
    model = ref.random_hf_model(hf_cfg, seed=7).double()
    # transformers computes the proposal position embedding in float32 even for a float64
    # model (against fp16 overflow); the JAX model computes it in the input dtype when that
    # is wider. Give the oracle the same float64 formula so that 1e-9 is attainable.
    monkeypatch.setattr(
        hf_modeling.DeformableDetrModel,
        "get_proposal_pos_embed",
        lambda self, proposals: torch_proposal_pos_embed(proposals, self.config.d_model),
    )
    pixels, mask = ref.two_images(seed=2)
    torch_out = _torch_outputs(model, pixels.astype(np.float64), mask)

    with jax.enable_x64(True):
        config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
        ours = convert_state_dict(ref.state_dict_numpy(model), config, dtype=jnp.float64)
        jax_out = ours(jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float64), jnp.asarray(mask))
        assert jax_out.logits.dtype == jnp.float64
        _compare(jax_out, torch_out, rtol=1e-9, atol=1e-9)
    del proposal_pos_embed


def torch_proposal_pos_embed(proposals, d_model):
    """transformers' `get_proposal_pos_embed` without its float32 cast."""
    import math

    import torch

    num_pos_feats = d_model // 2
    dim_t = torch.arange(num_pos_feats, dtype=proposals.dtype)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = proposals.sigmoid() * (2 * math.pi)
    pos = pos[:, :, :, None] / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)


def test_hub_naming_gives_same_model():
    """A state dict with the hub files' timm-style backbone keys converts to the same model."""
    hf_cfg = ref.hf_config(**ref.VARIANTS["box_refine"])
    model = ref.random_hf_model(hf_cfg, seed=3)
    sd = ref.state_dict_numpy(model)
    hub = ref.to_hub_naming(sd)
    assert any(k.startswith("model.backbone.conv_encoder.model.layer1.0.conv1") for k in hub)
    assert any(".self_attn.out_proj." in k for k in hub)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    pixels, mask = ref.two_images(seed=3)
    x, m = jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask)
    a = convert_state_dict(sd, config)(x, m)
    b = convert_state_dict(hub, config)(x, m)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    torch_out = _torch_outputs(model, pixels, mask)
    np.testing.assert_allclose(
        np.asarray(b.pred_boxes), torch_out.pred_boxes.numpy(), rtol=RTOL, atol=ATOL
    )
