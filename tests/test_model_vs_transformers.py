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
        np.testing.assert_allclose(np.asarray(getattr(ours, name)),
                                   getattr(theirs, name).numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=name)  # fmt: skip


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
