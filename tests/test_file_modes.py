"""What the package writes honours the umask: saved folders, converted checkpoints and exports
come out `0o666` / `0o777` less the umask, as `open()` and `mkdir()` would make them, not the
private `0o600` / `0o700` of `tempfile.mkstemp` / `mkdtemp` behind an atomic write."""

from __future__ import annotations

import os
import pathlib
import stat

import numpy as np
import pytest
from flax import nnx

from deformable_detr_jax import file_modes
from deformable_detr_jax.checkpoint import save_pretrained
from deformable_detr_jax.convert import save_pytorch_checkpoint
from deformable_detr_jax.export.common import atomic_output
from deformable_detr_jax.processing.image_processor import ImageProcessor
from deformable_detr_jax.training.train_state import model_from_weights, model_spec, param_name
from tests.training_workers import tiny_model_config

UMASKS = (0o022, 0o002, 0o077)


@pytest.fixture(params=UMASKS, ids=lambda mask: f"umask{mask:03o}")
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def model():
    spec = model_spec(tiny_model_config(), ())
    # random weights from numpy: the model's init would compile for a long while on CPU
    rng = np.random.default_rng(7)
    weights = {
        param_name(path): rng.uniform(-1.0, 1.0, variable.shape).astype(variable.dtype)
        for path, variable in spec.variables
        if not isinstance(variable, nnx.RngState)
    }
    return model_from_weights(spec, weights)


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _wrong_modes(root: pathlib.Path, umask: int) -> list[str]:
    """Every file and folder under `root` (itself included) whose mode is not the umask's."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        if _mode(path) != expected:
            wrong.append(f"{path.relative_to(root.parent)}: {_mode(path):03o} != {expected:03o}")
    return wrong


def test_temporary_files_and_folders_take_the_umask(tmp_path, umask):
    file = file_modes.temporary_file(tmp_path, ".out.", ".partial")
    folder = file_modes.temporary_folder(tmp_path, ".model.", ".tmp")
    assert file.is_file() and file.stat().st_size == 0 and file.name.startswith(".out.")
    assert folder.is_dir() and not any(folder.iterdir()) and folder.name.endswith(".tmp")
    assert _mode(file) == 0o666 & ~umask
    assert _mode(folder) == 0o777 & ~umask
    others = {file_modes.temporary_file(tmp_path, ".out.", ".partial") for _ in range(20)}
    assert len(others) == 20 and file not in others  # a new name every time


def test_an_atomic_export_output_takes_the_umask(tmp_path, umask):
    payload = np.random.default_rng(umask).bytes(1000)
    out = tmp_path / "exports" / "model.stablehlo"
    with atomic_output(out, overwrite=False) as tmp:
        tmp.write_bytes(payload)
    assert out.read_bytes() == payload
    assert _mode(out) == 0o666 & ~umask
    assert [p.name for p in out.parent.iterdir()] == ["model.stablehlo"]  # no temporary left


def test_save_pretrained_folder_takes_the_umask(tmp_path, umask, model):
    processor = ImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    folder = save_pretrained(model, tmp_path / "saved", processor=processor)
    assert (folder / "config.json").is_file() and (folder / "params").is_dir()
    assert _wrong_modes(folder, umask) == []
    # replacing it keeps the umask's modes too
    save_pretrained(model, folder, processor=processor, overwrite=True)
    assert _wrong_modes(folder, umask) == []


def test_converted_checkpoint_folder_takes_the_umask(tmp_path, umask, model):
    folder = save_pytorch_checkpoint(model, tmp_path / "hub_style")
    assert (folder / "model.safetensors").is_file()
    assert _wrong_modes(folder, umask) == []


def test_training_checkpoints_take_the_umask(tmp_path, umask):
    import jax.numpy as jnp

    from deformable_detr_jax.training.checkpointing import Checkpoints
    from deformable_detr_jax.training.train_state import TrainState

    rng = np.random.default_rng(umask)
    state = TrainState(
        step=jnp.asarray(3, jnp.int32),
        params={"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        opt_state={"mu": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        frozen={"b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
        bad_step=jnp.asarray(-1, jnp.int32),
    )
    checkpoints = Checkpoints(tmp_path / "run" / "checkpoints", async_saves=True)
    try:
        checkpoints.save(state, {"index": 3}, {"config": {}})
        checkpoints.wait()
    finally:
        checkpoints.close()
    assert checkpoints.all_steps() == [3]
    assert _wrong_modes(tmp_path / "run", umask) == []
