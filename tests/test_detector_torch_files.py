"""`Detector.from_pretrained` on a `.bin` (transformers' names) and an original fundamentalvision
`.pth` alone, written with torch: the architecture is read off the weights, the outputs are the
model's in memory (the safetensors file: tests/test_detector_files.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from deformable_detr_jax import Detector
from deformable_detr_jax.convert import export_transformers_checkpoint, hub_to_original
from tests.test_detector_files import assert_outputs_equal
from tests.test_hub import tiny_model, tiny_processor

pytestmark = pytest.mark.torch


def _tensors(state_dict):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def test_a_bin_file_alone(tmp_path):
    import torch

    path = tmp_path / "pytorch_model.bin"
    torch.save(_tensors(export_transformers_checkpoint(tiny_model())), path)
    with pytest.warns(UserWarning, match="default pre-processing"):
        Detector.from_pretrained(path, compile_cache=None)
    assert_outputs_equal(Detector.from_pretrained(path, processor=tiny_processor()))


@pytest.mark.parametrize("with_args", [False, True], ids=["state-dict", "training-checkpoint"])
def test_an_original_pth_file_alone(with_args, tmp_path):
    import torch

    original = _tensors(hub_to_original(export_transformers_checkpoint(tiny_model())))
    path = tmp_path / "r50_deformable_detr.pth"
    if with_args:  # what fundamentalvision's main.py saves
        config = tiny_model().config
        args = argparse.Namespace(
            lr=2e-4,
            epochs=50,
            hidden_dim=config.d_model,
            enc_layers=config.encoder_layers,
            dec_layers=config.decoder_layers,
            dim_feedforward=config.encoder_ffn_dim,
            nheads=config.encoder_attention_heads,
            enc_n_points=config.encoder_n_points,
            dec_n_points=config.decoder_n_points,
            num_feature_levels=config.num_feature_levels,
            num_queries=config.num_queries,
            with_box_refine=config.with_box_refine,
            two_stage=config.two_stage,
            dilation=False,
            position_embedding="sine",
        )
        torch.save({"model": original, "epoch": 3, "args": args}, path)
    else:
        torch.save(original, path, _use_new_zipfile_serialization=False)
    detector = Detector.from_pretrained(path, processor=tiny_processor(), compile_cache=None)
    assert detector.config.num_labels == 5
    assert_outputs_equal(detector)
