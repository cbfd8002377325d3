"""Small variants against transformers (ResNet basic blocks, learned positions, 1/3/5 levels,
odd heads/points, gelu), and the exported state dict loading back into transformers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import DeformableDetrConfig, convert_state_dict, export_state_dict
from tests import hf_reference as ref
from tests.random_models import BASIC_18, SMALL, TINY_BOTTLENECK

pytestmark = pytest.mark.torch


def _small(depth_layout=TINY_BOTTLENECK, **kwargs):
    return ref.hf_config(depth_layout=depth_layout, **{**SMALL, **kwargs})


@pytest.mark.parametrize(
    "depth_layout, kwargs",
    [
        (BASIC_18, {"position_embedding_type": "learned"}),
        (BASIC_18, {"num_feature_levels": 5, "with_box_refine": True}),
        (TINY_BOTTLENECK, {"num_feature_levels": 3, "activation_function": "gelu"}),
        (TINY_BOTTLENECK, {"num_feature_levels": 1, "with_box_refine": True}),
    ],
)
def test_small_variant_parity(depth_layout, kwargs):
    """ResNet basic blocks, learned positions, 1/2/5 levels, odd heads/points, gelu."""
    import torch

    hf_cfg = _small(depth_layout, **kwargs)
    model = ref.random_hf_model(hf_cfg, seed=11)
    pixels, mask = ref.two_images(seed=4, sizes=((130, 170), (97, 161)))
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask))
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    ours = convert_state_dict(ref.state_dict_numpy(model), config)(
        jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask)
    )
    for name in ("logits", "pred_boxes", "intermediate_reference_points"):
        np.testing.assert_allclose(
            np.asarray(getattr(ours, name)),
            getattr(theirs, name).numpy(),
            rtol=1e-4,
            atol=1e-4,
            err_msg=name,
        )


def test_export_inverts_convert():
    import torch

    hf_cfg = _small(with_box_refine=True, two_stage=True)
    model = ref.random_hf_model(hf_cfg, seed=5)
    sd = ref.state_dict_numpy(model)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    exported = export_state_dict(convert_state_dict(sd, config))
    assert set(exported) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()})


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_jitted_model_as_transformers_initialises_it(variant, monkeypatch):
    """transformers' own initialisation (zero offset kernels, grid biases: samples on pixel
    centres), a padded batch: our model jitted, as users run it, against the float64 torch
    model, float64 to 1e-9 and float32 to 1e-4 (issue 24: the jitted float32 two-stage model
    was off by up to 1.1 in logits on jaxlib 0.12.1)."""
    import jax
    import torch
    from flax import nnx
    from transformers import DeformableDetrForObjectDetection as HFModel
    from transformers.models.deformable_detr import modeling_deformable_detr as hf_modeling

    from tests.test_parity import torch_proposal_pos_embed

    # transformers' proposal position embedding is float32 even in a float64 model (see
    # tests/test_parity.py::test_float64_parity): the float64 formula, as ours
    monkeypatch.setattr(
        hf_modeling.DeformableDetrModel,
        "get_proposal_pos_embed",
        lambda self, proposals: torch_proposal_pos_embed(proposals, self.config.d_model),
    )
    # the case: five levels, basic blocks, a padded batch
    hf_cfg = _small(BASIC_18, num_feature_levels=5, **ref.VARIANTS[variant])
    torch.manual_seed(21)
    model = HFModel(hf_cfg).eval().double()
    pixels, mask = ref.two_images(seed=6, sizes=((160, 224), (136, 184)))
    with torch.no_grad():
        theirs = model(
            pixel_values=torch.from_numpy(pixels).double(), pixel_mask=torch.from_numpy(mask)
        )
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    state_dict = ref.state_dict_numpy(model)

    @nnx.jit
    def forward(ours, pixels, mask):
        out = ours(pixels, mask)
        return out.logits, out.pred_boxes

    nhwc, mask = pixels.transpose(0, 2, 3, 1), jnp.asarray(mask, bool)
    with jax.enable_x64(True):
        got64 = forward(
            convert_state_dict(state_dict, config, dtype=jnp.float64),
            jnp.asarray(nhwc, jnp.float64),
            mask,
        )
    got32 = forward(convert_state_dict(state_dict, config), jnp.asarray(nhwc), mask)
    for name, ours64, ours32, want in zip(
        ("logits", "boxes"), got64, got32, (theirs.logits, theirs.pred_boxes)
    ):
        want = want.numpy()
        np.testing.assert_allclose(
            np.asarray(ours64), want, rtol=1e-9, atol=1e-9, err_msg=f"jitted float64 {name}"
        )
        np.testing.assert_allclose(
            np.asarray(ours32), want, rtol=1e-4, atol=1e-4, err_msg=f"jitted float32 {name}"
        )
