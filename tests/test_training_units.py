"""Training pieces without a training run: optimizer groups and learning rates, recipes,
start-up errors, COCO evaluation, the metrics files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax.training import ConfigError, settings, setup, train
from deformable_detr_jax.training import optimizer as optimizer_lib
from deformable_detr_jax.training.metrics import (
    crc32c,
)
from deformable_detr_jax.training.train_state import model_spec
from tests.subprocess_utils import run
from tests.training_workers import get_config, tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = (
    "deformable_detr_r50_coco",
    "box_refine_r50_coco",
    "two_stage_r50_coco",
    "two_stage_swin_t_coco",
    "two_stage_convnext_t_coco",
    "finetune_coco_json",
    "finetune_hf_datasets",
    "shapes_tiny",
)


def _recipe(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ----------------------------------------------------------------------------- optimizer


def test_param_groups_of_the_paper():
    config = _recipe("deformable_detr_r50_coco").optimizer
    group = lambda name: optimizer_lib.param_group(name, config)  # noqa: E731
    assert group("model.backbone.model.embedder.embedder.convolution.kernel") == "frozen"
    assert (
        group("model.backbone.model.encoder.stages.0.layers.0.layer.0.convolution.kernel")
        == "frozen"
    )
    assert (
        group("model.backbone.model.encoder.stages.1.layers.0.layer.0.convolution.kernel")
        == "backbone"
    )
    assert group("model.encoder.layers.3.self_attn.sampling_offsets.bias") == "linear_proj"
    assert group("model.reference_points.kernel") == "linear_proj"
    assert group("model.encoder.layers.3.self_attn.attention_weights.kernel") == "default"
    assert group("class_embed.0.bias") == "default"
    assert optimizer_lib.group_learning_rates(config) == {
        "default": 2e-4,
        "backbone": 2e-5,
        "linear_proj": pytest.approx(2e-5),
    }


def test_three_learning_rates_are_applied_and_drop_at_the_epoch():
    """First AdamW step without decay/clipping moves each weight by lr * g / (|g| + eps)."""
    recipe = get_config().optimizer
    recipe.lr, recipe.lr_backbone, recipe.lr_linear_proj_mult = 1e-2, 1e-3, 0.1
    recipe.weight_decay, recipe.clip_max_norm = 0.0, 0.0
    recipe.lr_drop_epochs = (1,)
    config = settings.parse_group(settings.OptimizerSettings, recipe, "optimizer")
    spec = model_spec(tiny_model_config(), tuple(config.frozen))
    labels = {n: optimizer_lib.param_group(n, config) for n in spec.trainable}
    assert set(labels.values()) == set(optimizer_lib.GROUPS)
    assert not any(n.startswith("model.backbone.model.embedder.") for n in labels)
    assert not any(".stages.0." in n for n in labels)
    assert set(spec.frozen) >= {n for n in spec.frozen if n.endswith("running_var")}
    shapes = {path: var for path, var in spec.variables}
    params = {}
    rng = np.random.default_rng(0)
    for path, var in shapes.items():
        name = ".".join(str(p) for p in path)
        if name in labels:
            params[name] = jnp.asarray(rng.normal(size=var.shape), jnp.float32)
    grads = {
        n: jnp.asarray(
            rng.choice([-1.0, 1.0], size=v.shape) * rng.uniform(0.5, 2, v.shape), jnp.float32
        )
        for n, v in params.items()
    }
    steps_per_epoch = 3
    tx, schedules = optimizer_lib.build_optimizer(config, labels, steps_per_epoch)
    state = tx.init(params)
    expected = {"default": 1e-2, "backbone": 1e-3, "linear_proj": 1e-3}
    for step in range(steps_per_epoch + 1):
        updates, state = tx.update(grads, state, params)
        factor = 0.1 if step >= steps_per_epoch else 1.0
        for name, update in updates.items():
            lr = expected[labels[name]] * factor
            # constant gradients: m_hat / sqrt(v_hat) = sign(g) at every step
            np.testing.assert_allclose(
                np.asarray(update),
                -lr * np.sign(np.asarray(grads[name])),
                rtol=1e-4,
                err_msg=f"{name} ({labels[name]}) at step {step}",
            )
        assert float(schedules["backbone"](step)) == pytest.approx(1e-3 * factor)


def test_clipping_applies_to_the_global_norm():
    """Gradients of global norm 5 reach AdamW scaled to norm 0.1 (its first moment shows it)."""
    import optax

    config = settings.OptimizerSettings(clip_max_norm=0.1, weight_decay=0.0)
    labels = {"a": "default", "b": "backbone"}
    tx, _ = optimizer_lib.build_optimizer(config, labels, 10)
    params = {"a": jnp.ones((3,)), "b": jnp.ones((2,))}
    grads = {"a": jnp.asarray([3.0, 0.0, 0.0]), "b": jnp.asarray([0.0, 4.0])}
    _, state = tx.update(grads, tx.init(params), params)
    adam = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    first_moment = np.sqrt(sum(float(jnp.sum(m**2)) for s in adam for m in jax.tree.leaves(s.mu)))
    assert first_moment == pytest.approx((1 - config.b1) * 0.1, rel=1e-5)


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_build(name):
    config = _recipe(name)
    run = settings.parse(config)
    assert set(config) == {"model", "data", "optimizer", "train"}
    assert config.optimizer.frozen is not None
    if name.startswith("finetune_"):
        assert config.model.init_from and config.data.source == name[len("finetune_") :]
        return  # its model config comes from the checkpoint it names
    labels = 3 if name == "shapes_tiny" else 91
    source = type("Source", (), {"num_labels": labels, "label_names": None})()
    model = setup.model_config(run.model, source)
    loss = setup.loss_config(run.model, model)
    assert model.num_labels == labels and loss.num_labels == labels
    if name.endswith("_r50_coco"):  # the backbone recipes: tests/test_backbone_recipes.py
        opt = config.optimizer
        assert (opt.lr, opt.lr_backbone, opt.lr_linear_proj_mult) == (2e-4, 2e-5, 0.1)
        assert (opt.weight_decay, opt.clip_max_norm, tuple(opt.lr_drop_epochs)) == (
            1e-4,
            0.1,
            (40,),
        )
        assert config.train.num_epochs == 50 and config.data.batch_size == 32
        assert model.backbone_depth == 50
        assert model.with_box_refine == (name != "deformable_detr_r50_coco")
        assert model.two_stage == (name == "two_stage_r50_coco")


# ----------------------------------------------------------------------------- start-up errors


def _no_compile(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the train step was built before the bad setting was reported")

    monkeypatch.setattr("deformable_detr_jax.training.loop.make_train_step", fail)


def test_batch_not_divisible_by_devices_fails_at_start(monkeypatch, tmp_path):
    config = get_config()
    config.data.batch_size = 6
    run = settings.parse(config)
    with pytest.raises(ConfigError, match=r"data\.batch_size=6 .* 4 devices"):
        setup.batch_layout(run.data, run.train, 4, 1)
    config = get_config()
    config.data.batch_size = 3
    config.train.grad_accum_steps = 2
    _no_compile(monkeypatch)
    with pytest.raises(ConfigError, match=r"data\.batch_size=3 .*grad_accum_steps=2"):
        train(config, tmp_path)


def test_missing_dataset_path_fails_at_start(monkeypatch, tmp_path):
    config = get_config()
    config.data.source = "coco_json"
    config.data.coco_json.train_images = str(tmp_path / "nowhere")
    config.data.coco_json.train_annotations = str(tmp_path / "nowhere.json")
    _no_compile(monkeypatch)
    with pytest.raises(ConfigError, match=r"data\.coco_json .*nowhere"):
        train(config, tmp_path / "run")


@pytest.mark.parametrize("problem", ["image_id", "category_id"])
def test_coco_json_with_unknown_ids_fails_at_start(monkeypatch, tmp_path, problem):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(images / "a.jpg")
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "iscrowd": 0}
    annotation[problem] = 99
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 50}],
        "annotations": [annotation],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(data))
    config = get_config()
    config.data.source = "coco_json"
    config.data.coco_json.train_images = str(images)
    config.data.coco_json.train_annotations = str(tmp_path / "train.json")
    _no_compile(monkeypatch)
    with pytest.raises(ConfigError, match="data.coco_json .*99"):
        train(config, tmp_path / "run")


def test_unknown_config_key_fails_on_the_command_line(tmp_path):
    result = run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/shapes_tiny.py",
            "--workdir",
            str(tmp_path),
            "--config.train.num_stepz=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "num_stepz" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_model_field_is_named():
    config = get_config()
    config.model.unlock()
    config.model.dmodel = 3
    with pytest.raises(
        ConfigError, match=r"model\.dmodel is not a setting; did you mean model\.d_model\?"
    ):
        settings.parse(config)


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- metrics files


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
