"""Data: synthetic shapes, COCO-json / YOLO / TFDS sources, DETR augmentations, batching, sharding,
resumption, corrupt images, bad settings.

Real photos: the four in `tests/fixtures/` with `tests/fixtures/coco_json/instances.json`; the whole
coco128 folder (`../shared/data/coco128`) where it exists. TFDS: a real ArrayRecord `coco/2017`
written here from the fixture photos, and `tfds.testing.mock_data`; neither needs TensorFlow.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import numpy as np
import pytest

from deformable_detr_jax.data import (
    COCO_CATEGORY_IDS,
    AugmentConfig,
    CocoJsonSource,
    ShapesSource,
    TfdsCocoSource,
    YoloFolderSource,
    crop,
    eval_transform,
    grain_available,
    hflip,
    make_batches,
    resize_shortest_edge,
    train_transform,
)
from deformable_detr_jax.processing import resize as resize_lib
from deformable_detr_jax.processing.image_processor import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageError,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
COCO_JSON = FIXTURES / "coco_json" / "instances.json"
COCO128 = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"
SMALL = AugmentConfig().scaled(0.2)  # scales 96..160, max 267, crops 80..120
ONE = {"process_index": 0, "process_count": 1}  # a single-process job
BACKENDS = ["python"] + (["grain"] if grain_available() else [])


def _cxcywh_to_pixels(boxes, height, width):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0 = (boxes[:, 0] - boxes[:, 2] / 2) * width, (boxes[:, 1] - boxes[:, 3] / 2) * height
    x1, y1 = (boxes[:, 0] + boxes[:, 2] / 2) * width, (boxes[:, 1] + boxes[:, 3] / 2) * height
    return np.stack([x0, y0, x1, y1], 1)


def _mask_box(mask):
    """Pixel (x0, y0, x1, y1) extent of a bool mask (x1, y1 exclusive)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.asarray([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def _sample_with_masks(source, index):
    record, drawn = source.render(index)
    return {**record, "masks": drawn["masks"]}


def _unnormalise(pixel_values):
    mean = np.asarray(IMAGENET_DEFAULT_MEAN, dtype=np.float32) * 255
    std = np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float32) * 255
    return pixel_values * std + mean


def _batches_equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- shapes


def test_shapes_same_index_same_image():
    source = ShapesSource(50, image_size=(96, 128), seed=7, max_objects=4)
    again = ShapesSource(50, image_size=(96, 128), seed=7, max_objects=4)
    for index in (0, 13, 49):
        a, b = source[index], again[index]
        assert a["image"].shape == (96, 128, 3) and a["image"].dtype == np.uint8
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(source[1]["image"], source[2]["image"])
    assert not np.array_equal(source[1]["image"], ShapesSource(50, (96, 128), seed=8)[1]["image"])
    blobs = ShapesSource(50, image_size=(96, 128), seed=7, max_objects=4, backgrounds=("blobs",))
    assert sum(not np.array_equal(blobs[i]["image"], source[i]["image"]) for i in range(9)) >= 3
    with pytest.raises(IndexError):
        source[50]


def test_shapes_boxes_enclose_drawn_pixels_exactly():
    source = ShapesSource(40, image_size=128, seed=1, min_objects=1, max_objects=4)
    counts = set()
    for index in range(40):
        record, drawn = source.render(index)
        image, boxes = record["image"], record["boxes"]
        counts.add(len(boxes))
        assert 1 <= len(boxes) <= 4 and boxes.dtype == np.float32
        assert set(record["labels"].tolist()) <= {0, 1, 2}
        pixel_boxes = _cxcywh_to_pixels(boxes, 128, 128)
        for box, color, mask in zip(pixel_boxes, drawn["colors"], drawn["masks"]):
            # the shape is exactly the pixels of its colour: found from the image alone
            painted = np.all(image == color, axis=-1)
            assert np.array_equal(painted, mask)
            np.testing.assert_allclose(box, _mask_box(painted), atol=1e-4)
    assert len(counts) > 1


def test_shapes_class_is_the_shape():
    """Fill ratio of the box: circle pi/4, square 1, triangle 1/2."""
    source = ShapesSource(60, image_size=160, seed=2, min_object_size=0.25, max_object_size=0.4)
    ratios = {0: [], 1: [], 2: []}
    for index in range(60):
        record, drawn = source.render(index)
        for label, mask in zip(record["labels"], drawn["masks"]):
            x0, y0, x1, y1 = _mask_box(mask)
            ratios[int(label)].append(mask.sum() / ((x1 - x0) * (y1 - y0)))
    assert all(len(r) >= 5 for r in ratios.values())
    np.testing.assert_allclose(np.mean(ratios[0]), np.pi / 4, atol=0.03)
    np.testing.assert_allclose(np.mean(ratios[1]), 1.0, atol=0.01)
    np.testing.assert_allclose(np.mean(ratios[2]), 0.5, atol=0.04)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 8},
        {"num_images": 0},
        {"min_objects": 3, "max_objects": 2},
        {"min_object_size": 0.5, "max_object_size": 0.2},
        {"min_object_size": 0.01},
        {"backgrounds": ("plaid",)},
    ],
)
def test_shapes_bad_settings(kwargs):
    with pytest.raises(ValueError, match="ShapesSource"):
        ShapesSource(**{"num_images": 4, **kwargs})


# ----------------------------------------------------------------------------- transforms


def test_hflip_twice_is_identity_and_mirrors_boxes():
    sample = _sample_with_masks(ShapesSource(3, 96, seed=4, max_objects=3), 2)
    flipped = hflip(sample)
    np.testing.assert_array_equal(flipped["image"], sample["image"][:, ::-1])
    for box, mask in zip(_cxcywh_to_pixels(flipped["boxes"], 96, 96), flipped["masks"]):
        np.testing.assert_allclose(box, _mask_box(mask), atol=1e-3)
    twice = hflip(flipped)
    for key in ("image", "labels", "masks"):
        np.testing.assert_array_equal(twice[key], sample[key])
    np.testing.assert_allclose(twice["boxes"], sample["boxes"], atol=1e-6)


def test_crop_clips_and_drops_boxes_exactly():
    source = ShapesSource(30, 128, seed=5, min_objects=3, max_objects=4)
    dropped = 0
    for index in range(30):
        sample = _sample_with_masks(source, index)
        out = crop(sample, top=20, left=30, height=70, width=64)
        assert out["image"].shape == (70, 64, 3)
        np.testing.assert_array_equal(out["image"], sample["image"][20:90, 30:94])
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        dropped += len(sample["boxes"]) - len(out["boxes"])
        # DETR's rule: boxes are shifted and clipped to the region; those left empty are dropped
        shifted = _cxcywh_to_pixels(sample["boxes"], 128, 128) - [30, 20, 30, 20]
        clipped = shifted.clip(0, [64, 70, 64, 70])
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        got = _cxcywh_to_pixels(out["boxes"], 70, 64)
        np.testing.assert_allclose(got, clipped[keep], atol=1e-3)
        np.testing.assert_array_equal(out["labels"], sample["labels"][keep])
        for box, mask, label in zip(got, out["masks"], out["labels"]):
            if mask.any():  # what is left of the shape lies in its box; squares fill it
                inner = _mask_box(mask)
                assert (inner[:2] >= box[:2] - 1e-3).all() and (inner[2:] <= box[2:] + 1e-3).all()
                if label == 1:
                    np.testing.assert_allclose(box, inner, atol=1e-3)
    assert dropped > 0
    with pytest.raises(ValueError, match="outside"):
        crop(sample, top=100, left=0, height=64, width=64)


def test_train_transform_keeps_boxes_on_their_objects():
    """Flip, resize, resize + crop + resize: each box stays on its shape's (resized) pixels."""
    source = ShapesSource(40, 128, seed=6, min_objects=2, max_objects=4)
    config = AugmentConfig(
        scales=(96, 144, 200),
        max_size=240,
        crop_prob=0.7,
        crop_resize_scales=(100, 128),
        crop_size=(60, 100),
    )
    sizes, flips_and_crops, checked = set(), 0, 0
    for index in range(40):
        sample = _sample_with_masks(source, index)
        out = train_transform(sample, np.random.default_rng(index), config)
        height, width = out["image"].shape[:2]
        sizes.add((height, width))
        assert min(height, width) in config.scales or max(height, width) == config.max_size
        assert max(height, width) <= config.max_size
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        flips_and_crops += len(out["boxes"]) != len(sample["boxes"])
        boxes = _cxcywh_to_pixels(out["boxes"], height, width)
        tol = 1.0 + 0.02 * max(height, width)  # masks are resized bilinearly and thresholded
        for box, mask, label in zip(boxes, out["masks"], out["labels"]):
            if (box[2] - box[0]) < 4 or (box[3] - box[1]) < 4 or not mask.any():
                continue  # a sliver left by the crop: thresholded masks may lose it
            inner = _mask_box(mask)  # the shape lies in its box (a clipped box may be larger)
            assert (inner[:2] >= box[:2] - tol).all() and (inner[2:] <= box[2:] + tol).all()
            if label == 1:  # a square, clipped or not, fills its box
                np.testing.assert_allclose(box, inner, atol=tol)
            checked += 1
    assert len(sizes) > 3 and flips_and_crops > 0 and checked > 60
    # the same generator state gives the same augmentation
    a = train_transform(source[3], np.random.default_rng(9), config)
    b = train_transform(source[3], np.random.default_rng(9), config)
    assert all(np.array_equal(a[k], b[k]) for k in ("image", "boxes", "labels"))


def test_resize_sizes_follow_detr():
    image = np.random.default_rng(0).integers(1, 255, (226, 640, 3), dtype=np.uint8)
    sample = {
        "image": image,
        "boxes": np.asarray([[0.5, 0.5, 0.2, 0.4]], np.float32),
        "labels": np.asarray([3]),
    }
    out = eval_transform(sample)  # 800 / 1333: the longest edge binds
    assert out["image"].shape[:2] == resize_lib.size_for_shortest_longest((226, 640), 800, 1333)
    assert out["image"].shape[:2] == (471, 1333)  # DETR: round(1333 * 226 / 640) = 471
    np.testing.assert_array_equal(out["boxes"], sample["boxes"])  # normalised: unchanged
    assert resize_shortest_edge(sample, 300)["image"].shape[:2] == (300, 849)
    torch_backend = resize_shortest_edge(sample, 100, backend="torchvision")["image"]
    np.testing.assert_array_equal(torch_backend, resize_lib.resize_torchvision(image, 100, 283))
    config = AugmentConfig().scaled(0.25)
    assert config.scales == tuple(range(120, 201, 8)) and config.max_size == 333
    assert config.crop_size == (96, 152) and config.eval_size == 200


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"scales": ()}, "scales"),
        ({"crop_size": (600, 384)}, "crop_size"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"max_size": 0}, "max_size"),
        ({"resize_backend": "cv2"}, "resize_backend"),
    ],
)
def test_augment_config_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=f"AugmentConfig.{field}"):
        AugmentConfig(**kwargs)


# ----------------------------------------------------------------------------- batches


def test_batch_layout_padding_and_target_masks():
    source = ShapesSource(12, image_size=(80, 112), seed=3, min_objects=1, max_objects=4)
    config = AugmentConfig(eval_size=80, eval_max_size=112)  # evaluation: images as they are
    batches = make_batches(
        source,
        batch_size=5,
        train=False,
        augment=config,
        max_boxes=6,
        buckets=(64, 128),
        **ONE,
    )
    out = list(batches)
    assert len(out) == batches.num_batches == 3
    seen = []
    for batch in out:
        bs = 5
        assert batch["pixel_values"].shape == (bs, 128, 128, 3)  # 80 x 112 -> the 128 bucket
        assert batch["pixel_values"].dtype == np.float32 and batch["pixel_mask"].dtype == bool
        assert batch["labels"].shape == (bs, 6) and batch["labels"].dtype == np.int32
        assert batch["boxes"].shape == (bs, 6, 4) and batch["mask"].shape == (bs, 6)
        assert np.isfinite(batch["boxes"]).all()
        for i in range(bs):
            if not batch["valid"][i]:
                assert not batch["pixel_mask"][i].any() and not batch["mask"][i].any()
                continue
            record = source[int(batch["image_id"][i])]
            seen.append(int(batch["image_id"][i]))
            np.testing.assert_array_equal(batch["size"][i], (80, 112))
            expected_mask = np.zeros((128, 128), bool)
            expected_mask[:80, :112] = True
            np.testing.assert_array_equal(batch["pixel_mask"][i], expected_mask)
            assert not batch["pixel_values"][i][~expected_mask].any()
            np.testing.assert_allclose(
                _unnormalise(batch["pixel_values"][i, :80, :112]), record["image"], atol=1e-3
            )
            n = len(record["labels"])
            np.testing.assert_array_equal(batch["mask"][i], np.arange(6) < n)
            np.testing.assert_array_equal(batch["labels"][i, :n], record["labels"])
            np.testing.assert_allclose(batch["boxes"][i, :n], record["boxes"])
    assert seen == list(range(12))  # evaluation: every record once, in order
    assert out[-1]["valid"].tolist() == [True, True, False, False, False]


def test_train_batches_stay_on_objects_after_flip_and_resize():
    """The box centre of each target lands on its shape's colour in the padded, normalised batch."""
    source = ShapesSource(
        16, 128, seed=11, min_objects=1, max_objects=3, min_object_size=0.2, max_object_size=0.35
    )
    config = AugmentConfig(scales=(96, 128, 160), max_size=160, crop_prob=0.0)
    batches = make_batches(
        source,
        batch_size=4,
        augment=config,
        seed=5,
        buckets=(96, 128, 160),
        **ONE,
        num_threads=0,
    )
    checked = 0
    for _ in range(8):
        batch = next(batches)
        for i in range(4):
            colors = source.render(int(batch["image_id"][i]))[1]["colors"].astype(np.float32)
            h, w = batch["size"][i]
            image = _unnormalise(batch["pixel_values"][i])
            for box in batch["boxes"][i][batch["mask"][i]]:
                x, y = int(box[0] * w), int(box[1] * h)
                distance = np.linalg.norm(colors - image[y, x], axis=-1).min()
                assert distance < 20, (batch["image_id"][i], box, image[y, x], colors)
                checked += 1
    assert checked > 30


def test_max_boxes_cuts_and_counts():
    source = ShapesSource(8, 96, seed=2, min_objects=3, max_objects=4, max_object_size=0.25)
    batches = make_batches(
        source,
        batch_size=4,
        train=False,
        max_boxes=2,
        augment=SMALL,
        **ONE,
    )
    out = list(batches)
    total = sum(len(source[i]["labels"]) for i in range(8))
    assert all(b["mask"].sum(1).max() == 2 for b in out)
    assert batches.stats["dropped_boxes"] == total - 2 * 8 > 0


def test_shards_are_disjoint_and_cover_the_data():
    source = ShapesSource(21, 64, seed=0)
    # evaluation: every record exactly once over the processes, same number of batches each
    ids, lengths = [], []
    for rank in range(3):
        out = list(
            make_batches(
                source,
                batch_size=4,
                train=False,
                augment=SMALL,
                process_index=rank,
                process_count=3,
            )
        )
        lengths.append(len(out))
        ids.append([int(i) for b in out for i, v in zip(b["image_id"], b["valid"]) if v])
    assert lengths == [2, 2, 2]
    assert sorted(sum(ids, [])) == list(range(21)) and all(len(set(s)) == 7 for s in ids)
    # training: fixed disjoint shards (21 -> 2 x 10), each epoch a new permutation of the shard
    epochs = {}
    for rank in range(2):
        batches = make_batches(
            source,
            batch_size=5,
            augment=SMALL,
            seed=3,
            process_index=rank,
            process_count=2,
            num_threads=0,
        )
        assert batches.steps_per_epoch == 2
        stream = [int(i) for _ in range(4) for i in next(batches)["image_id"]]
        epochs[rank] = (stream[:10], stream[10:])
        assert sorted(stream[:10]) == sorted(stream[10:]) and stream[:10] != stream[10:]
    assert not set(epochs[0][0]) & set(epochs[1][0])
    assert len(set(epochs[0][0]) | set(epochs[1][0])) == 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_gives_the_same_next_batches(backend):
    source = ShapesSource(10, 96, seed=4)
    settings = dict(
        batch_size=3,
        augment=SMALL,
        seed=1,
        **ONE,
        backend=backend,
        num_threads=2,
    )
    with make_batches(source, **settings) as batches:
        for _ in range(4):  # 12 records: past the first epoch of 10
            next(batches)
        state = json.loads(json.dumps(batches.state()))  # survives a JSON checkpoint
        expected = [next(batches) for _ in range(3)]
    with make_batches(source, **settings, state=state) as resumed:
        assert resumed.stats["batches"] == 4
        for want in expected:
            assert _batches_equal(next(resumed), want)
    with make_batches(source, **{**settings, "seed": 2}) as other:
        with pytest.raises(ValueError, match="seed"):
            other.restore(state)


@pytest.mark.skipif(not grain_available(), reason="grain is not installed")
def test_grain_and_python_backends_agree():
    source = ShapesSource(9, 96, seed=8)
    settings = dict(batch_size=4, augment=SMALL, seed=2, process_index=1, process_count=2)
    python = make_batches(source, backend="python", **settings)
    grain = make_batches(source, backend="grain", **settings)
    for _ in range(3):
        assert _batches_equal(next(python), next(grain))
    evaluation = dict(settings, train=False)
    for a, b in zip(
        make_batches(source, backend="python", **evaluation),
        make_batches(source, backend="grain", **evaluation),
        strict=True,
    ):
        assert _batches_equal(a, b)


@pytest.mark.skipif(not grain_available(), reason="grain is not installed")
def test_grain_worker_processes_agree_and_resume():
    source = ShapesSource(12, 64, seed=9)
    settings = dict(batch_size=2, augment=SMALL, seed=4, **ONE)
    with make_batches(source, backend="python", **settings) as python:
        expected = [next(python) for _ in range(4)]
    with make_batches(source, backend="grain", num_workers=1, **settings) as workers:
        got = [next(workers) for _ in range(2)]
        state = workers.state()
        got += [next(workers) for _ in range(2)]
    assert all(_batches_equal(a, b) for a, b in zip(expected, got))
    with make_batches(source, backend="grain", num_workers=1, state=state, **settings) as resumed:
        assert _batches_equal(next(resumed), expected[2])


# ----------------------------------------------------------------------------- real photos


def coco_folder(tmp_path, *, corrupt=(), missing=()):
    """A COCO-json folder in tmp_path: the fixture photos, some corrupt (truncated) or missing."""
    images = tmp_path / "images"
    images.mkdir()
    data = json.loads(COCO_JSON.read_text())
    for entry in data["images"]:
        name = entry["file_name"]
        if name in missing:
            continue
        payload = (FIXTURES / name).read_bytes()
        (images / name).write_bytes(payload[: len(payload) // 3] if name in corrupt else payload)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return images, path, data


def test_coco_json_source_on_real_photos():
    source = CocoJsonSource(FIXTURES, COCO_JSON)
    data = json.loads(COCO_JSON.read_text())
    assert len(source) == 4 and source.num_labels == 80 and source.label_names[0] == "person"
    for index, entry in enumerate(data["images"]):
        record = source[index]
        assert record["image_id"] == entry["id"]
        assert record["image"].shape == (entry["height"], entry["width"], 3)  # gray -> RGB too
        anns = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
        expected = np.asarray([a["bbox"] for a in anns], np.float64)
        x0y0x1y1 = np.concatenate([expected[:, :2], expected[:, :2] + expected[:, 2:]], 1)
        x0y0x1y1 = x0y0x1y1.clip(0, [entry["width"], entry["height"]] * 2)
        got = _cxcywh_to_pixels(record["boxes"], entry["height"], entry["width"])
        np.testing.assert_allclose(got, x0y0x1y1, atol=0.05)
        labels = [COCO_CATEGORY_IDS.index(a["category_id"]) for a in anns]
        assert record["labels"].tolist() == labels
    by_id = CocoJsonSource(FIXTURES, COCO_JSON, label_mode="category_id")
    assert by_id.num_labels == 91 and by_id.label_names[12] == "N/A"
    assert by_id[3]["labels"].tolist() == [
        a["category_id"] for a in data["annotations"] if a["image_id"] == 562
    ]


def test_coco_json_drops_crowd_and_checks_image_size(tmp_path):
    images, path, data = coco_folder(tmp_path)
    data["annotations"][0]["iscrowd"] = 1
    data["images"][1]["height"] += 1  # 000000000472.jpg: the json disagrees with the file
    path.write_text(json.dumps(data))
    source = CocoJsonSource(images, path)
    assert len(source[0]["labels"]) == 2  # 3 objects, one now crowd
    with pytest.raises(ImageError, match="annotations_json says"):
        source[1]


def test_coco_json_bad_input_fails_at_construction(tmp_path):
    images, path, data = coco_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="images_dir"):
        CocoJsonSource(tmp_path / "nope", path)
    with pytest.raises(FileNotFoundError, match="annotations_json"):
        CocoJsonSource(images, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="images_dir"):  # a folder without those images
        CocoJsonSource(tmp_path, path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoJsonSource(images, broken)
    for change, message in [
        (lambda d: d["annotations"][0].update(image_id=999), "not in 'images'"),
        (lambda d: d["annotations"][0].update(category_id=500), "not in 'categories'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox"),
        (lambda d: d.pop("categories"), "'categories'"),
    ]:
        bad = json.loads(json.dumps(data))
        change(bad)
        broken.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            CocoJsonSource(images, broken)


def test_corrupt_and_missing_images_are_skipped_counted_and_logged(tmp_path, caplog):
    images, path, _ = coco_folder(
        tmp_path, corrupt={"000000000536.jpg"}, missing={"000000000086.jpg"}
    )
    source = CocoJsonSource(images, path)
    with caplog.at_level(logging.WARNING, logger="deformable_detr_jax.data.pipeline"):
        batches = make_batches(source, batch_size=2, train=False, augment=SMALL, **ONE)
        out = list(batches)
    assert len(out) == 2  # the number of batches does not depend on what was skipped
    ids = [int(i) for b in out for i, v in zip(b["image_id"], b["valid"]) if v]
    assert ids == [472, 562]
    assert batches.stats["skipped_images"] == 2
    logged = caplog.text
    assert "000000000536.jpg" in logged and "000000000086.jpg" in logged
    # training goes on past them, and says so
    train = make_batches(source, batch_size=3, augment=SMALL, **ONE)
    batch = next(train)
    assert set(batch["image_id"].tolist()) <= {472, 562} and train.stats["skipped_images"] >= 1


def test_all_images_unreadable_is_an_error_not_a_hang(tmp_path):
    names = {e["file_name"] for e in json.loads(COCO_JSON.read_text())["images"]}
    images, path, _ = coco_folder(tmp_path, corrupt=names)
    batches = make_batches(CocoJsonSource(images, path), batch_size=2, augment=SMALL, **ONE)
    with pytest.raises(RuntimeError, match="no image of this process's shard"):
        next(batches)


def test_finite_epochs_and_out_of_range_labels():
    source = ShapesSource(10, 64, seed=1)
    batches = make_batches(source, batch_size=4, num_epochs=1, augment=SMALL, **ONE)
    assert len(list(batches)) == 2  # 10 images: two full batches, the partial one dropped

    class Relabelled:  # a source whose records break the model's label range
        num_labels = None

        def __len__(self):
            return len(source)

        def __getitem__(self, index):
            return {**source[index], "labels": source[index]["labels"] + 3}

        def describe(self, index):
            return source.describe(index)

    bad = make_batches(Relabelled(), batch_size=2, augment=SMALL, num_labels=3, **ONE)
    with pytest.raises(ValueError, match=r"class id outside \[0, 3\)"):
        next(bad)


def test_bad_pipeline_settings_fail_before_any_batch():
    source = ShapesSource(6, 64)
    base = dict(batch_size=2, augment=SMALL, **ONE)
    for change, error, message in [
        ({"num_labels": 2}, ValueError, "num_labels"),
        ({"pad_to": (128, 128)}, ValueError, "pad_to"),
        ({"buckets": (64, 128)}, ValueError, "buckets"),
        ({"process_index": 2, "process_count": 2}, ValueError, "process_index"),
        ({"process_index": 0, "process_count": 7}, ValueError, "fewer than the 7 processes"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"backend": "tf"}, ValueError, "backend"),
    ]:
        with pytest.raises(error, match=message):
            make_batches(source, **{**base, **change})


def test_yolo_folder_source(tmp_path):
    """A YOLO folder made from the fixture photos and their coco128 labels."""
    data = json.loads(COCO_JSON.read_text())
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "names.yaml").write_text(
        "names:\n" + "".join(f"  {i}: class{i}\n" for i in range(80))
    )
    expected = {}
    for entry in data["images"]:
        shutil.copy(FIXTURES / entry["file_name"], tmp_path / "images" / "val")
        lines, boxes = [], []
        for ann in (a for a in data["annotations"] if a["image_id"] == entry["id"]):
            x, y, w, h = ann["bbox"]
            box = [
                (x + w / 2) / entry["width"],
                (y + h / 2) / entry["height"],
                w / entry["width"],
                h / entry["height"],
            ]
            lines.append(
                f"{COCO_CATEGORY_IDS.index(ann['category_id'])} " + " ".join(map(str, box))
            )
            boxes.append(box)
        stem = entry["file_name"][:-4]
        (tmp_path / "labels" / "val" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        expected[entry["id"]] = np.asarray(boxes)
    source = YoloFolderSource(tmp_path, split="val")
    assert len(source) == 4 and source.num_labels == 80 and source.label_names[5] == "class5"
    coco = CocoJsonSource(FIXTURES, COCO_JSON)
    for index in range(4):
        record, reference = source[index], coco[index]
        assert record["image_id"] == reference["image_id"]
        np.testing.assert_array_equal(record["image"], reference["image"])
        np.testing.assert_array_equal(record["labels"], reference["labels"])
        np.testing.assert_allclose(record["boxes"], reference["boxes"], atol=1e-4)
    with pytest.raises(FileNotFoundError, match="set split to one of"):
        YoloFolderSource(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="folder"):
        YoloFolderSource(tmp_path / "missing")
    (tmp_path / "labels" / "val" / "000000000536.txt").write_text("80 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"000000000536.txt:1: class 80 is not in 0..79"):
        YoloFolderSource(tmp_path, split="val")


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"coco128 not at {COCO128} (a user's clone)")
def test_coco128_yolo_folder_through_the_pipeline():
    source = YoloFolderSource(COCO128, split="train2017")
    assert len(source) == 128 and source.label_names[0] == "person"
    fixture = CocoJsonSource(FIXTURES, COCO_JSON)
    index = [r.name for r in source._files].index("000000000536.jpg")
    np.testing.assert_allclose(source[index]["boxes"], fixture[2]["boxes"], atol=1e-4)
    batches = make_batches(source, batch_size=4, augment=SMALL, num_labels=80, seed=1, **ONE)
    for _ in range(3):
        batch = next(batches)
        assert batch["mask"].any() and batch["pixel_mask"].any(axis=(1, 2)).all()
        assert max(batch["size"].max(), 1) <= SMALL.max_size


# ----------------------------------------------------------------------------- TFDS


def _coco_features():
    """The features of TFDS `coco/2017` 1.1.0 (`object_detection/coco.py`), built without TF."""
    tfds = pytest.importorskip("tensorflow_datasets")
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence(
                {
                    "id": np.int64,
                    "area": np.int64,
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(num_classes=80),
                    "is_crowd": np.bool_,
                }
            ),
        }
    )


def _write_tfds_metadata(data_dir, split, lengths, features):
    folder = data_dir / "coco" / "2017" / "1.1.0"
    folder.mkdir(parents=True)
    features.save_config(str(folder))
    template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
    info = {
        "name": "coco",
        "configName": "2017",
        "version": "1.1.0",
        "fileFormat": "array_record",
        "moduleName": "tensorflow_datasets.object_detection.coco",
        "splits": [
            {
                "name": split,
                "numBytes": "1",
                "shardLengths": [str(n) for n in lengths],
                "filepathTemplate": template,
            }
        ],
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def test_tfds_coco_source_reads_real_array_records_without_tensorflow(tmp_path):
    """A prepared `coco/2017` in ArrayRecord, written here from the fixture photos."""
    array_record = pytest.importorskip("array_record.python.array_record_module")
    features = _coco_features()
    data = json.loads(COCO_JSON.read_text())
    examples = []
    for entry in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
        h, w = entry["height"], entry["width"]
        bbox = np.asarray(
            [
                [
                    a["bbox"][1] / h,
                    a["bbox"][0] / w,
                    (a["bbox"][1] + a["bbox"][3]) / h,
                    (a["bbox"][0] + a["bbox"][2]) / w,
                ]
                for a in anns
            ]
        ).clip(0, 1)
        examples.append(
            {
                "image": (FIXTURES / entry["file_name"]).read_bytes(),
                "image/filename": entry["file_name"],
                "image/id": entry["id"],
                "objects": {
                    "id": np.asarray([a["id"] for a in anns]),
                    "area": np.asarray([int(a["area"]) for a in anns]),
                    "bbox": bbox.astype(np.float32),
                    "label": np.asarray([COCO_CATEGORY_IDS.index(a["category_id"]) for a in anns]),
                    "is_crowd": np.asarray([i == 1 for i in range(len(anns))]),  # the 2nd is crowd
                },
            }
        )
    corrupt = dict(examples[2], image=examples[2]["image"][:3000])  # a truncated JPEG
    records = examples + [corrupt]
    folder = _write_tfds_metadata(tmp_path, "validation", [len(records)], features)
    writer = array_record.ArrayRecordWriter(
        str(folder / "coco-validation.array_record-00000-of-00001"), "group_size:1"
    )
    for example in records:
        writer.write(features.serialize_example(example))
    writer.close()

    source = TfdsCocoSource("validation", tmp_path)
    coco = CocoJsonSource(FIXTURES, COCO_JSON)
    assert len(source) == 5 and source.num_labels == 80
    for index in range(4):
        record, reference = source[index], coco[index]
        assert record["image_id"] == reference["image_id"]
        np.testing.assert_array_equal(record["image"], reference["image"])
        keep = np.arange(len(reference["labels"])) != 1  # crowd dropped
        np.testing.assert_array_equal(record["labels"], reference["labels"][keep])
        np.testing.assert_allclose(record["boxes"], reference["boxes"][keep], atol=1e-5)
    with pytest.raises(ImageError, match=r"validation\[4\]"):
        source[4]
    by_id = TfdsCocoSource("validation", tmp_path, label_mode="category_id")
    assert by_id.num_labels == 91
    assert by_id[3]["labels"].tolist() == [COCO_CATEGORY_IDS[i] for i in source[3]["labels"]]

    batches = make_batches(
        source,
        batch_size=2,
        train=False,
        augment=SMALL,
        num_labels=80,
        **ONE,
    )
    ids = [int(i) for b in batches for i, v in zip(b["image_id"], b["valid"]) if v]
    assert ids == [86, 472, 536, 562] and batches.stats["skipped_images"] == 1

    with pytest.raises(FileNotFoundError, match="data_dir"):
        TfdsCocoSource("validation", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tfds build coco/2017"):
        TfdsCocoSource("train", tmp_path)  # no such split prepared


def test_tfds_coco_source_on_mock_data(tmp_path, monkeypatch):
    """`tfds.testing.mock_data` with the coco/2017 metadata: random examples, no TensorFlow.

    The builder code of `coco` imports TensorFlow, so the mock reads the metadata files
    (`MockPolicy.USE_FILES`); the mock's random generator is asked for equal-length object lists
    (its default draws each field's length separately)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking

    _write_tfds_metadata(tmp_path, "train", [1000], _coco_features())
    init = mocking.RandomFakeGenerator.__init__
    monkeypatch.setattr(
        mocking.RandomFakeGenerator,
        "__init__",
        lambda self, *a, **k: init(self, *a, **{**k, "constant_dynamic_shape": True}),
    )
    with tfds.testing.mock_data(
        num_examples=6, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)
    ):
        source = TfdsCocoSource("train", tmp_path)
        assert len(source) == 6
        record = source[0]
        assert record["image"].shape == (10, 10, 3) and record["image"].dtype == np.uint8
        assert record["boxes"].shape == (len(record["labels"]), 4)
        batch = next(make_batches(source, batch_size=3, augment=SMALL, num_labels=80, **ONE))
        assert batch["valid"].all() and min(batch["size"][0]) in SMALL.scales
