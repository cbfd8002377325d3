"""Hugging Face hub ids wherever a model is named (`convert/hub.py`): the real huggingface_hub
client against a local HTTP server that answers as the hub does (`tests/hub_server.py`), and
against a cache laid out as huggingface_hub lays it out, offline.

A model loaded through the hub must give the outputs of the same model in memory (`Detector(model,
processor)`), and its processor settings must come through; each failure is one typed error with
a one-line message naming the id, and one `error:` line from each command line.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import sys

import numpy as np
import PIL.Image
import pytest
from flax import nnx
from safetensors.numpy import save_file

from deformable_detr_jax import Detector, ImageProcessor, load_pytorch_checkpoint
from deformable_detr_jax.convert import (
    HubFileNotFoundError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnreachableError,
    export_transformers_checkpoint,
    is_hub_id,
    resolve_model,
    save_pytorch_checkpoint,
)
from tests import subprocess_utils
from tests.hub_server import (
    FakeHub,
    etag,
    folder_files,
    git_blob_sha1,
    point_hub_at,
    write_hub_cache,
)
from tests.random_models import TINY_BOTTLENECK, random_model, small_config
from tests.test_inference import PHOTO_LANDSCAPE, photo

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPO = "SenseTime/tiny-ddetr"
NAMES = ("cat", "dog", "bicycle", "person", "car")
# 8 heads, as every published checkpoint: a weights file alone then tells the architecture
TINY = dict(
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=8,
    decoder_attention_heads=8,
    encoder_n_points=2,
    decoder_n_points=2,
    id2label=dict(enumerate(NAMES)),
)
SIZE = {"shortest_edge": 96, "longest_edge": 128}


@functools.cache
def tiny_model(seed: int = 5):
    return random_model(small_config(TINY_BOTTLENECK, **TINY), seed=seed)


def tiny_processor() -> ImageProcessor:
    return ImageProcessor(size=SIZE, resize_backend="pil")


@functools.cache
def image() -> np.ndarray:
    return photo(PHOTO_LANDSCAPE)[::3, ::3]  # 112 x 150


def outputs(detector: Detector) -> tuple[np.ndarray, np.ndarray]:
    """Logits and boxes of `image()` as this detector pre-processes and runs it."""
    pad_to = detector.bucket(image().shape[:2])
    batch = detector.processor.preprocess(image(), pad_to=pad_to)
    logits, boxes = detector.forward(batch["pixel_values"], batch["pixel_mask"])
    return np.asarray(logits), np.asarray(boxes)


@functools.cache
def expected(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """What the model in memory gives, with the processor the repository holds."""
    return outputs(Detector(tiny_model(seed), tiny_processor(), compile_cache=None))


def assert_same_model(detector: Detector, seed: int = 5) -> None:
    assert detector.processor.size == SIZE and detector.processor.resize_backend == "pil"
    assert detector.id2label == dict(enumerate(NAMES))
    for got, want in zip(outputs(detector), expected(seed)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def repo_files(tmp_path_factory, seed: int = 5) -> dict[str, bytes]:
    """config.json, model.safetensors and preprocessor_config.json as transformers lays them."""
    folder = tmp_path_factory.mktemp("repo") / "model"
    save_pytorch_checkpoint(tiny_model(seed), folder, processor=tiny_processor())
    return folder_files(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return repo_files(tmp_path_factory)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake hub, started, with huggingface_hub pointed at it and at an empty cache."""
    server = FakeHub().start()
    try:
        point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
        yield server
    finally:
        server.stop()


@pytest.fixture
def dead_endpoint(monkeypatch, tmp_path):
    """huggingface_hub pointed at a port nothing listens on, without its retries' sleeps."""
    import socket
    import time
    import types

    from huggingface_hub.utils import _http

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hf-cache")
    slept = []
    fast = types.SimpleNamespace(
        **{k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    )
    fast.sleep = slept.append
    monkeypatch.setattr(_http, "time", fast)
    return slept


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and len(message) < 500, message
    return message


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, hub_shaped",
    [
        ("SenseTime/deformable-detr", True),
        ("deformable-detr", True),
        ("org_1/name.v2", True),
        ("runs/my_finetune/model", False),
        ("./deformable-detr", False),
        ("/abs/model", False),
        ("~/model", False),
        ("model.safetensors", False),
        ("org/r50_deformable_detr.pth", False),
        ("org/config.json", False),
        ("org--name/x", False),
        ("org/na..me", False),
        ("-org/name", False),
        ("", False),
        ("a" * 97, False),
    ],
)
def test_which_names_are_hub_ids(name, hub_shaped):
    assert is_hub_id(name) is hub_shaped


def test_a_local_path_wins_and_a_missing_path_is_not_looked_up(
    dead_endpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SenseTime" / "tiny-ddetr").mkdir(parents=True)
    assert resolve_model(REPO) == tmp_path.joinpath(REPO).relative_to(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        resolve_model("runs/missing/model")
    assert "no model folder or weights file at 'runs/missing/model'" in one_line(error.value)
    assert dead_endpoint == []  # no request was tried


# ----------------------------------------------------------------------------- the cache


def test_cached_model_loads_offline(files, tmp_path, monkeypatch):
    """A cache written as huggingface_hub writes it, HF_HUB_OFFLINE=1 and an endpoint nothing
    answers: the model loads from the cache alone."""
    commit = git_blob_sha1(b"a commit")
    snapshot = write_hub_cache(tmp_path / "cache", REPO, files, commit=commit)
    point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "default-cache", offline=True)

    detector = Detector.from_pretrained(REPO, cache_dir=tmp_path / "cache", compile_cache=None)
    assert_same_model(detector)
    assert resolve_model(REPO, cache_dir=tmp_path / "cache") == snapshot
    assert resolve_model(REPO, cache_dir=tmp_path / "cache", revision=commit) == snapshot
    model = load_pytorch_checkpoint(REPO, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(
        nnx.to_pure_dict(nnx.state(model, nnx.Param))["class_embed"][0]["bias"],
        nnx.to_pure_dict(nnx.state(tiny_model(), nnx.Param))["class_embed"][0]["bias"],
    )
    # the default cache: $HF_HUB_CACHE
    write_hub_cache(tmp_path / "default-cache", REPO, files, commit=commit)
    assert resolve_model(REPO) == tmp_path / "default-cache" / snapshot.relative_to(
        tmp_path / "cache"
    )

    # not cached, offline: one line that says so and what to do
    for kwargs in ({"cache_dir": tmp_path / "empty"}, {"revision": "v2"}):
        with pytest.raises(HubUnreachableError) as error:
            Detector.from_pretrained(REPO, **kwargs)
        message = one_line(error.value)
        assert message.startswith("HF_HUB_OFFLINE is set and config.json of 'SenseTime/tiny")
        assert "download it once with the network on" in message


def test_cached_absence_of_a_processor_is_respected_offline(files, tmp_path, monkeypatch):
    """huggingface_hub's `.no_exist` mark: the repository has no preprocessor_config.json, so the
    default settings, with no request for it."""
    commit = git_blob_sha1(b"another commit")
    weights = {k: v for k, v in files.items() if k != "preprocessor_config.json"}
    write_hub_cache(tmp_path, REPO, weights, commit=commit)
    mark = tmp_path / f"models--{REPO.replace('/', '--')}" / ".no_exist" / commit
    mark.mkdir(parents=True)
    (mark / "preprocessor_config.json").touch()
    point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path, offline=True)
    detector = Detector.from_pretrained(REPO, compile_cache=None)
    assert detector.processor.size == {"shortest_edge": 800, "longest_edge": 1333}


# ----------------------------------------------------------------------------- downloads


def test_download_from_the_hub(hub, files, tmp_path, monkeypatch):
    extra = {"README.md": b"# tiny\n", "flax_model.msgpack": b"\x01" * 1000}
    commit = hub.add(REPO, {**files, **extra})
    detector = Detector.from_pretrained(REPO, compile_cache=None)
    assert_same_model(detector)
    # only what a model needs, each asked for (HEAD) then fetched (GET; weights from the "CDN")
    asked = [p.rsplit("/", 1)[-1] for p in hub.paths("HEAD")]
    assert asked == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert hub.paths("HEAD")[1] == f"/{REPO}/resolve/{commit}/model.safetensors"  # pinned
    got = sorted(p.rsplit("/", 1)[-1] for p in hub.paths("GET"))
    weights = etag("model.safetensors", files["model.safetensors"])
    assert got == sorted(["config.json", "preprocessor_config.json", weights])
    # huggingface_hub's cache layout
    repo = tmp_path / "hf-cache" / f"models--{REPO.replace('/', '--')}"
    assert (repo / "refs" / "main").read_text() == commit
    snapshot = repo / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json"]
    )
    assert (snapshot / "model.safetensors").resolve() == repo / "blobs" / weights
    assert (snapshot / "config.json").read_bytes() == files["config.json"]

    # again: one request (is main still that commit?), then offline: none
    before = len(hub.requests)
    assert resolve_model(REPO) == snapshot
    assert [p.rsplit("/", 1)[-1] for p in hub.paths()[before:]] == ["config.json"]
    point_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-cache", offline=True)
    before = len(hub.requests)
    assert resolve_model(REPO) == snapshot
    assert len(hub.requests) == before


def test_revision_token_and_renamed_repository(hub, files, tmp_path_factory, monkeypatch):
    """`revision` picks the commit (a tag holding other weights); the token goes out as
    huggingface_hub sends it, from `token=` or `HF_TOKEN`; a renamed repository's redirect is
    followed."""
    hub.add(REPO, files)
    hub.add(REPO, repo_files(tmp_path_factory, seed=6), revision="v1")
    hub.renamed["SenseTime/old-name"] = REPO

    tagged = Detector.from_pretrained(REPO, revision="v1", token="hf_argument", compile_cache=None)
    assert_same_model(tagged, seed=6)
    assert {auth for method, _, auth in hub.requests if method == "HEAD"} == {"Bearer hf_argument"}

    # the revision in the name, as a command line or a recipe gives it
    assert_same_model(Detector.from_pretrained(f"{REPO}@v1", compile_cache=None), seed=6)
    with pytest.raises(ValueError, match="names revision 'v1' and revision='main' another"):
        Detector.from_pretrained(f"{REPO}@v1", revision="main", compile_cache=None)

    monkeypatch.setenv("HF_TOKEN", "hf_environment")
    before = len(hub.requests)
    assert_same_model(Detector.from_pretrained("SenseTime/old-name", compile_cache=None))
    heads = [(path, auth) for method, path, auth in hub.requests[before:] if method == "HEAD"]
    assert heads[0] == ("/SenseTime/old-name/resolve/main/config.json", "Bearer hf_environment")
    assert heads[1] == (f"/{REPO}/resolve/main/config.json", "Bearer hf_environment")


def test_sharded_weights(hub, files, tmp_path):
    """A repository whose weights are `model.safetensors.index.json` and its shards."""
    state = export_transformers_checkpoint(tiny_model())
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    sharded = {k: v for k, v in files.items() if k != "model.safetensors"}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
        sharded[shard] = (tmp_path / shard).read_bytes()
        weight_map.update(dict.fromkeys(keys, shard))
    sharded["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    hub.add(REPO, sharded)
    assert_same_model(Detector.from_pretrained(REPO, compile_cache=None))
    asked = {p.rsplit("/", 1)[-1] for p in hub.paths("HEAD")}
    assert asked == {"config.json", "preprocessor_config.json", *shards} | {
        "model.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
    }


# ----------------------------------------------------------------------------- errors


def test_hub_errors_are_one_typed_line(hub, files):
    hub.add(REPO, files)
    hub.add("SenseTime/no-weights", {"config.json": files["config.json"]})
    hub.add("SenseTime/no-config", {"model.safetensors": files["model.safetensors"]})

    with pytest.raises(HubRepoNotFoundError) as error:
        Detector.from_pretrained("SenseTime/missing")
    message = one_line(error.value)
    assert message.startswith("'SenseTime/missing' is not a local path, and the Hugging Face hub")
    assert hub.endpoint in message and "HF_TOKEN" in message

    with pytest.raises(HubRevisionNotFoundError) as error:
        load_pytorch_checkpoint(REPO, revision="v9")
    assert one_line(error.value) == (
        f"the hub model {REPO!r} has no revision 'v9': pass an existing branch, tag or commit "
        "hash (revision=... or 'org/name@REVISION')"
    )

    with pytest.raises(HubFileNotFoundError) as error:
        Detector.from_pretrained("SenseTime/no-weights")
    message = one_line(error.value)
    assert message.startswith(
        "the hub model 'SenseTime/no-weights' (revision 'main') has no model.safetensors or "
        "pytorch_model.bin or model.safetensors.index.json: it is not a transformers"
    )
    with pytest.raises(HubFileNotFoundError, match="has no config.json") as error:
        Detector.from_pretrained("SenseTime/no-config")
    one_line(error.value)


def test_dead_endpoint_is_one_typed_line(dead_endpoint):
    with pytest.raises(HubUnreachableError) as error:
        Detector.from_pretrained(REPO)
    message = one_line(error.value)
    assert message.startswith("cannot reach the Hugging Face hub at http://127.0.0.1:")
    assert f"config.json of {REPO!r} (revision 'main') is not in the cache" in message
    assert "check the network (or HF_ENDPOINT)" in message
    assert dead_endpoint  # huggingface_hub retried (without waiting)


def _only_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_command_lines_print_one_error_line(hub, files, tmp_path, capsys):
    from deformable_detr_jax.cli.predict import main as predict
    from deformable_detr_jax.convert.__main__ import main as convert
    from deformable_detr_jax.export.__main__ import main as export

    hub.add("SenseTime/no-weights", {"config.json": files["config.json"]})
    image_file = tmp_path / "image.png"
    image_file.write_bytes(b"unused")
    runs = {
        "predict": lambda model: predict(["--model", model, str(image_file)]),
        "export": lambda model: export(
            [model, str(tmp_path / "x.onnx"), "--format", "onnx", "--height", "64", "--width", "64"]
        ),
        "convert": lambda model: convert([model, str(tmp_path / "out")]),
    }
    for name, run in runs.items():
        assert run("SenseTime/missing") == 2, name
        assert "has no model 'SenseTime/missing'" in _only_error_line(capsys)
        assert run("SenseTime/no-weights") == 2, name
        assert "'SenseTime/no-weights' (revision 'main') has no" in _only_error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.onnx").exists()


def test_init_from_names_a_hub_model(hub, files):
    from deformable_detr_jax.training import initialization

    hub.add(REPO, files)
    assert initialization.checkpoint_config(REPO) == tiny_model().config
    model = initialization.load_checkpoint_model(REPO)
    for got, want in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(tiny_model(), nnx.Param)),
    ):
        np.testing.assert_array_equal(got[1][...], want[1][...], err_msg=str(got[0]))
    with pytest.raises(HubRepoNotFoundError) as error:
        initialization.checkpoint_config("SenseTime/missing")
    assert one_line(error.value).startswith("model.init_from: 'SenseTime/missing' is not")


def test_predict_with_a_hub_id(hub, files, tmp_path, capsys):
    from deformable_detr_jax.cli.predict import main as predict

    hub.add(REPO, files)
    image_file = tmp_path / "photo.png"
    PIL.Image.fromarray(image()).save(image_file)
    want = Detector(tiny_model(), tiny_processor(), compile_cache=None)(image(), threshold=0.02)
    assert predict(["--model", REPO, str(image_file), "--json", "--threshold", "0.02"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [d["label"] for d in record["detections"]] == list(want[0].label_names)
    np.testing.assert_allclose(
        [d["score"] for d in record["detections"]], want[0].scores, rtol=0, atol=1e-5
    )


def test_environment_variables_reach_a_new_process(hub, files, tmp_path):
    """`HF_ENDPOINT` and `HF_HUB_CACHE` as a user sets them, read by huggingface_hub at import in
    a fresh process: `convert` downloads the model and keeps its processor settings."""
    hub.add(REPO, files)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # point_hub_at set HF_ENDPOINT, HF_HUB_CACHE
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess_utils.run(
        [sys.executable, "-m", "deformable_detr_jax.convert", REPO, str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("converted transformers checkpoint (variant plain")
    saved = ImageProcessor.from_pretrained(tmp_path / "out")
    assert saved == tiny_processor()
    assert (tmp_path / "hf-cache" / f"models--{REPO.replace('/', '--')}").is_dir()
    assert [p.rsplit("/", 1)[-1] for p in hub.paths("HEAD")][0] == "config.json"


def test_the_readmes_first_snippet_runs_as_written(files, tmp_path, monkeypatch):
    """The README's quick start (the model card's snippet in JAX), executed as written against
    a cached hub model, offline; the photo it downloads is a fixture photo."""
    import urllib.request

    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    repo = "SenseTime/deformable-detr-with-box-refine-two-stage"
    assert f'Detector.from_pretrained("{repo}")' in snippet
    write_hub_cache(tmp_path / "cache", repo, files, commit=git_blob_sha1(b"readme"))
    point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "cache", offline=True)
    photo_bytes = pathlib.Path(PHOTO_LANDSCAPE).read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url: io.BytesIO(photo_bytes))
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)

    assert_same_model(namespace["detector"])
    want = Detector(tiny_model(), tiny_processor(), compile_cache=None)(
        [namespace["image"]], threshold=0.7
    )[0]
    np.testing.assert_allclose(namespace["detections"].scores, want.scores, rtol=0, atol=1e-6)
    drawn = PIL.Image.open(tmp_path / "detected.png")
    assert drawn.size == namespace["image"].size
