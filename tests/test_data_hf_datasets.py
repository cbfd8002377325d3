"""`HfDatasetsSource` (`data/hf_datasets.py`): a Hugging Face `datasets` dataset in the
transformers object-detection guide's layout, written here with `datasets` (`save_to_disk`), read
back as the model's targets, checked against an independent conversion and against
`CocoJsonSource` on the same data written as COCO json; shards, invalid boxes, undecodable
images, one-line errors, a short `train()` and the command line."""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import re
import sys

import datasets
import numpy as np
import PIL.Image
import pytest

from deformable_detr_jax.data import (
    AugmentConfig,
    CocoJsonSource,
    DataError,
    HfDatasetsSource,
    InvalidBoxError,
    make_batches,
)
from deformable_detr_jax.processing.image_processor import ImageError
from deformable_detr_jax.training import ConfigError, recipes, settings, setup, train
from deformable_detr_jax.training.metrics import read_jsonl
from tests import subprocess_utils
from tests.helpers import one_error_line
from tests.test_settings import ROOT

NAMES = ("Coverall", "Face_Shield", "Gloves", "Goggles", "Mask")
NUM_TRAIN, NUM_TEST = 10, 3
BROKEN = 3  # the training row whose image bytes are no image
# (row, object index) -> an invalid box [x, y, w, h] put there, and check_xywh's reason
INVALID = {
    (1, 0): ([4.0, 5.0, 0.0, 6.0], "zero width"),
    (4, 1): ([3.0, 2.0, 5.0, -4.0], "negative height"),
    (6, 0): ([500.0, 3.0, 5.0, 5.0], "outside"),
    (8, 2): ([math.nan, 3.0, 5.0, 5.0], "not finite"),
}
SMALL = AugmentConfig().scaled(0.2)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _rows(rng: np.random.Generator, count: int, first_id: int, invalid: dict, broken=None):
    """`count` examples in the guide's layout (objects as a dict of lists), plus what the test
    expects of each: the decoded image and the valid (float32) boxes and categories."""
    rows, truth = [], []
    for row in range(count):
        height, width = (int(v) for v in rng.integers(24, 72, size=2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        data = _encode(pixels, "PNG" if row % 2 else "JPEG")
        n = max([int(rng.integers(1, 4))] + [k + 2 for r, k in invalid if r == row])
        xy = rng.uniform(0, 0.8, (n, 2)) * (width, height)
        wh = rng.uniform(0.1, 0.6, (n, 2)) * (width, height)  # some reach past the edge
        boxes = np.concatenate([xy, wh], axis=1).astype(np.float32)
        categories = rng.integers(0, len(NAMES), n)
        valid = np.ones(n, dtype=bool)
        for (r, k), (box, _) in invalid.items():
            if r == row:
                boxes[k], valid[k] = box, False
        # the image the source should give: the pixels of a PNG, PIL's decoding of a JPEG
        image = pixels if row % 2 else np.asarray(PIL.Image.open(io.BytesIO(data)))
        if row == broken:
            data, image = b"\x89PNG\r\n\x1a\n but not an image", None
        rows.append(
            {
                "image_id": first_id + 7 * row,
                "image": {"bytes": data, "path": None},
                "width": width,
                "height": height,
                "objects": {
                    "id": list(range(100 * row, 100 * row + n)),
                    "area": [float(b[2] * b[3]) for b in boxes],
                    "bbox": boxes.tolist(),
                    "category": categories.tolist(),
                },
            }
        )
        truth.append((image, boxes[valid], categories[valid]))
    return rows, truth


def _features(layout: str = "dict", sizes: bool = True):
    objects = {
        "id": datasets.Value("int64"),
        "area": datasets.Value("float32"),
        "bbox": datasets.List(datasets.Value("float32"), length=4),
        "category": datasets.ClassLabel(names=list(NAMES)),
    }
    columns = {"image_id": datasets.Value("int64"), "image": datasets.Image()}
    if sizes:
        columns.update(width=datasets.Value("int32"), height=datasets.Value("int32"))
    # the guide's Sequence({...}) (a dict of lists), or a list of dicts
    columns["objects"] = datasets.Sequence(objects) if layout == "dict" else datasets.List(objects)
    return datasets.Features(columns)


def _dataset(rows, layout="dict", sizes=True):
    if layout == "list":
        rows = [dict(r, objects=_as_list_of_dicts(r["objects"])) for r in rows]
    if not sizes:
        rows = [{k: v for k, v in r.items() if k not in ("width", "height")} for r in rows]
    return datasets.Dataset.from_list(rows, features=_features(layout, sizes))


def _as_list_of_dicts(objects):
    keys = list(objects)
    return [dict(zip(keys, values)) for values in zip(*objects.values())]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A DatasetDict (train with invalid boxes and one undecodable image, test) saved to disk,
    and what each row should give."""
    rng = np.random.default_rng(2026)
    folder = tmp_path_factory.mktemp("hf") / "cppe-like"
    train_rows, train_truth = _rows(rng, NUM_TRAIN, 11, INVALID, broken=BROKEN)
    test_rows, test_truth = _rows(rng, NUM_TEST, 900, {})
    dataset = datasets.DatasetDict(train=_dataset(train_rows), test=_dataset(test_rows))
    dataset.save_to_disk(str(folder))
    return {
        "folder": folder,
        "rows": {"train": train_rows, "test": test_rows},
        "truth": {"train": train_truth, "test": test_truth},
    }


def _expected_target(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO xywh pixels -> cxcywh normalised, clipped to the image, empty ones dropped (float64,
    written out here independently of the package)."""
    b = boxes.astype(np.float64).reshape(-1, 4)
    x0, y0 = np.clip(b[:, 0], 0, width), np.clip(b[:, 1], 0, height)
    x1, y1 = np.clip(b[:, 0] + b[:, 2], 0, width), np.clip(b[:, 1] + b[:, 3], 0, height)
    keep = (x1 > x0) & (y1 > y0)
    out = np.stack(
        [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], 1
    )
    return out[keep], keep


def _check_records(source, rows, truth):
    for index, (row, (image, boxes, categories)) in enumerate(zip(rows, truth)):
        if image is None:
            with pytest.raises(ImageError, match=r"\[3\] \(image id 32\): cannot be read"):
                source[index]
            continue
        record = source[index]
        np.testing.assert_array_equal(record["image"], image)
        expected, keep = _expected_target(boxes, row["height"], row["width"])
        np.testing.assert_allclose(record["boxes"], expected, atol=2e-6)
        np.testing.assert_array_equal(record["labels"], categories[keep])
        assert record["labels"].dtype == np.int32 and record["boxes"].dtype == np.float32
        assert record["image_id"] == row["image_id"]


def test_the_records_are_the_boxes_labels_and_images_written(written, caplog):
    with caplog.at_level(logging.WARNING):
        source = HfDatasetsSource(str(written["folder"]), "train")
    assert len(source) == NUM_TRAIN
    assert source.label_names == NAMES and source.num_labels == len(NAMES)
    _check_records(source, written["rows"]["train"], written["truth"]["train"])
    # the invalid boxes: counted and named where they are, in one warning
    assert len(source.invalid_boxes) == len(INVALID)
    for (row, k), (_, reason) in INVALID.items():
        assert any(
            where.endswith(f"[{row}] object {k}") and reason in why
            for where, why in source.invalid_boxes.found
        ), source.invalid_boxes.found
    assert f"dropped {len(INVALID)} invalid box(es)" in caplog.text
    test = HfDatasetsSource(str(written["folder"]), "test")
    _check_records(test, written["rows"]["test"], written["truth"]["test"])
    assert len(test.invalid_boxes) == 0
    # grain's worker processes get the source pickled
    _check_records(
        pickle.loads(pickle.dumps(test)), written["rows"]["test"], written["truth"]["test"]
    )


def test_the_same_as_coco_json_on_the_same_data(written, tmp_path):
    """The train split written as a COCO json and image files reads back identically."""
    rows = written["rows"]["train"]
    images, annotations = [], []
    for index, row in enumerate(rows):
        name = f"{index:03d}.img"
        (tmp_path / name).write_bytes(row["image"]["bytes"])
        images.append(
            {"id": row["image_id"], "file_name": name, **{k: row[k] for k in ("width", "height")}}
        )
        objects = row["objects"]
        for ann_id, bbox, category in zip(objects["id"], objects["bbox"], objects["category"]):
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": row["image_id"],
                    "bbox": bbox,
                    "category_id": category + 1,
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]
    path = tmp_path / "train.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    coco = CocoJsonSource(tmp_path, path, label_mode="contiguous")
    source = HfDatasetsSource(str(written["folder"]), "train")
    assert coco.label_names == source.label_names
    assert len(coco.invalid_boxes) == len(source.invalid_boxes) == len(INVALID)
    for index in range(len(rows)):
        if index == BROKEN:
            for either in (coco, source):
                with pytest.raises(ImageError):
                    either[index]
            continue
        ours, theirs = source[index], coco[index]
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_a_list_of_dicts_without_sizes_reads_the_same_and_checks_boxes_when_read(
    written, tmp_path, caplog
):
    rows = written["rows"]["train"]
    folder = tmp_path / "list"
    _dataset(rows, layout="list", sizes=False).save_to_disk(str(folder))  # one Dataset
    source = HfDatasetsSource(str(folder), "train")
    assert source.label_names == NAMES
    assert len(source.invalid_boxes) == 0  # no sizes: nothing is checked before reading
    with caplog.at_level(logging.WARNING):
        _check_records(source, rows, written["truth"]["train"])
    assert len(source.invalid_boxes) == len(INVALID)
    assert "dropped 1 invalid box(es)" in caplog.text


def test_strict_makes_an_invalid_box_an_error(written):
    with pytest.raises(InvalidBoxError, match=r"\[1\] object 0: invalid box: zero width"):
        HfDatasetsSource(str(written["folder"]), "train", strict=True)


def test_an_image_of_another_size_is_skipped_and_ids_that_do_not_fit_are_row_numbers(
    written, tmp_path
):
    rows = [dict(r, image_id=5) for r in written["rows"]["test"]]  # the same id three times
    rows[1]["width"] += 1
    folder = tmp_path / "odd"
    _dataset(rows).save_to_disk(str(folder))
    source = HfDatasetsSource(str(folder), "train")
    assert [source[i]["image_id"] for i in (0, 2)] == [0, 2]
    height, width = rows[1]["height"], rows[1]["width"] - 1
    with pytest.raises(
        ImageError,
        match=rf"train\[1\] \(image id 1\) is {height} x {width} \(height x width\) but its "
        rf"height and width columns say {height} x {width + 1}$",
    ):
        source[1]


def _valid_ids(batches):
    return [int(i) for b in batches for i, v in zip(b["image_id"], b["valid"]) if v]


def test_shards_split_the_examples_without_overlap_or_loss_and_skip_the_broken_image(written):
    source = HfDatasetsSource(str(written["folder"]), "train")
    readable = [r["image_id"] for i, r in enumerate(written["rows"]["train"]) if i != BROKEN]
    shards, skipped = [], 0
    for rank in range(3):
        batches = make_batches(
            source,
            batch_size=2,
            train=False,
            augment=SMALL,
            process_index=rank,
            process_count=3,
            backend="python",
            num_threads=0,
        )
        shards.append(_valid_ids(batches))
        skipped += batches.stats["skipped_images"]
    assert skipped == 1
    assert sorted(sum(shards, [])) == sorted(readable)
    assert all(len(set(a) & set(b)) == 0 for a in shards for b in shards if a is not b)
    # training: each process reads its fixed shard of rows process_index::process_count
    for rank in range(2):
        batches = make_batches(
            source,
            batch_size=2,
            augment=SMALL,
            seed=1,
            backend="python",
            num_threads=0,
            process_index=rank,
            process_count=2,
            num_epochs=1,
        )
        ids = _valid_ids(batches)
        rows = written["rows"]["train"]
        shard = {rows[i]["image_id"] for i in range(rank, NUM_TRAIN, 2) if i != BROKEN}
        assert set(ids) <= shard and len(ids) == len(set(ids)) == 4
        assert batches.stats["skipped_images"] == (1 if BROKEN % 2 == rank else 0)


def test_a_hub_id_goes_to_load_dataset_with_its_revision(written, monkeypatch):
    calls = []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.load_from_disk(str(written["folder"]))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = HfDatasetsSource("someone/cppe-like", "test", revision="v1.0")
    assert calls == [("someone/cppe-like", {"revision": "v1.0"})]
    _check_records(source, written["rows"]["test"], written["truth"]["test"])

    def offline(name, **kwargs):
        raise ConnectionError("no network\nat all")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError) as info:
        HfDatasetsSource("cppe-5")
    assert "datasets.load_dataset('cppe-5') failed (ConnectionError: no network at all)" in str(
        info.value
    )
    assert "\n" not in str(info.value)


def _bad_input(case: str, written, tmp_path) -> tuple[str, str, str | None]:
    """(path, split, revision) of each bad input."""
    folder, split, revision = written["folder"], "train", None
    image = {"bytes": _encode(np.full((4, 4, 3), 9, np.uint8), "PNG"), "path": None}
    one = {"image": image, "objects": {"bbox": [[1.0, 1.0, 2.0, 2.0]], "category": [1]}}
    rows, features = None, None
    if case == "no_objects":
        rows = [{"image": image, "boxes": [[1.0, 1.0, 2.0, 2.0]]}]
        boxes = datasets.List(datasets.List(datasets.Value("float32")))
        features = datasets.Features(image=datasets.Image(), boxes=boxes)
    elif case in ("outside", "no_names"):
        bad = dict(one, objects={"bbox": [[1.0, 1.0, 2.0, 2.0]], "category": [-1]})
        rows = [one, bad] if case == "outside" else [one]
        category = datasets.ClassLabel(names=list(NAMES))
        category = category if case == "outside" else datasets.Value("int64")
        box = datasets.List(datasets.Value("float32"), length=4)
        objects = datasets.Sequence({"bbox": box, "category": category})
        features = datasets.Features(image=datasets.Image(), objects=objects)
    elif case == "no_split":
        split = "validation"
    elif case == "one_split":  # a single Dataset saved, with its split's name
        rows, features = written["rows"]["test"], _features()
    elif case == "a_file":
        folder = tmp_path / "data.parquet"
        folder.write_bytes(b"PAR1")
    elif case == "absolute":
        folder = tmp_path / "no" / "such" / "folder"
    elif case == "revision":
        revision = "main"
    if rows is not None:
        folder = tmp_path / case
        named = {"split": "test"} if case == "one_split" else {}
        datasets.Dataset.from_list(rows, features=features, **named).save_to_disk(str(folder))
    return str(folder), split, revision


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "no_objects",
            r"has no column 'objects'; its columns are \['image', 'boxes'\]; an example needs "
            r"the layout of the transformers object-detection guide's cppe-5",
        ),
        ("outside", r"objects\.category ids -1 \(train\[1\]\) are outside the 5 label names \["),
        ("no_split", r"has no split 'validation'; its splits are \['test', 'train'\]$"),
        ("one_split", r"holds one split, 'test', not 'train': use the split 'test'"),
        ("a_file", r"is neither a folder nor a Hugging Face Hub dataset id; point it at"),
        ("absolute", r"is neither a folder nor a Hugging Face Hub dataset id"),
        ("revision", r"revision='main' is for a hub dataset id, but path=.* is a local folder"),
        ("no_names", r"objects\.category is .*, not a ClassLabel with names"),
    ],
)
def test_bad_input_is_one_line_naming_it(written, tmp_path, case, message):
    path, split, revision = _bad_input(case, written, tmp_path)
    with pytest.raises((DataError, ValueError, FileNotFoundError)) as info:
        HfDatasetsSource(path, split, revision=revision)
    text = str(info.value)
    assert "\n" not in text
    assert re.search(message, text), text


def _run_settings(folder, **changes):
    """shapes_tiny switched to this source; `changes`: `group__key=value` (any depth)."""
    config = recipes.shapes_tiny()
    config.data.source = "hf_datasets"
    config.data.hf_datasets.path = str(folder)
    for name, value in changes.items():
        *groups, key = name.split("__")
        group = config
        for part in groups:
            group = getattr(group, part)
        setattr(group, key, value)
    return config


def test_the_settings_make_the_source_and_name_the_setting_in_errors(written):
    run = settings.parse(_run_settings(written["folder"]))
    assert run.data.hf_datasets == settings.HfDatasetsSettings(
        path=str(written["folder"]), train_split="train", eval_split="test", revision=""
    )
    assert len(setup.make_source(run.data, "train")) == NUM_TRAIN
    assert len(setup.make_source(run.data, "eval")) == NUM_TEST
    may_change = {
        name: settings.field_of(f"data.hf_datasets.{name}").metadata.get("may_change", False)
        for name in ("path", "train_split", "eval_split", "revision")
    }
    assert may_change == {"path": True, "train_split": False, "eval_split": True, "revision": False}
    empty = settings.parse(_run_settings(""))
    with pytest.raises(ConfigError, match=r"^data\.hf_datasets\.path must be set: a folder"):
        setup.make_source(empty.data, "train")
    missing = settings.parse(_run_settings(written["folder"], data__hf_datasets__eval_split="val"))
    with pytest.raises(ConfigError, match=r"^data\.hf_datasets \(eval split\): .*no split 'val'"):
        setup.make_source(missing.data, "eval")


def test_without_datasets_the_package_imports_and_the_source_says_what_to_install(
    written, monkeypatch
):
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "import deformable_detr_jax.data as d\n"
        "try:\n"
        f"    d.HfDatasetsSource({str(written['folder'])!r})\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess_utils.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'pip install "deformable_detr_jax[datasets]"' in result.stdout
    monkeypatch.setitem(sys.modules, "datasets", None)
    run = settings.parse(_run_settings(written["folder"]))
    with pytest.raises(
        ConfigError, match=r'datasets package: pip install "deformable_detr_jax\[datasets\]"'
    ):
        setup.make_source(run.data, "train")


def test_train_runs_on_the_shapes_tiny_recipe_switched_to_this_source(written, tmp_path):
    config = _run_settings(
        written["folder"],
        data__batch_size=2,
        data__num_threads=1,
        data__backend="python",
        train__num_steps=2,
        train__log_every=1,
        train__checkpoint_every=0,
        train__tensorboard=False,
        train__async_checkpoints=False,
        train__eval_at_end=False,  # the evaluation step's compilation: as long again
        train__compilation_cache_dir="",
        # the recipe's data and training path; a shallower model to compile in the test's time
        model__encoder_layers=1,
        model__decoder_layers=1,
        model__num_feature_levels=1,
    )
    result = train(config, tmp_path / "run")
    losses = [
        r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"
    ]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert result.step == 2
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert [saved["id2label"][str(k)] for k in range(len(NAMES))] == list(NAMES)


def test_the_command_line_reads_the_new_settings(written, tmp_path):
    """train.py with the source switched on the command line: the folder is opened (its splits
    named) before anything is compiled; one error line, exit 2."""
    result = subprocess_utils.run(
        [sys.executable, "train.py", "--config", "configs/shapes_tiny.py"]
        + ["--workdir", str(tmp_path / "run"), "--config.data.source=hf_datasets"]
        + [f"--config.data.hf_datasets.path={written['folder']}"]
        + ["--config.data.hf_datasets.eval_split=validation"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert line.startswith("error: configuration: data.hf_datasets (eval split): ")
    assert "has no split 'validation'; its splits are ['test', 'train']" in line
