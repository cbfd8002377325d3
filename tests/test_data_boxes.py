"""Invalid boxes in every source: dropped only with a count and a log line naming each one
(file:line, or image and annotation id), or an error with `strict=True` / `data.strict`."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from deformable_detr_jax.data import CocoJsonSource, InvalidBoxError, YoloFolderSource
from deformable_detr_jax.data.box_checks import check_xywh, check_xyxy
from tests.test_data import COCO_JSON, FIXTURES, coco_folder

LOGGER = "deformable_detr_jax.data"


def test_box_checks_name_each_kind_of_invalid_box():
    # COCO pixels in a 100 (wide) x 50 (tall) image
    assert check_xywh(10, 10, 20, 20, 100, 50) is None
    assert check_xywh(90, 40, 30, 30, 100, 50) is None  # partly outside: clipped, kept
    assert "not finite" in check_xywh(10, math.nan, 20, 20, 100, 50)
    assert "not finite" in check_xywh(10, 10, math.inf, 20, 100, 50)
    assert "negative width" in check_xywh(10, 10, -3, 20, 100, 50)
    assert "negative height" in check_xywh(10, 10, 3, -0.5, 100, 50)
    assert "zero width" in check_xywh(10, 10, 0, 20, 100, 50)
    assert "zero height" in check_xywh(10, 10, 5, 0, 100, 50)
    assert "outside the 100 x 50 image" in check_xywh(100, 10, 5, 5, 100, 50)  # right of it
    assert "outside" in check_xywh(10, -30, 5, 20, 100, 50)  # above it
    # normalised corners
    assert check_xyxy(0.1, 0.2, 0.3, 0.4) is None
    assert check_xyxy(-0.2, 0.2, 0.3, 1.4) is None  # partly outside
    assert "negative width" in check_xyxy(0.5, 0.2, 0.3, 0.4)
    assert "zero height" in check_xyxy(0.1, 0.4, 0.3, 0.4)
    assert "not finite" in check_xyxy(0.1, math.nan, 0.3, 0.4)
    assert "outside" in check_xyxy(1.1, 0.2, 1.3, 0.4)


BAD_COCO = [  # (image id, bbox, what the log says); image 86 is 512 wide, 640 tall
    (86, [10.0, 20.0, -30.0, 40.0], "negative width"),
    (86, [10.0, 20.0, 30.0, 0.0], "zero height"),
    (472, [float("nan"), 5.0, 10.0, 10.0], "not finite"),
    (562, [500.0, 700.0, 20.0, 20.0], "outside the 423 x 640 image"),
]


def _coco_with_bad_boxes(tmp_path):
    images, path, data = coco_folder(tmp_path)
    for number, (image_id, bbox, _) in enumerate(BAD_COCO):
        data["annotations"].append(
            {
                "id": 900 + number,
                "image_id": image_id,
                "category_id": 1,
                "bbox": bbox,
                "area": 1.0,
                "iscrowd": 0,
            }
        )
    path.write_text(json.dumps(data))  # json writes NaN as NaN, which json.loads reads
    return images, path


def test_coco_json_invalid_boxes_are_counted_logged_and_dropped(tmp_path, caplog):
    images, path = _coco_with_bad_boxes(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        source = CocoJsonSource(images, path)
    assert len(source.invalid_boxes) == len(BAD_COCO)
    for number, (image_id, _, reason) in enumerate(BAD_COCO):
        where, why = source.invalid_boxes.found[number]
        assert where.startswith(f"annotation id {900 + number} of image id {image_id} (")
        assert reason in why
        assert where in caplog.text
    assert f"dropped {len(BAD_COCO)} invalid box(es)" in caplog.text
    # the valid boxes are exactly those of the fixture json, image by image
    reference = CocoJsonSource(FIXTURES, COCO_JSON)
    assert len(reference.invalid_boxes) == 0
    for index in range(len(source)):
        np.testing.assert_array_equal(source[index]["boxes"], reference[index]["boxes"])
        np.testing.assert_array_equal(source[index]["labels"], reference[index]["labels"])


def test_coco_json_strict_makes_an_invalid_box_an_error(tmp_path):
    images, path = _coco_with_bad_boxes(tmp_path)
    with pytest.raises(InvalidBoxError, match=r"annotation id 900 of image id 86 .*negative width"):
        CocoJsonSource(images, path, strict=True)
    with pytest.raises(ValueError, match="a bbox is"):  # a bbox of 3 numbers: always an error
        data = json.loads(path.read_text())
        data["annotations"][0]["bbox"] = [1, 2, 3]
        path.write_text(json.dumps(data))
        CocoJsonSource(images, path)


def _yolo_folder(tmp_path, lines):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "names.yaml").write_text("names: [a, b, c]\n")
    for name in ("000000000086.jpg", "000000000472.jpg"):
        (tmp_path / "images" / "val" / name).write_bytes((FIXTURES / name).read_bytes())
    (tmp_path / "labels" / "val" / "000000000086.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels" / "val" / "000000000472.txt").write_text("2 0.5 0.5 0.2 0.2\n")


def test_yolo_invalid_boxes_are_counted_logged_by_file_and_line(tmp_path, caplog):
    _yolo_folder(
        tmp_path,
        [
            "0 0.5 0.5 0.2 0.3",  # 1: valid
            "1 0.5 0.5 -0.2 0.3",  # 2: negative width (the case)
            "",  # 3: empty, skipped
            "2 0.4 0.4 0.0 0.1",  # 4: zero width
            "1 1.5 0.5 0.2 0.2",  # 5: outside the image
            "0 nan 0.5 0.2 0.2",  # 6: NaN
            "1 0.95 0.5 0.2 0.2",
        ],
    )  # 7: partly outside: clipped, kept
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        source = YoloFolderSource(tmp_path, split="val")
    label_file = tmp_path / "labels" / "val" / "000000000086.txt"
    found = dict(source.invalid_boxes.found)
    assert set(found) == {f"{label_file}:{n}" for n in (2, 4, 5, 6)}
    assert "negative width" in found[f"{label_file}:2"]
    assert "zero width" in found[f"{label_file}:4"]
    assert "outside the image" in found[f"{label_file}:5"]
    assert "not finite" in found[f"{label_file}:6"]
    assert f"{label_file}:2: negative width" in caplog.text
    record = source[0]
    assert record["labels"].tolist() == [0, 1]
    np.testing.assert_allclose(
        record["boxes"], [[0.5, 0.5, 0.2, 0.3], [0.925, 0.5, 0.15, 0.2]], atol=1e-6
    )
    with pytest.raises(InvalidBoxError, match=rf"{label_file}:2: invalid box: negative width"):
        YoloFolderSource(tmp_path, split="val", strict=True)


def test_tfds_invalid_boxes_are_logged_when_read(monkeypatch, caplog):
    tfds = pytest.importorskip("tensorflow_datasets")
    from deformable_detr_jax.data import TfdsCocoSource

    rng = np.random.default_rng(0)
    example = {
        "image": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        "image/id": 77,
        "objects": {  # ymin, xmin, ymax, xmax normalised
            "bbox": np.asarray(
                [
                    [0.1, 0.1, 0.5, 0.6],
                    [0.3, 0.6, 0.3, 0.9],
                    [0.2, 0.5, 0.4, 0.2],
                    [0.1, 0.1, 0.9, 0.9],
                ],
                np.float32,
            ),
            "label": np.asarray([1, 2, 3, 4]),
            "is_crowd": np.asarray([False, False, False, True]),
        },
    }
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: [example])
    source = TfdsCocoSource("train")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        record = source[0]
    assert record["labels"].tolist() == [1]  # object 0; 1, 2 invalid; 3 crowd
    np.testing.assert_allclose(record["boxes"], [[0.35, 0.3, 0.5, 0.4]], atol=1e-6)
    where = [w for w, _ in source.invalid_boxes.found]
    assert where == [
        "TFDS coco/2017:1.1.0 train[0] (image id 77) object 1",
        "TFDS coco/2017:1.1.0 train[0] (image id 77) object 2",
    ]
    assert "zero height" in caplog.text and "negative width" in caplog.text
    with pytest.raises(InvalidBoxError, match=r"train\[0\] \(image id 77\) object 1"):
        TfdsCocoSource("train", strict=True)[0]


def test_data_strict_stops_train_before_compiling(tmp_path, monkeypatch):
    from deformable_detr_jax.training import ConfigError, train
    from tests.training_workers import get_config

    _yolo_folder(tmp_path / "yolo", ["0 0.5 0.5 0.2 0.3", "1 0.5 0.5 -0.2 0.3"])
    config = get_config()
    config.data.source = "yolo"
    config.data.yolo.folder = str(tmp_path / "yolo")
    config.data.yolo.train_split = config.data.yolo.eval_split = "val"
    config.data.strict = True

    def fail(*args, **kwargs):
        raise AssertionError("the train step was built before the invalid box was reported")

    monkeypatch.setattr("deformable_detr_jax.training.loop.make_train_step", fail)
    label_file = tmp_path / "yolo" / "labels" / "val" / "000000000086.txt"
    with pytest.raises(ConfigError, match=rf"data\.yolo \(train split\): {label_file}:2: invalid"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
