"""The typed settings (`training/settings/`): parsed once from a recipe, one default per setting,
one readable error for a bad one, what may change on resume as field metadata."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.training import ConfigError, recipes, settings
from tests.subprocess_utils import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(group, prefix=""):
    out = {}
    for field in dataclasses.fields(group):
        value = getattr(group, field.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{field.name}."))
        else:
            out[f"{prefix}{field.name}"] = value
    return out


def test_a_recipe_round_trips_and_overrides_arrive_typed():
    config = recipes.shapes_tiny()
    config.optimizer.lr = 3e-3
    config.data.augment.scales = (64, 80)
    config.model.loss.giou_cost = 7
    run = settings.parse(config)
    assert run.optimizer.lr == 3e-3 and run.data.augment.scales == (64, 80)
    assert run.model.loss.giou_cost == 7.0 and isinstance(run.model.loss.giou_cost, float)
    assert run.model.d_model == 64 and run.data.pad_to == (96, 96)
    assert settings.parse(settings.to_config_dict(run)) == run
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.seed = 1


def test_one_default_per_setting_the_recipes_and_a_partial_dict_agree():
    """`train({...})` with a partial dict gets the recipes' defaults (seed 42, a checkpoint
    every 2000 steps), which are the fields' defaults."""
    partial = settings.parse({"data": {"source": "shapes"}, "train": {"num_steps": 3}})
    recipe = settings.parse(recipes.base_config())
    assert partial.train.seed == recipe.train.seed == 42
    assert partial.train.checkpoint_every == recipe.train.checkpoint_every == 2000
    assert partial.train.num_steps == 3 and partial.data.source == "shapes"
    assert _leaves(dataclasses.replace(partial, data=recipe.data, train=recipe.train)) == _leaves(
        recipe
    )


def test_the_model_group_carries_no_loss_field():
    """The transformers loss fields stay in `DeformableDetrConfig` (for from_hf / to_hf) only."""
    config = recipes.base_config()
    for name in settings.MODEL_LOSS_FIELDS:
        assert hasattr(DeformableDetrConfig(), name)
        assert name not in config.model
    assert set(config.model.loss) == {f.name for f in dataclasses.fields(settings.LossSettings)}


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model": {"bbox_loss_coefficient": 50}},
            r"^model\.bbox_loss_coefficient does nothing .*: set "
            r"model\.loss\.bbox_loss_coefficient, which the loss reads$",
        ),
        (
            {"model": {"eos_coefficient": 0.3}},
            r"^model\.eos_coefficient does nothing .* the loss has no such setting",
        ),
        (
            {"train": {"num_stepz": 3}},
            r"^train\.num_stepz is not a setting; did you mean "
            r"train\.num_steps\?$",
        ),
        ({"trian": {}}, r"^trian is not a setting; did you mean train\?$"),
        ({"model": {"loss": {"giou_costs": 1.0}}}, r"did you mean model\.loss\.giou_cost\?$"),
        ({"train": {"seed": "7"}}, r"^train\.seed must be a whole number, got '7' \(str\)$"),
        ({"optimizer": {"lr": True}}, r"^optimizer\.lr must be a number, got True"),
        ({"data": {"pad_to": (96,)}}, r"^data\.pad_to must be a tuple of 2, got \(96,\)"),
        ({"data": {"augment": {"scales": 96}}}, r"^data\.augment\.scales must be a tuple"),
        (
            {"data": {"source": "coco"}},
            r"^data\.source='coco' is not one of shapes, coco_json, yolo, tfds, hf_datasets; did "
            r"you mean coco_json\?$",
        ),
        ({"train": {"compute_dtype": "bf16"}}, r"^train\.compute_dtype='bf16' is not one of"),
        ({"data": {"shapes": 3}}, r"^data\.shapes must be a group of settings, got 3$"),
    ],
)
def test_a_bad_setting_is_one_error_naming_it(config, message):
    with pytest.raises(ConfigError, match=message):
        settings.parse(config)


# what the hand-kept list in resume.py said before it became field metadata
MAY_CHANGE = {
    *(f"train.{k}" for k in ("num_steps", "num_epochs", "log_every", "checkpoint_every")),
    *(f"train.{k}" for k in ("keep_checkpoints", "async_checkpoints", "eval_every")),
    *(f"train.{k}" for k in ("eval_at_end", "eval_top_k", "save_model", "tensorboard")),
    "train.handle_sigterm",
    "train.compilation_cache_dir",
    *(f"data.{k}" for k in ("eval_batch_size", "num_threads", "backend", "strict")),
    "data.shapes.num_eval",
    *(f"data.coco_json.{s}_{k}" for s in ("train", "eval") for k in ("images", "annotations")),
    "data.yolo.folder",
    "data.yolo.eval_split",
    "data.tfds.data_dir",
    "data.tfds.eval_split",
    "data.hf_datasets.path",
    "data.hf_datasets.eval_split",
    "model.msda_implementation",
    "model.backbone_remat",
    "model.init_from",
    "model.backbone_weights",
    *(f"optimizer.{k}" for k in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay")),
    *(f"optimizer.{k}" for k in ("b1", "b2", "eps", "clip_max_norm", "lr_drop_epochs")),
    "optimizer.lr_drop_factor",
    "optimizer.warmup_steps",
}


def test_what_may_change_on_resume_is_a_property_of_the_field():
    names = _leaves(settings.Settings())
    may = {n for n in names if settings.field_of(n).metadata.get("may_change", False)}
    assert may == MAY_CHANGE
    assert settings.field_of("model.bbox_loss_coefficient") is None
    assert settings.field_of("train.nothing") is None


def _train_py(tmp_path, *overrides):
    return run(
        [sys.executable, "train.py", "--config", "configs/shapes_tiny.py"]
        + ["--workdir", str(tmp_path / "run"), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "override, named",
    [
        ("--config.model.bbox_loss_coefficient=50", "set model.loss.bbox_loss_coefficient"),
        ("--config.optimizer.lr_bakbone=1e-5", "did you mean optimizer.lr_backbone?"),
    ],
)
def test_a_bad_override_exits_2_with_one_error_line(tmp_path, override, named):
    result = _train_py(tmp_path, override, "--config.train.num_steps=1")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: configuration: "), lines
    assert named in lines[0]
    assert not (tmp_path / "run").exists()
