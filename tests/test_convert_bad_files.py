"""`load_pytorch_checkpoint` and the convert CLI on files that are not checkpoints: typed
errors naming the problem, exit status 2, nothing left at DST (bad checkpoints written by
torch and transformers: tests/test_convert_loading.py)."""

from __future__ import annotations

import os
import pathlib

import pytest

from deformable_detr_jax.convert import CheckpointFormatError, load_pytorch_checkpoint
from deformable_detr_jax.convert.__main__ import main


def cli_fails(src, dst, capsys, *extra):
    capsys.readouterr()
    assert main([str(src), str(dst), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert not os.path.exists(dst)
    parent = pathlib.Path(dst).parent
    while not parent.exists():
        parent = parent.parent
    assert not [p for p in os.listdir(parent) if p.startswith(".")], "temporary folder left"
    return err


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image"),
        (b'{"model_type": "deformable_detr"}\n', "text file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS"),
    ],
)
def test_wrong_file_type(content, pattern, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=pattern):
        load_pytorch_checkpoint(tmp_path / "model.safetensors")
    assert pattern in cli_fails(tmp_path / "model.safetensors", tmp_path / "dst", capsys)


def test_folder_without_weights(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="no weights.*model.safetensors"):
        load_pytorch_checkpoint(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="no model folder or weights file at"):
        load_pytorch_checkpoint(tmp_path / "nothing.pth")
    err = cli_fails(tmp_path / "nothing.pth", tmp_path / "dst", capsys)
    assert "no model folder or weights file at" in err
