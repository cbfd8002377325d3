"""Training as PyTorch does it: the optimizer against `torch.optim.AdamW` with the paper's param
groups and `torch.nn.utils.clip_grad_norm_` (float64), and a parameter the loss does not reach
left alone (not decayed) by the real train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deformable_detr_jax.criterion.loss import LossConfig
from deformable_detr_jax.training import api, make_data_mesh, reach, settings
from deformable_detr_jax.training import optimizer as optimizer_lib
from deformable_detr_jax.training import train_state as state_lib
from tests.training_workers import tiny_model_config

SHAPES = {
    "model.backbone.model.encoder.stages.1.conv.kernel": (3, 3, 4, 5),
    "model.backbone.model.encoder.stages.2.norm.bias": (5,),
    "model.encoder.layers.0.self_attn.sampling_offsets.kernel": (6, 8),
    "model.reference_points.bias": (2,),
    "class_embed.0.kernel": (6, 3),
    "model.input_proj.0.bias": (6,),
    "model.enc_output.kernel": (6, 6),  # torch: grad None (the loss does not reach it)
}
UNREACHED = "model.enc_output.kernel"
STEPS, STEPS_PER_EPOCH = 5, 2
# the norm of each step's gradients: clipped (> 0.1) and not
NORMS = (5.0, 0.03, 2.0, 0.09, 0.7)


def _torch_adamw(settings_, params, grads):
    import torch

    tensors = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in params.items()}
    rates = optimizer_lib.group_learning_rates(settings_)
    groups = [
        {
            "params": [
                t for n, t in tensors.items() if optimizer_lib.param_group(n, settings_) == g
            ],
            "lr": rates[g],
        }
        for g in optimizer_lib.GROUPS
    ]
    adamw = torch.optim.AdamW(
        groups,
        betas=(settings_.b1, settings_.b2),
        eps=settings_.eps,
        weight_decay=settings_.weight_decay,
    )
    # StepLR(lr_drop) stepped once per epoch, as main.py does
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        adamw, [e for e in settings_.lr_drop_epochs], gamma=settings_.lr_drop_factor
    )
    for step, grad in enumerate(grads):
        for name, tensor in tensors.items():
            tensor.grad = None if name == UNREACHED else torch.tensor(grad[name])
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), settings_.clip_max_norm)
        adamw.step()
        if (step + 1) % STEPS_PER_EPOCH == 0:
            scheduler.step()
    return {n: t.detach().numpy() for n, t in tensors.items()}


@pytest.mark.torch
def test_the_optimizer_is_torchs_adamw_with_clip_grad_norm():
    rng = np.random.default_rng(7)
    params = {n: rng.normal(size=s) for n, s in SHAPES.items()}
    grads = []
    for norm in NORMS:
        grad = {n: rng.normal(size=s) for n, s in SHAPES.items()}
        grad[UNREACHED] = np.zeros(SHAPES[UNREACHED])
        scale = norm / np.sqrt(sum(np.sum(g**2) for g in grad.values()))
        grads.append({n: g * scale for n, g in grad.items()})
    settings_ = settings.OptimizerSettings(
        lr=1e-2,
        lr_backbone=3e-3,
        lr_linear_proj_mult=0.1,
        weight_decay=0.5,  # large, so a wrongly decayed tensor shows
        clip_max_norm=0.1,
        lr_drop_epochs=(1,),
        frozen=(),
    )
    expected = _torch_adamw(settings_, params, grads)

    labels = {n: optimizer_lib.param_group(n, settings_) for n in SHAPES}
    assert set(labels.values()) == set(optimizer_lib.GROUPS)
    decayed = set(SHAPES) - {UNREACHED}
    with jax.enable_x64(True):
        tx, _ = optimizer_lib.build_optimizer(settings_, labels, STEPS_PER_EPOCH, decayed)
        state_params = {n: jnp.asarray(v, jnp.float64) for n, v in params.items()}
        opt_state = tx.init(state_params)
        for grad in grads:
            grad = {n: jnp.asarray(g, jnp.float64) for n, g in grad.items()}
            updates, opt_state = tx.update(grad, opt_state, state_params)
            state_params = optax.apply_updates(state_params, updates)
        got = {n: np.asarray(v) for n, v in state_params.items()}
    np.testing.assert_array_equal(got[UNREACHED], params[UNREACHED])
    for name in SHAPES:
        assert not np.allclose(got[name], params[name]) or name == UNREACHED
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-12, err_msg=name)


def test_clipping_divides_by_the_norm_plus_1e_6():
    """A gradient of norm 1e-6 and max_norm 1e-6: torch scales by 1e-6 / 2e-6 = 0.5."""
    tx = optimizer_lib.clip_grad_norm(1e-6)
    grad = {"a": jnp.asarray([6e-7, 8e-7])}  # norm 1e-6
    clipped, _ = tx.update(grad, tx.init(grad))
    np.testing.assert_allclose(np.asarray(clipped["a"]), [3e-7, 4e-7], rtol=1e-6)
    assert tx.init(grad) == optax.clip_by_global_norm(1.0).init(grad)  # same (empty) state


def test_the_decay_mask_keeps_optax_adamws_state_layout():
    """Checkpoints written with `optax.adamw` restore into the masked one."""
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    mine = optimizer_lib.adamw(1e-3, settings.OptimizerSettings(), lambda name: name == "a")
    theirs = optax.adamw(1e-3, weight_decay=1e-4)
    assert jax.tree.structure(mine.init(params)) == jax.tree.structure(theirs.init(params))


# the tensors transformers' two-stage model never reaches without the encoder loss
TWO_STAGE_UNREACHED = {
    "model.enc_output.kernel",
    "model.enc_output.bias",
    "model.enc_output_norm.scale",
    "model.enc_output_norm.bias",
    "class_embed.2.kernel",
    "class_embed.2.bias",
    *(f"bbox_embed.2.layers.{i}.{p}" for i in range(3) for p in ("kernel", "bias")),
}


def test_unreached_parameters_of_a_two_stage_model_are_found():
    model = tiny_model_config(num_labels=3, two_stage=True, with_box_refine=True)
    spec = state_lib.model_spec(model, ())
    without = LossConfig.preset("transformers", num_labels=3)
    with_encoder_loss = LossConfig.preset("original", num_labels=3)
    assert set(spec.trainable) - reach.reached_parameters(spec, without) == TWO_STAGE_UNREACHED
    assert reach.reached_parameters(spec, with_encoder_loss) == set(spec.trainable)


def test_a_train_step_leaves_unreached_parameters_alone():
    """Two-stage, transformers' loss (no encoder loss), a large weight decay: after a step of the
    real train step the unreached tensors are unchanged, every other one moved (but those that
    are zeros with a zero gradient: the box heads' last layers start at zero)."""
    model = tiny_model_config(num_labels=3, two_stage=True, with_box_refine=True, dropout=0.0)
    loss = LossConfig.preset("transformers", num_labels=3)
    opt = settings.OptimizerSettings(lr=1e-3, weight_decay=0.5, frozen=())
    spec = state_lib.model_spec(model, opt.frozen)
    optimizer = api.make_optimizer(spec, opt, 10, loss=loss)
    mesh = make_data_mesh(jax.devices()[:1])
    state = api.init_state(spec, optimizer, mesh, seed=3)
    before = {n: np.asarray(v) for n, v in state.params.items()}
    step = api.make_train_step(spec, loss, optimizer, mesh, state)
    rng = np.random.default_rng(3)
    side = reach.probe_side(model)
    centers, sizes = rng.uniform(0.3, 0.7, (2, 2, 2)), rng.uniform(0.1, 0.3, (2, 2, 2))
    batch = {
        "pixel_values": rng.normal(size=(2, side, side, 3)).astype(np.float32),
        "pixel_mask": np.ones((2, side, side), bool),
        "labels": rng.integers(0, 3, (2, 2)).astype(np.int32),
        "boxes": np.concatenate([centers, sizes], -1).astype(np.float32),
        "mask": np.ones((2, 2), bool),
    }
    state, metrics = step(state, api.make_batch([batch], mesh), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    after = {n: np.asarray(v) for n, v in state.params.items()}
    moved = {n for n in after if not np.array_equal(after[n], before[n])}
    assert not moved & TWO_STAGE_UNREACHED
    # a decay would have shown: most unreached tensors are not zeros (the heads' last layers are)
    assert {"model.enc_output.kernel", "model.enc_output_norm.scale", "class_embed.2.kernel"} <= {
        n for n in TWO_STAGE_UNREACHED if np.any(before[n])
    }
    # every reached tensor that is not all zeros moved (its gradient, its decay)
    assert moved >= {n for n in after if np.any(before[n])} - TWO_STAGE_UNREACHED
