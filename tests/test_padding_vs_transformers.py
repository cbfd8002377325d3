"""The unpadded runs that tests/test_padding.py takes as its oracle are transformers' runs on
the same random weights: so a padded image equals transformers on the image alone."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import DeformableDetrConfig, convert_state_dict
from tests import hf_reference as ref
from tests.random_models import SMALL
from tests.test_padding import CONFIGS, padding_images, scored_outputs

pytestmark = pytest.mark.torch

TRANSFORMERS_TOL = 1e-4  # as tests/test_parity.py


@pytest.mark.parametrize("depth_layout, kwargs", CONFIGS)
def test_unpadded_image_equals_transformers(depth_layout, kwargs):
    import torch

    hf_cfg = ref.hf_config(depth_layout=depth_layout, **{**SMALL, **kwargs})
    hf_model = ref.random_hf_model(hf_cfg, seed=21)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    model = convert_state_dict(ref.state_dict_numpy(hf_model), config)
    for image in padding_images(seed=5):
        ours = scored_outputs(model(jnp.asarray(image[None]), None), 0)
        with torch.no_grad():
            out = hf_model(pixel_values=torch.from_numpy(image.transpose(2, 0, 1)[None].copy()))
        theirs = {
            "logits": torch.sigmoid(out.logits)[0].numpy(),
            "pred_boxes": out.pred_boxes[0].numpy(),
        }
        for name, value in theirs.items():
            np.testing.assert_allclose(
                ours[name], value, rtol=0, atol=TRANSFORMERS_TOL, err_msg=name
            )
