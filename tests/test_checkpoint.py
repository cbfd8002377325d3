"""`save_pretrained` / `load_pretrained`: orbax parameters beside config.json, exact round
trips for every variant, atomic writes, and errors that name the problem."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import DeformableDetrConfig, ImageProcessor
from deformable_detr_jax.checkpoint import is_pretrained_folder, load_pretrained, save_pretrained
from deformable_detr_jax.convert import (
    CheckpointFormatError,
    CheckpointKeyError,
    load_pytorch_checkpoint,
)
from tests.random_models import random_model

TINY = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=48,
    decoder_ffn_dim=40,
    num_queries=10,
    two_stage_num_proposals=10,
    num_labels=5,
    encoder_attention_heads=4,
    decoder_attention_heads=2,
    encoder_n_points=3,
    decoder_n_points=2,
    backbone_depths=(1, 1, 1, 1),
    backbone_hidden_sizes=(32, 64, 128, 256),
    backbone_embedding_size=16,
)
VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale_dc5": {"num_feature_levels": 1, "dilation": True},
}
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


def _weights(model) -> dict:
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert list(wa) == list(wb)
    for path, value in wa.items():
        assert wb[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(wb[path]), np.asarray(value), err_msg=str(path))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_exact(variant, tmp_path):
    config = DeformableDetrConfig(**TINY, **VARIANTS[variant])
    model = random_model(config, seed=len(variant))
    folder = save_pretrained(model, tmp_path / "saved")
    assert sorted(os.listdir(folder)) == ["config.json", "params"]
    assert is_pretrained_folder(folder)
    loaded = load_pretrained(folder)
    assert loaded.config == DeformableDetrConfig.from_hf(config.to_hf())
    assert loaded.config.replace(id2label=None) == config
    _assert_same_weights(model, loaded)
    # shared heads stay shared, independent ones independent
    shared = loaded.class_embed[0] is loaded.class_embed[1]
    assert shared == (not config.with_box_refine)


def test_outputs_and_dropout_after_loading(tmp_path):
    """Same outputs; the dropout streams (not saved) are fresh and working."""
    config = DeformableDetrConfig(**TINY, dropout=0.3)
    model = random_model(config, seed=1)
    loaded = load_pretrained(save_pretrained(model, tmp_path / "saved"))
    x = jax.random.normal(jax.random.key(2), (1, 64, 64, 3))
    mask = jnp.ones((1, 64, 64), bool)
    expected = np.asarray(model(x, mask).logits)
    np.testing.assert_array_equal(np.asarray(loaded(x, mask).logits), expected)
    dropped = np.asarray(loaded(x, mask, deterministic=False).logits)
    assert np.isfinite(dropped).all() and not np.allclose(dropped, expected)


def test_dtype_and_processor(tmp_path):
    config = DeformableDetrConfig(**TINY, id2label={i: f"class {i}" for i in range(5)})
    model = random_model(config, seed=3)
    processor = ImageProcessor(size={"shortest_edge": 480, "longest_edge": 640})
    folder = save_pretrained(model, tmp_path / "saved", processor=processor)
    assert sorted(os.listdir(folder)) == ["config.json", "params", "preprocessor_config.json"]
    assert ImageProcessor.from_pretrained(folder) == processor
    hub_config = json.loads((folder / "config.json").read_text())
    assert hub_config["model_type"] == "deformable_detr"
    assert hub_config["id2label"]["4"] == "class 4"
    assert load_pretrained(folder).config == config
    half = load_pretrained(folder, dtype=jnp.bfloat16)
    kernel = half.class_embed[0].kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(model.class_embed[0].kernel[...].astype(jnp.bfloat16))
    )
    # bfloat16 parameters are stored as such
    again = load_pretrained(save_pretrained(half, tmp_path / "half"))
    _assert_same_weights(half, again)


def test_existing_folder_and_failures_leave_nothing(tmp_path):
    model = random_model(DeformableDetrConfig(**TINY), seed=4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(model, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]

    class BrokenProcessor:
        def save_pretrained(self, folder):
            (folder / "preprocessor_config.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "new" / "model", processor=BrokenProcessor())
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # no folder, no temporary, no parent

    (tmp_path / "empty").mkdir()
    save_pretrained(model, tmp_path / "empty")
    save_pretrained(model, tmp_path / "busy", overwrite=True)
    _assert_same_weights(model, load_pretrained(tmp_path / "busy"))
    assert sorted(os.listdir(tmp_path)) == ["busy", "empty"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_pretrained(tmp_path / "nothing")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text("{}")
    (tmp_path / "hub" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match="load_pytorch_checkpoint"):
        load_pretrained(tmp_path / "hub")

    config = DeformableDetrConfig(**TINY)
    folder = save_pretrained(random_model(config), tmp_path / "saved")
    with pytest.raises(CheckpointFormatError, match="save_pretrained.*load_pretrained"):
        load_pytorch_checkpoint(folder)
    hub_config = json.loads((folder / "config.json").read_text())
    labels = {str(i): f"c{i}" for i in range(7)}
    (folder / "config.json").write_text(json.dumps({**hub_config, "id2label": labels}))
    with pytest.raises(CheckpointKeyError) as info:
        load_pretrained(folder)
    assert "class_embed.0.kernel: saved (64, 5), config.json needs (64, 7)" in str(info.value)
    (folder / "config.json").write_text(json.dumps({**hub_config, "decoder_layers": 3}))
    with pytest.raises(CheckpointKeyError) as info:
        load_pretrained(folder)
    assert "missing" in str(info.value) and "model.decoder.layers.2." in str(info.value)
