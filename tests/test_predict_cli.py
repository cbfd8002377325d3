"""`python -m deformable_detr_jax.predict`: detections printed, annotated images written, a bad
image reported without stopping the others, exit status."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import numpy as np
import PIL.Image
import pytest

from deformable_detr_jax.checkpoint import save_pretrained
from deformable_detr_jax.cli.predict import main
from tests import subprocess_utils
from tests.test_inference import PHOTO_LANDSCAPE, PHOTO_PORTRAIT, small_processor, tiny_model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    save_pretrained(tiny_model(), folder, processor=small_processor())
    return folder


def test_cli_reports_bad_images_and_goes_on(model_folder, tmp_path, capsys):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.png"
    broken.write_text("not a png")
    # two inputs with the same stem: the second annotated image gets a suffix
    other = tmp_path / "sub" / PHOTO_PORTRAIT.name
    other.parent.mkdir()
    shutil.copy(PHOTO_PORTRAIT, other)
    images = [PHOTO_PORTRAIT, empty, PHOTO_LANDSCAPE, broken, other]
    out = tmp_path / "out"
    status = main(
        ["--model", str(model_folder), *map(str, images), "--out", str(out), "--threshold", "0.02"]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert f"image 1 ('{empty}'): the file is empty" in captured.err
    assert f"image 3 ('{broken}'): cannot be read as an image" in captured.err
    assert "3 of 5 image(s) processed" in captured.err
    for path in (PHOTO_PORTRAIT, PHOTO_LANDSCAPE, other):
        assert f"{path}: " in captured.out
    assert "detection(s) in a 640x512 image" in captured.out
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [out, *out.iterdir()]:  # the umask's modes
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    written = sorted(p.name for p in out.iterdir())
    stem = PHOTO_PORTRAIT.stem
    assert written == sorted([f"{stem}.png", f"{stem}-1.png", f"{PHOTO_LANDSCAPE.stem}.png"])
    with PIL.Image.open(out / f"{stem}.png") as annotated, PIL.Image.open(PHOTO_PORTRAIT) as src:
        assert annotated.size == src.size
        assert not np.array_equal(np.asarray(annotated), np.asarray(src.convert("RGB")))


def test_cli_json_and_success_status(model_folder, capsys):
    status = main(
        ["--model", str(model_folder), str(PHOTO_PORTRAIT), "--json", "--threshold", "0.03"]
    )
    assert status == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["image"] == str(PHOTO_PORTRAIT)
    assert (record["height"], record["width"]) == (640, 512)
    assert record["detections"] and all(d["score"] > 0.03 for d in record["detections"])
    assert {d["label"] for d in record["detections"]} <= {"cat", "dog", "bicycle", "person", "car"}


def test_cli_takes_the_images_of_a_folder(model_folder, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(PHOTO_PORTRAIT, folder / "b_portrait.png")
    shutil.copy(PHOTO_LANDSCAPE, folder / "a_landscape.JPG")  # any case of the suffix
    shutil.copy(PHOTO_PORTRAIT, folder / "sub" / "0_inside.jpg")  # not recursive
    (folder / "notes.txt").write_text("not an image")
    status = main(["--model", str(model_folder), str(folder), "--json", "--threshold", "0.03"])
    assert status == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == [
        str(folder / "a_landscape.JPG"),
        str(folder / "b_portrait.png"),
    ]
    assert [(r["height"], r["width"]) for r in records] == [(336, 448), (640, 512)]


def test_cli_folder_without_images_is_one_error_line(tmp_path, capsys):
    folder = tmp_path / "empty"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "photo.jpg").write_bytes(b"")
    (folder / "readme.md").write_text("no images here")
    # checked before the model is loaded (this one does not exist)
    assert main(["--model", str(tmp_path / "no_model"), str(PHOTO_PORTRAIT), str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {folder}: no images in this folder (it takes .jpg, .jpeg, .png, .bmp, .gif, "
        ".tif, .tiff, .webp files, not subfolders)"
    ]


@pytest.mark.parametrize("threshold", ["1.5", "-0.2", "nan", "high"])
def test_cli_rejects_threshold(model_folder, threshold, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--model", str(model_folder), str(PHOTO_PORTRAIT), "--threshold", threshold])
    assert info.value.code == 2
    assert "threshold must be" in capsys.readouterr().err


def test_cli_missing_model(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), str(PHOTO_PORTRAIT)]) == 2
    assert "cannot load the model" in capsys.readouterr().err


def test_cli_runs_as_module():
    result = subprocess_utils.run(
        [sys.executable, "-m", "deformable_detr_jax.predict", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "--model" in result.stdout and "--threshold" in result.stdout
