"""The set criterion against transformers' `DeformableDetrForObjectDetectionLoss`: values and
gradients of every term, float32 and float64, with and without the auxiliary losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.criterion.loss import LossConfig
from tests.test_loss import COUNTS, DECODER_LAYERS, NUM_LABELS, jax_loss, loss_inputs

pytestmark = pytest.mark.torch


def _transformers_loss(x, auxiliary_loss, dtype):
    import torch
    from transformers import DeformableDetrConfig
    from transformers.loss.loss_deformable_detr import DeformableDetrForObjectDetectionLoss

    config = DeformableDetrConfig(
        num_labels=NUM_LABELS, auxiliary_loss=auxiliary_loss, decoder_layers=DECODER_LAYERS
    )
    # transformers stacks layers first: (decoder_layers, bs, num_queries, ...)
    outputs_class = torch.tensor(
        x["intermediate_logits"].transpose(1, 0, 2, 3), dtype=dtype, requires_grad=True
    )
    outputs_coord = torch.tensor(
        x["intermediate_boxes"].transpose(1, 0, 2, 3), dtype=dtype, requires_grad=True
    )
    logits = torch.tensor(x["intermediate_logits"][:, -1], dtype=dtype, requires_grad=True)
    pred_boxes = torch.tensor(x["intermediate_boxes"][:, -1], dtype=dtype, requires_grad=True)
    targets = [
        {
            "class_labels": torch.tensor(x["labels"][b, :n], dtype=torch.int64),
            "boxes": torch.tensor(x["boxes"][b, :n], dtype=dtype),
        }
        for b, n in enumerate(COUNTS)
    ]
    loss, loss_dict, _ = DeformableDetrForObjectDetectionLoss(
        logits, targets, "cpu", pred_boxes, config, outputs_class, outputs_coord
    )
    loss.backward()

    def grad(t):  # None when the tensor took no part (no auxiliary loss)
        return np.zeros(t.shape) if t.grad is None else t.grad.numpy()

    grads = (
        grad(logits),
        grad(pred_boxes),
        grad(outputs_class).transpose(1, 0, 2, 3),
        grad(outputs_coord).transpose(1, 0, 2, 3),
    )
    return float(loss.detach()), {k: float(v.detach()) for k, v in loss_dict.items()}, grads


@pytest.mark.parametrize("auxiliary_loss", [False, True])
@pytest.mark.parametrize("x64", [False, True])
def test_transformers_preset_equals_transformers_loss(auxiliary_loss, x64):
    import torch

    x = loss_inputs(seed=3 + 10 * auxiliary_loss + x64)
    torch_dtype = torch.float64 if x64 else torch.float32
    ref_loss, ref_dict, ref_grads = _transformers_loss(x, auxiliary_loss, torch_dtype)
    config = LossConfig.preset("transformers", NUM_LABELS, auxiliary_loss=auxiliary_loss)
    with jax.enable_x64(x64):
        loss, loss_dict, grads = jax_loss(x, config, jnp.float64 if x64 else jnp.float32)
        loss_dict = jax.tree.map(np.asarray, loss_dict)
        grads = jax.tree.map(np.asarray, grads)
    assert bool(loss_dict.pop("is_finite"))
    assert set(loss_dict) == set(ref_dict)
    assert len(ref_dict) == (4 * DECODER_LAYERS if auxiliary_loss else 4)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    for key, value in ref_dict.items():
        np.testing.assert_allclose(loss_dict[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    names = ("logits", "pred_boxes", "intermediate_logits", "intermediate_boxes")
    for name, got, ref in zip(names, grads, ref_grads):
        assert np.abs(ref).max() > 0 or (name.startswith("intermediate") and not auxiliary_loss)
        np.testing.assert_allclose(
            got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max() + 1e-12, err_msg=name
        )


def test_from_model_config_reads_transformers_config():
    from transformers import DeformableDetrConfig

    hf = DeformableDetrConfig(
        num_labels=7, class_cost=3, giou_loss_coefficient=4, auxiliary_loss=True
    )
    read = LossConfig.from_model_config(hf, preset=None)
    assert (read.num_labels, read.class_cost, read.giou_loss_coefficient) == (7, 3, 4)
    assert read.class_loss_coefficient == 1 and read.auxiliary_loss and not read.encoder_loss
    assert LossConfig.from_model_config(hf) == LossConfig.preset("original", 7)
