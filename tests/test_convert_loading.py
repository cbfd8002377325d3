"""`load_pytorch_checkpoint` on every variant and format without torch, export back to
transformers, bad input, and the `python -m deformable_detr_jax.convert` CLI.

The oracle is transformers' `DeformableDetrForObjectDetection` with random weights
(small configs; full size is covered by test_parity). Files are written the way users
get them: transformers `save_pretrained` folders, `torch.save` of a state dict, hub
(transformers 4) names in safetensors, and fundamentalvision training checkpoints
(`{"model", "optimizer", "epoch", "args"}`) renamed with `hub_to_original`. The JAX side
runs in a subprocess that checks torch never gets imported.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from deformable_detr_jax import DeformableDetrConfig, preset
from deformable_detr_jax.convert import (
    CheckpointFormatError,
    CheckpointKeyError,
    ConfigMismatchError,
    UnsafeCheckpointError,
    hub_to_original,
    load_pytorch_checkpoint,
    save_pytorch_checkpoint,
)
from deformable_detr_jax.convert.__main__ import main
from deformable_detr_jax.convert.state_dict import convert_state_dict, export_state_dict
from tests import hf_reference as ref
from tests import subprocess_utils
from tests.test_convert_bad_files import cli_fails

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL = ATOL = 1e-4
# 8 heads as in every published checkpoint, so that configs can be read off the weights.
TINY = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    num_queries=12,
    two_stage_num_proposals=12,
    num_labels=5,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_n_points=2,
    decoder_n_points=3,
)
BACKBONE = ((1, 1, 1, 1), "bottleneck", (32, 64, 128, 256))
SIZES = ((128, 160), (96, 136))
OUTPUTS = ("logits", "pred_boxes", "enc_outputs_class", "enc_outputs_coord_logits")

pytestmark = pytest.mark.torch


def _hf_config(variant: str):
    return ref.hf_config(depth_layout=BACKBONE, **{**TINY, **ref.VARIANTS[variant]})


def _original_args(config) -> argparse.Namespace:
    """fundamentalvision main.py arguments (training ones included) for `config`."""
    return argparse.Namespace(
        lr=2e-4,
        lr_backbone=2e-5,
        batch_size=2,
        epochs=50,
        lr_drop=40,
        clip_max_norm=0.1,
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
        dropout=0.1,
        position_embedding="sine",
        masks=False,
        dataset_file="coco",
        coco_path="./data/coco",
        seed=42,
    )


def _torch_tensors(state_dict):
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}


def _save_original(path, state_dict, args=None):
    import torch

    original = _torch_tensors(hub_to_original(ref.to_hub_naming(state_dict)))
    if args is None:
        torch.save(original, path, _use_new_zipfile_serialization=False)  # legacy format
        return
    params = list(original.values())[:2]
    torch.save(
        {
            "model": original,
            "optimizer": {
                "state": {0: {"exp_avg": torch.randn_like(params[0])}},
                "param_groups": [{"lr": 2e-4, "params": [0]}],
            },
            "lr_scheduler": {"step_size": 40, "last_epoch": 11},
            "epoch": 11,
            "args": args,
        },
        path,
    )


def _torch_outputs(model, pixels, mask):
    import torch

    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask))
    return {name: getattr(out, name).numpy() for name in OUTPUTS if getattr(out, name) is not None}


@pytest.fixture(scope="module")
def hf_models():
    return {
        variant: ref.random_hf_model(_hf_config(variant), seed=31 + i)
        for i, variant in enumerate(ref.VARIANTS)
    }


@pytest.fixture(scope="module")
def images():
    return ref.two_images(seed=5, sizes=SIZES)


@pytest.fixture(scope="module")
def checkpoints(hf_models, tmp_path_factory):
    """name -> (variant, path, config argument, format, config source): every variant in
    two formats, every format in at least two variants."""
    import torch

    root = tmp_path_factory.mktemp("checkpoints")
    cases = {}
    sd = {v: ref.state_dict_numpy(m) for v, m in hf_models.items()}
    hf_cfg = {v: m.config for v, m in hf_models.items()}

    # transformers save_pretrained folder: config.json + model.safetensors (saved layout).
    hf_models["plain"].save_pretrained(root / "plain_hub_folder")
    cases["plain_folder"] = (
        "plain",
        root / "plain_hub_folder",
        None,
        "transformers",
        "config.json",
    )
    # fundamentalvision training checkpoint with args; nothing else says what it is.
    _save_original(root / "plain.pth", sd["plain"], _original_args(hf_cfg["plain"]))
    cases["plain_original"] = ("plain", root / "plain.pth", None, "original", "args")
    # torch.save of transformers' state dict (in-memory names), config read off the weights.
    torch.save(_torch_tensors(sd["box_refine"]), root / "box_refine.bin")
    cases["box_refine_bin"] = (
        "box_refine",
        root / "box_refine.bin",
        None,
        "transformers",
        "weights",
    )
    # bare original state dict, legacy torch format.
    _save_original(root / "box_refine_original.pth", sd["box_refine"])
    cases["box_refine_original"] = (
        "box_refine",
        root / "box_refine_original.pth",
        None,
        "original",
        "weights",
    )
    # hub (transformers 4, timm backbone) names in safetensors; two-stage needs a config
    # for num_queries: given as the path of a config.json.
    save_file(ref.to_hub_naming(sd["two_stage"]), root / "two_stage.safetensors")
    hf_cfg["two_stage"].to_json_file(root / "two_stage_config.json")
    cases["two_stage_hub"] = (
        "two_stage",
        root / "two_stage.safetensors",
        str(root / "two_stage_config.json"),
        "hub",
        "argument",
    )
    _save_original(root / "two_stage.pth", sd["two_stage"], _original_args(hf_cfg["two_stage"]))
    cases["two_stage_original"] = ("two_stage", root / "two_stage.pth", None, "original", "args")
    # hub-style folder with pytorch_model.bin; config given as a dict.
    folder = root / "single_scale_bin_folder"
    folder.mkdir()
    torch.save(_torch_tensors(ref.to_hub_naming(sd["single_scale"])), folder / "pytorch_model.bin")
    hf_cfg["single_scale"].to_json_file(folder / "config.json")
    cases["single_scale_folder"] = ("single_scale", folder, None, "hub", "config.json")
    save_file(sd["single_scale"], root / "single_scale.safetensors")
    cases["single_scale_safetensors"] = (
        "single_scale",
        root / "single_scale.safetensors",
        hf_cfg["single_scale"].to_dict(),
        "transformers",
        "argument",
    )
    cases["single_scale_bare"] = (
        "single_scale",
        root / "single_scale.safetensors",
        None,
        "transformers",
        "weights",
    )
    return cases


_CONVERT_WITHOUT_TORCH = r"""
import json, sys, warnings
import numpy as np
import jax.numpy as jnp
from deformable_detr_jax.convert import import_pytorch_checkpoint

spec_file, images_file, out_file, info_file = sys.argv[1:]
with open(spec_file) as f:
    spec = json.load(f)
fields = spec.pop("fields")
images = np.load(images_file)
pixels = jnp.asarray(images["pixels"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
mask = jnp.asarray(images["mask"])
arrays, infos = {}, {}
for name, (path, config) in spec.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        imported = import_pytorch_checkpoint(path, config)
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), name
    out = imported.model(pixels, mask)
    for field in fields:
        if getattr(out, field) is not None:
            arrays[f"{name}/{field}"] = np.asarray(getattr(out, field))
    infos[name] = dict(format=imported.format, config_source=imported.config_source,
                       variant=imported.model.config.variant,
                       num_queries=imported.model.config.num_queries,
                       warnings=[str(w.message) for w in caught])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
np.savez(out_file, **arrays)
with open(info_file, "w") as f:
    json.dump(infos, f)
"""


def _subprocess_env():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_every_variant_and_format_without_torch(checkpoints, hf_models, images, tmp_path):
    pixels, mask = images
    spec = {name: (str(path), config) for name, (_, path, config, _, _) in checkpoints.items()}
    spec["fields"] = OUTPUTS
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    np.savez(tmp_path / "images.npz", pixels=pixels, mask=mask)
    subprocess_utils.run(
        [
            sys.executable,
            "-c",
            _CONVERT_WITHOUT_TORCH,
            str(tmp_path / "spec.json"),
            str(tmp_path / "images.npz"),
            str(tmp_path / "out.npz"),
            str(tmp_path / "info.json"),
        ],
        check=True,
        env=_subprocess_env(),
        cwd=tmp_path,
        timeout=600,
    )
    ours = np.load(tmp_path / "out.npz")
    infos = json.loads((tmp_path / "info.json").read_text())
    theirs = {v: _torch_outputs(m, pixels, mask) for v, m in hf_models.items()}
    for name, (variant, _, _, key_format, source) in checkpoints.items():
        info = infos[name]
        assert (info["format"], info["config_source"]) == (key_format, source), name
        assert (
            info["variant"]
            == DeformableDetrConfig.from_hf(hf_models[variant].config.to_dict()).variant
        ), name
        assert info["num_queries"] == TINY["num_queries"], name  # two-stage: from args/config
        dc5_warning = any("DC5" in w for w in info["warnings"])
        assert dc5_warning == (name == "single_scale_bare"), (name, info["warnings"])
        for field, want in theirs[variant].items():
            np.testing.assert_allclose(
                ours[f"{name}/{field}"], want, rtol=RTOL, atol=ATOL, err_msg=f"{name}: {field}"
            )


# ------------------------------------------------------------------------------------------
# Export to transformers.


def _perturbed(model, seed):
    """The model with every parameter and batch-norm statistic moved (numpy noise)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    state = jax.tree.map(lambda x: x + 0.01 * rng.standard_normal(x.shape, np.float32), state)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("variant", list(ref.VARIANTS))
def test_save_pytorch_checkpoint_loads_in_transformers(variant, hf_models, images, tmp_path):
    """A JAX model's weights reach transformers exactly; outputs agree (two variants, the
    other two are covered by the weights' equality and the parity tests)."""
    from transformers import DeformableDetrForObjectDetection as HFModel
    from transformers import DeformableDetrImageProcessor

    config = DeformableDetrConfig.from_hf(_hf_config(variant).to_dict())
    model = convert_state_dict(ref.state_dict_numpy(hf_models[variant]), config)
    model = _perturbed(model, seed=4)
    if variant == "box_refine":
        # independent class heads (as in the original), which transformers 5 would tie
        assert model.class_embed[0] is not model.class_embed[1]
        model.class_embed[1].bias[...] = model.class_embed[1].bias[...] + 0.5
    folder = save_pytorch_checkpoint(model, tmp_path / "hf")
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, info = HFModel.from_pretrained(folder, output_loading_info=True)
        processor = DeformableDetrImageProcessor.from_pretrained(folder)  # the default settings
    assert dict(processor.size) == {"shortest_edge": 800, "longest_edge": 1333}
    np.testing.assert_allclose(processor.image_mean, [0.485, 0.456, 0.406])
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # identical weights, every key transformers has (tied copies included)
    exported = export_state_dict(model)
    loaded = ref.state_dict_numpy(theirs)
    assert {k for k in loaded if not k.endswith("num_batches_tracked")} == set(exported)
    for key, value in exported.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    before = ref.state_dict_numpy(hf_models[variant])
    assert not np.array_equal(loaded["class_embed.0.bias"], before["class_embed.0.bias"])
    if variant in ("box_refine", "two_stage"):
        pixels, mask = images
        ours = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask))
        for field, want in _torch_outputs(theirs.eval(), pixels, mask).items():
            np.testing.assert_allclose(
                np.asarray(getattr(ours, field)), want, rtol=RTOL, atol=ATOL, err_msg=field
            )
    # and back: the folder is a hub-style folder for this package too
    again = load_pytorch_checkpoint(folder)
    assert again.config == DeformableDetrConfig.from_hf(config.to_hf())
    for key, value in export_state_dict(again).items():
        np.testing.assert_array_equal(value, exported[key], err_msg=key)


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_saved_keys_are_what_transformers_saves(variant, hf_models, tmp_path):
    from safetensors.numpy import load_file

    hf_models[variant].save_pretrained(tmp_path / "theirs")
    model = load_pytorch_checkpoint(tmp_path / "theirs")
    save_pytorch_checkpoint(model, tmp_path / "ours")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(ours) == {k for k in theirs if not k.endswith("num_batches_tracked")}
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


# ------------------------------------------------------------------------------------------
# Bad input: typed errors naming the problem, and nothing at DST.


@pytest.fixture(scope="module")
def plain_state_dict(hf_models):
    return ref.state_dict_numpy(hf_models["plain"])


def test_truncated_file(hf_models, tmp_path, capsys):
    import torch

    hf_models["plain"].save_pretrained(tmp_path / "folder")
    data = (tmp_path / "folder" / "model.safetensors").read_bytes()
    (tmp_path / "folder" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_pytorch_checkpoint(tmp_path / "folder")
    assert "truncated" in cli_fails(tmp_path / "folder", tmp_path / "dst", capsys)

    torch.save(_torch_tensors(ref.state_dict_numpy(hf_models["plain"])), tmp_path / "sd.bin")
    data = (tmp_path / "sd.bin").read_bytes()
    (tmp_path / "sd.bin").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointFormatError):
        load_pytorch_checkpoint(tmp_path / "sd.bin")


def test_pickle_with_foreign_global(plain_state_dict, tmp_path, capsys):
    import torch

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    checkpoint = {"model": _torch_tensors(plain_state_dict), "args": Exploit()}
    torch.save(checkpoint, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_pytorch_checkpoint(tmp_path / "evil.pth")
    assert "system" in cli_fails(tmp_path / "evil.pth", tmp_path / "dst", capsys)
    assert not (tmp_path / "pwned").exists()


def _broken(state_dict, kind):
    sd = dict(state_dict)
    key = "model.encoder.layers.1.self_attn.value_proj.weight"
    if kind == "missing":
        del sd[key]
    elif kind == "extra":
        sd["model.encoder.layers.1.self_attn.extra_proj.weight"] = sd[key]
    else:
        sd[key] = np.ascontiguousarray(sd[key][:, :40])
    return sd, {"missing": "missing", "extra": "not in the model", "shape": "wrong shape"}[kind]


@pytest.mark.parametrize("kind", ["missing", "extra", "shape"])
def test_key_problems(kind, plain_state_dict, hf_models, tmp_path, capsys):
    sd, words = _broken(plain_state_dict, kind)
    save_file(sd, tmp_path / "bad.safetensors")
    for config in (None, hf_models["plain"].config.to_dict()):
        with pytest.raises(CheckpointKeyError) as info:
            load_pytorch_checkpoint(tmp_path / "bad.safetensors", config)
        assert "self_attn" in str(info.value) and words in str(info.value)
    err = cli_fails(tmp_path / "bad.safetensors", tmp_path / "out" / "dst", capsys)
    assert words in err
    assert not (tmp_path / "out").exists()  # parent folders it made are removed too


def test_num_labels_mismatch(hf_models, tmp_path, capsys):
    hf_models["plain"].save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    with pytest.raises(ConfigMismatchError, match="num_labels: config says 91, the weights have 5"):
        load_pytorch_checkpoint(tmp_path / "src", preset("deformable-detr"))
    labels = {str(i): f"thing{i}" for i in range(7)}
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "id2label": labels}))
    with pytest.raises(ConfigMismatchError, match="num_labels: config says 7"):
        load_pytorch_checkpoint(tmp_path / "src")
    assert "num_labels" in cli_fails(tmp_path / "src", tmp_path / "dst", capsys)


def test_config_contradicting_the_architecture(plain_state_dict, hf_models, tmp_path):
    save_file(plain_state_dict, tmp_path / "plain.safetensors")
    config = DeformableDetrConfig.from_hf(hf_models["plain"].config.to_dict())
    wrong = config.replace(decoder_layers=3, with_box_refine=True, encoder_n_points=4)
    with pytest.raises(ConfigMismatchError) as info:
        load_pytorch_checkpoint(tmp_path / "plain.safetensors", wrong)
    for field in ("decoder_layers", "with_box_refine", "encoder_n_points"):
        assert field in str(info.value)


def test_config_argument_forms(plain_state_dict, hf_models, tmp_path):
    save_file(plain_state_dict, tmp_path / "plain.safetensors")
    hf_cfg = hf_models["plain"].config
    hf_cfg.to_json_file(tmp_path / "config.json")
    want = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    for config in (
        want,
        hf_cfg.to_dict(),
        tmp_path / "config.json",
        str(tmp_path),
        {f: getattr(want, f) for f in ("d_model", "num_queries", "num_labels")}
        | {
            "backbone_depths": (1, 1, 1, 1),
            "encoder_ffn_dim": 48,
            "decoder_ffn_dim": 48,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_n_points": 2,
            "decoder_n_points": 3,
            "two_stage_num_proposals": 12,
            "backbone_hidden_sizes": (32, 64, 128, 256),
        },
    ):
        model = load_pytorch_checkpoint(tmp_path / "plain.safetensors", config)
        assert model.config.replace(id2label=None) == want.replace(id2label=None), config
    with pytest.raises(TypeError, match="config must be"):
        load_pytorch_checkpoint(tmp_path / "plain.safetensors", 3)


def test_heads_other_than_eight_need_a_config(tmp_path):
    hf_cfg = ref.hf_config(
        depth_layout=BACKBONE,
        **{
            **TINY,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 2,
            "encoder_n_points": 3,
        },
    )
    model = ref.random_hf_model(hf_cfg, seed=2)
    save_file(ref.state_dict_numpy(model), tmp_path / "m.safetensors")
    with pytest.raises(ConfigMismatchError, match="number of heads"):
        load_pytorch_checkpoint(tmp_path / "m.safetensors")
    ours = load_pytorch_checkpoint(tmp_path / "m.safetensors", hf_cfg.to_dict())
    assert (ours.config.encoder_attention_heads, ours.config.decoder_attention_heads) == (4, 2)


def test_existing_destination_is_left_alone(hf_models, tmp_path, capsys):
    model = convert_state_dict(
        ref.state_dict_numpy(hf_models["plain"]),
        DeformableDetrConfig.from_hf(hf_models["plain"].config.to_dict()),
    )
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_pytorch_checkpoint(model, tmp_path / "dst")
    assert os.listdir(tmp_path / "dst") == ["notes.txt"]
    save_pytorch_checkpoint(model, tmp_path / "dst", overwrite=True)
    assert sorted(os.listdir(tmp_path / "dst")) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert sorted(os.listdir(tmp_path)) == ["dst"]  # no temporary folders left


def test_failure_while_writing_leaves_nothing(hf_models, tmp_path, monkeypatch):
    model = convert_state_dict(
        ref.state_dict_numpy(hf_models["plain"]),
        DeformableDetrConfig.from_hf(hf_models["plain"].config.to_dict()),
    )
    write_bytes = pathlib.Path.write_bytes

    def half_written(path, data):
        if path.name != "model.safetensors":
            return write_bytes(path, data)
        write_bytes(path, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_pytorch_checkpoint(model, tmp_path / "dst")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# CLI.


def test_cli_round_trip(checkpoints, hf_models, tmp_path):
    """PyTorch original .pth -> JAX folder -> transformers folder, in subprocesses."""
    from transformers import DeformableDetrForObjectDetection as HFModel

    _, src, _, _, _ = checkpoints["two_stage_original"]
    run = dict(env=_subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    done = subprocess_utils.run(
        [sys.executable, "-m", "deformable_detr_jax.convert", str(src), str(tmp_path / "jax")],
        **run,
    )
    assert done.returncode == 0, done.stderr
    params = sum(p.numel() for p in hf_models["two_stage"].parameters())
    assert done.stdout.strip() == (
        f"converted original checkpoint (variant two-stage, {params / 1e6:.1f}M parameters) "
        f"-> {tmp_path / 'jax'}"
    )
    assert main([str(tmp_path / "jax"), str(tmp_path / "hf"), "--to", "pytorch"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = HFModel.from_pretrained(tmp_path / "hf")
    for key, value in ref.state_dict_numpy(hf_models["two_stage"]).items():
        np.testing.assert_array_equal(ref.state_dict_numpy(theirs)[key], value, err_msg=key)

    failed = subprocess_utils.run(
        [
            sys.executable,
            "-m",
            "deformable_detr_jax.convert",
            str(tmp_path / "missing.pth"),
            str(tmp_path / "dst"),
        ],
        **run,
    )
    assert failed.returncode == 2
    assert failed.stdout == ""
    assert failed.stderr.startswith("error: no model folder or weights file at")
    assert not (tmp_path / "dst").exists()


def test_cli_options(checkpoints, tmp_path, capsys):
    _, folder, _, _, _ = checkpoints["plain_folder"]
    assert main([str(folder), str(tmp_path / "a"), "--to", "pytorch"]) == 0
    assert capsys.readouterr().out.startswith("converted transformers checkpoint (variant plain")
    # a config that contradicts the weights, from the command line
    preset_file = tmp_path / "coco.json"
    preset_file.write_text(json.dumps(preset("deformable-detr").to_hf()))
    err = cli_fails(folder, tmp_path / "b", capsys, "--config", str(preset_file))
    assert "num_labels" in err
    # a JAX folder takes no config
    assert main([str(folder), str(tmp_path / "jax")]) == 0
    capsys.readouterr()
    assert "PyTorch checkpoints only" in cli_fails(
        tmp_path / "jax", tmp_path / "c", capsys, "--config", str(preset_file)
    )
