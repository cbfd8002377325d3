"""The Swin-T and ConvNeXt-T two-stage COCO recipes (`configs/two_stage_{swin,convnext}_t_coco.py`):
what they set (the H-Deformable-DETR / DINO values their docstrings cite), and a tiny variant of
each (the recipe with its sizes overridden, as `--config.*` would) trained 2 steps by `train()`,
what train.py runs, starting from the ImageNet weights the recipe names by hub id, served by a
fake hub (`tests/hub_server.py`)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save

from deformable_detr_jax import export_state_dict
from deformable_detr_jax.convert.formats import HUB_BACKBONE_PREFIX, to_hub
from deformable_detr_jax.training import optimizer as optimizer_lib
from deformable_detr_jax.training import settings, setup, train
from deformable_detr_jax.training.metrics import read_jsonl
from deformable_detr_jax.training.train_state import model_spec
from tests.hub_server import FakeHub, point_hub_at
from tests.random_models import drawn_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
# recipe -> (backbone, drop path, ImageNet weights' hub id, depths, widths)
RECIPES = {
    "two_stage_swin_t_coco": (
        "swin",
        0.2,
        "microsoft/swin-tiny-patch4-window7-224",
        (2, 2, 6, 2),
        (96, 192, 384, 768),
    ),
    "two_stage_convnext_t_coco": (
        "convnext",
        0.0,
        "facebook/convnext-tiny-224",
        (3, 3, 9, 3),
        (96, 192, 384, 768),
    ),
}
# the tiny variants: a recipe's sizes overridden, its optimisation and backbone kind kept
TINY_MODEL = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_queries=8,
    two_stage_num_proposals=8,
    encoder_n_points=2,
    decoder_n_points=2,
    backbone_depths=(1, 2, 1, 1),
    backbone_hidden_sizes=(8, 16, 32, 64),
)
TINY_BACKBONES = {
    "swin": dict(backbone_num_heads=(1, 2, 2, 4), backbone_window_size=3),
    "convnext": {},
}
IMAGE = 64


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def imagenet_classifier_files(model) -> dict[str, bytes]:
    """config.json and model.safetensors of an ImageNet classifier holding `model`'s backbone,
    named as transformers' `ConvNextForImageClassification` / `SwinForImageClassification` name
    it (a `convnext.` / `swin.` level, no detector output norms, a classifier head)."""
    kind = model.config.backbone_type
    weights = {"classifier.weight": np.ones((10, model.config.backbone_hidden_sizes[-1]), "f4")}
    for key, value in to_hub(export_state_dict(model)).items():
        name = key[len(HUB_BACKBONE_PREFIX) :]
        if key.startswith(HUB_BACKBONE_PREFIX) and not name.startswith("hidden_states_norms."):
            name = name if name.startswith(f"{kind}.") else f"{kind}.{name}"
            weights[name] = np.ascontiguousarray(value)  # safetensors writes the buffer
    config = {"model_type": kind, "architectures": [f"{kind.title()}ForImageClassification"]}
    return {"config.json": json.dumps(config).encode(), "model.safetensors": save(weights)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_settings(name):
    kind, drop_path, weights, depths, widths = RECIPES[name]
    config = recipe(name)
    run = settings.parse(config)
    source = type("Source", (), {"num_labels": 91, "label_names": None})()
    model = setup.model_config(run.model, source)
    assert (model.backbone_type, model.backbone_depths, model.backbone_hidden_sizes) == (
        kind,
        depths,
        widths,
    )
    assert model.backbone_drop_path_rate == drop_path and model.backbone_out_stages == (1, 2, 3)
    assert model.two_stage and model.with_box_refine and model.num_feature_levels == 4
    assert (model.d_model, model.encoder_ffn_dim, model.num_queries) == (256, 1024, 300)
    assert run.model.backbone_weights == weights and run.model.backbone_remat == ()
    opt = run.optimizer
    assert (opt.lr, opt.lr_backbone, opt.lr_linear_proj_mult, opt.weight_decay) == (
        2e-4,
        2e-5,
        0.1,
        1e-4,
    )
    assert (opt.frozen, opt.lr_drop_epochs, opt.clip_max_norm) == ((), (11,), 0.1)
    assert (run.train.num_epochs, run.data.batch_size, run.data.source) == (12, 16, "coco_json")
    # every backbone parameter trained, at the backbone rate (stem and first stage included)
    spec = model_spec(model, opt.frozen)
    backbone = [n for n in spec.trainable if n.startswith("model.backbone.")]
    assert not spec.frozen or all(not n.startswith("model.backbone.") for n in spec.frozen)
    assert any(".embeddings." in n for n in backbone)
    assert any(".stages.0." in n or ".layers.0." in n for n in backbone)
    assert {optimizer_lib.param_group(n, opt) for n in backbone} == {"backbone"}


def tiny_variant(name: str):
    """The recipe, sized to train in seconds on shapes, its backbone's second stage (two
    blocks) rematerialised; everything else as the recipe has it."""
    config = recipe(name)
    kind = RECIPES[name][0]
    model = config.model
    for key, value in {**TINY_MODEL, **TINY_BACKBONES[kind]}.items():
        model[key] = value
    data = config.data
    data.source = "shapes"
    data.batch_size = 2
    data.max_boxes = 4
    data.pad_to = (IMAGE, IMAGE)
    data.num_threads = 1
    data.backend = "python"
    data.shapes.num_train = 8
    data.shapes.image_size = (IMAGE, IMAGE)
    data.augment.scales = (IMAGE,)
    data.augment.max_size = IMAGE
    data.augment.crop_prob = 0.0
    data.augment.eval_size = IMAGE
    data.augment.eval_max_size = IMAGE
    # the real train step with stages recomputed in the backward pass (model.backbone_remat)
    model.backbone_remat = (False, True, False, False)
    train_ = config.train
    train_.num_steps = 2
    train_.log_every = 1
    train_.eval_at_end = False
    train_.save_model = False
    train_.tensorboard = False
    train_.async_checkpoints = False
    train_.compilation_cache_dir = ""
    return config


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub().start()
    try:
        point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tiny_variant_trains_from_the_recipes_imagenet_weights(name, hub, tmp_path):
    config = tiny_variant(name)
    parsed = settings.parse(config)
    source = type("Source", (), {"num_labels": 3, "label_names": None})()
    imagenet = drawn_model(setup.model_config(parsed.model, source), seed=3)
    hub.add(config.model.backbone_weights, imagenet_classifier_files(imagenet))

    result = train(config, tmp_path / "run")

    assert result.step == 2
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    losses = [r["loss"] for r in sorted(records, key=lambda r: r["step"])]
    assert len(losses) == 2 and np.isfinite(losses).all() and losses[0] != losses[1], losses
    # the backbone started from the hub's weights and moved by about two Adam steps of 2e-5
    source_weights = {
        ".".join(map(str, p)): np.asarray(v[...])
        for p, v in nnx.to_flat_state(nnx.state(imagenet, nnx.Param))
    }
    trained = {n: np.asarray(jax.device_get(v)) for n, v in result.state.params.items()}
    # (the detector's output norms are not in a classifier's file, and Swin's final norm, which
    # nothing uses, is not read from it: both start fresh)
    fresh = (".hidden_states_norms.", ".swin.layernorm.")
    backbone = [
        n for n in trained if n.startswith("model.backbone.") and not any(f in n for f in fresh)
    ]
    assert len(backbone) > 20
    moved = [float(np.abs(trained[n] - source_weights[n]).max()) for n in backbone]
    assert max(moved) < 1e-4 and max(moved) > 0.0, sorted(zip(moved, backbone))[-3:]
    repo = config.model.backbone_weights
    assert any(p.startswith(f"/{repo}/resolve/") for _, p, _ in hub.requests), hub.requests
