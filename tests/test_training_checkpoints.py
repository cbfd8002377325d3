"""Checkpoint integrity in-process, on a small synthetic train state: silent bit flips caught by
the checksums, truncated and missing files, a corrupt data or meta item; each moved aside (never
deleted) with the previous checkpoint restored exactly; none restoring is an error that stays an
error; another state's checkpoint is a mismatch, not corruption. And the settings a workdir
remembers (`resume.py`)."""

from __future__ import annotations

import json
import logging
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deformable_detr_jax.training import (
    CheckpointMismatchError,
    Checkpoints,
    ConfigError,
    NoCheckpointRestoresError,
    resume,
)
from deformable_detr_jax.training.train_state import TrainState

LOGGER = "deformable_detr_jax.training.checkpointing"


def _mesh():
    return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def _state(step: int, shape=(64, 64)) -> TrainState:
    """Random (incompressible) arrays, as a real state's, on a one-device mesh."""
    rng = np.random.default_rng(step)
    sharding = jax.sharding.NamedSharding(_mesh(), jax.sharding.PartitionSpec())
    put = lambda a: jax.device_put(a, sharding)  # noqa: E731
    return TrainState(
        step=put(np.int32(step)),
        params={
            "w": put(rng.normal(size=shape).astype(np.float32)),
            "b": put(rng.normal(size=(64,)).astype(np.float32)),
        },
        opt_state=({"mu": put(rng.normal(size=shape).astype(np.float32))}, put(np.int32(step))),
        frozen={"running_var": put(rng.uniform(0.5, 2, size=(256,)).astype(np.float32))},
        bad_step=put(np.int32(-1)),
    )


def _abstract(state: TrainState) -> TrainState:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _write(directory, steps) -> dict[int, TrainState]:
    checkpoints = Checkpoints(directory, max_to_keep=None)
    states = {}
    for step in steps:
        states[step] = _state(step)
        checkpoints.save(states[step], {"index": 10 * step}, {"total_steps": 99})
    checkpoints.close()
    return states


def _assert_equal(restored: TrainState, expected: TrainState) -> None:
    flat_a, tree_a = jax.tree.flatten(jax.device_get(restored))
    flat_b, tree_b = jax.tree.flatten(jax.device_get(expected))
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _plain_restore(folder: pathlib.Path):
    with ocp.StandardCheckpointer() as checkpointer:
        return jax.tree.leaves(jax.device_get(checkpointer.restore(folder)))


def _flip_silently(folder: pathlib.Path) -> None:
    """Flips one bit of the largest array file where orbax alone reads it back without an error
    but with other values (it checks no chunk checksum): the case only our checksums catch."""
    original = _plain_restore(folder)
    path = _files(folder)[-1]
    clean = path.read_bytes()
    for offset in range(0, len(clean) // 2, 97):
        data = bytearray(clean)
        data[len(clean) // 2 + offset] ^= 0x04
        path.write_bytes(bytes(data))
        try:
            flipped = _plain_restore(folder)
        except Exception:  # detected by orbax: not silent, try another byte
            continue
        if any(not np.array_equal(a, b) for a, b in zip(original, flipped)):
            return
    raise AssertionError(f"no bit of {path} flips silently: orbax reads none back wrong")


def test_silent_bit_flip_is_caught_and_the_previous_checkpoint_restores(tmp_path, caplog):
    states = _write(tmp_path, [1, 2, 3])
    _flip_silently(tmp_path / "3" / "state")

    checkpoints = Checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        state, position, meta = checkpoints.restore_latest(_abstract(states[3]))
    checkpoints.close()
    _assert_equal(state, states[2])
    assert position == {"index": 20} and meta["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "corrupt-3"]
    reason = (tmp_path / "corrupt-3" / "CORRUPT.txt").read_text()
    assert "1 array(s) do not match their checksums (e.g. " in reason
    assert "checkpoint 3" in caplog.text and "corrupt-3" in caplog.text
    assert "do not match their checksums" in caplog.text


def test_truncated_missing_and_tampered_checkpoints_until_none_restores(tmp_path):
    states = _write(tmp_path, [1, 2, 3, 4, 5])
    largest = _files(tmp_path / "5" / "state")[-1]
    os.truncate(largest, largest.stat().st_size // 2)  # 5: a truncated array file
    _files(tmp_path / "4" / "state")[-1].unlink()  # 4: a deleted array file
    data = tmp_path / "3" / "data" / "metadata"  # 3: another data position, valid JSON
    data.write_text(data.read_text().replace('"index": 30', '"index": 31'))
    meta = tmp_path / "2" / "meta" / "metadata"  # 2: a changed meta item, valid JSON
    meta.write_text(meta.read_text().replace('"total_steps": 99', '"total_steps": 98'))

    checkpoints = Checkpoints(tmp_path)
    state, position, _ = checkpoints.restore_latest(_abstract(states[5]))
    checkpoints.close()
    _assert_equal(state, states[1])
    assert position == {"index": 10}
    assert sorted(os.listdir(tmp_path)) == ["1", "corrupt-2", "corrupt-3", "corrupt-4", "corrupt-5"]
    reasons = {n: (tmp_path / f"corrupt-{n}" / "CORRUPT.txt").read_text() for n in (2, 3, 4, 5)}
    assert "its arrays cannot be read" in reasons[5] and "its arrays cannot be read" in reasons[4]
    assert "the data item does not match its checksum" in reasons[3]
    assert "the meta item does not match its checksum" in reasons[2]

    # the last one goes too: an error naming each, and it stays an error on the next run
    (tmp_path / "1" / "meta" / "metadata").write_text("{not json")
    for attempt in range(2):
        checkpoints = Checkpoints(tmp_path)
        with pytest.raises(NoCheckpointRestoresError) as error:
            checkpoints.restore_latest(_abstract(states[1]))
        checkpoints.close()
        message = str(error.value)
        if attempt == 0:
            assert "corrupt-1: its meta item cannot be read" in message
        assert "corrupt-2, corrupt-3, corrupt-4, corrupt-5" in message
        assert "rename a folder back to its step number" in message
    assert all(n.startswith("corrupt-") for n in os.listdir(tmp_path))  # nothing deleted
    assert len(os.listdir(tmp_path)) == 5


def test_a_second_corruption_of_a_step_keeps_the_first(tmp_path):
    states = _write(tmp_path, [1, 2])
    (tmp_path / "corrupt-2").mkdir()  # moved aside by an earlier run
    _files(tmp_path / "2" / "state")[-1].unlink()
    checkpoints = Checkpoints(tmp_path)
    state, _, _ = checkpoints.restore_latest(_abstract(states[2]))
    checkpoints.close()
    _assert_equal(state, states[1])
    assert sorted(os.listdir(tmp_path)) == ["1", "corrupt-2", "corrupt-2.2"]


def test_another_state_is_a_mismatch_and_nothing_moves(tmp_path):
    _write(tmp_path, [1])
    checkpoints = Checkpoints(tmp_path)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"arrays 2 of another shape or dtype "
        r"\(e\.g\. opt_state\.0\.mu, params\.w\)",
    ):
        checkpoints.restore_latest(_abstract(_state(1, shape=(64, 32))))
    checkpoints.close()
    assert os.listdir(tmp_path) == ["1"]
    assert isinstance(CheckpointMismatchError("x"), ConfigError)  # train.py: exit status 2


def test_a_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
    state = _state(7)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(
        tmp_path, options=options, item_names=("state", "data", "meta")
    ) as m:
        m.save(
            7,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"processes": [None]}),
                meta=ocp.args.JsonSave({"step": 7}),
            ),
        )
    checkpoints = Checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restored, position, _ = checkpoints.restore_latest(_abstract(state))
    checkpoints.close()
    _assert_equal(restored, state)
    assert position is None and "has no checksums" in caplog.text


# ----------------------------------------------------------------------------- settings


def _payload(**changes):
    from tests.training_workers import get_config, tiny_model_config

    config = get_config()
    for key, value in changes.items():
        group, name = key.split(".")
        config[group][name] = value
    model = tiny_model_config(**{k[6:]: v for k, v in changes.items() if k.startswith("model.")})
    return resume.payload(config, model)


def test_settings_differences_name_each_and_skip_what_may_change(tmp_path):
    saved = _payload()
    resume.write_settings(str(tmp_path), saved)
    # what may change does not count; a setting the file does not know is not compared
    later = _payload(
        **{
            "train.num_steps": 500,
            "train.log_every": 7,
            "optimizer.lr": 1e-5,
            "model.msda_implementation": "xla",
        }
    )
    later["config"]["data"]["a_new_setting"] = 3
    resume.check_settings(str(tmp_path), later)

    with pytest.raises(ConfigError) as error:
        resume.check_settings(str(tmp_path), _payload(**{"model.d_model": 96}), shown="runs/x")
    assert str(error.value) == (
        "workdir runs/x was trained with model.d_model=64; this run has 96:"
        " use another --workdir or the same settings"
    )

    changed = _payload(
        **{
            "model.d_model": 96,
            "optimizer.frozen": (),
            "data.batch_size": 8,
            "train.grad_accum_steps": 2,
            "train.param_dtype": "float64",
            "train.seed": 1,
        }
    )
    with pytest.raises(ConfigError) as error:
        resume.check_settings(str(tmp_path), changed, shown="runs/x")
    lines = str(error.value).splitlines()
    assert (
        lines[0] == "workdir runs/x was trained with other settings than this run (6 differences):"
    )
    assert lines[1:-1] == [
        "  data.batch_size=4; this run has 8",
        "  model.d_model=64; this run has 96",
        r"  optimizer.frozen=(^model\.backbone\.model\.embedder\., "
        r"^model\.backbone\.model\.encoder\.stages\.0\.); this run has ()",
        "  train.grad_accum_steps=1; this run has 2",
        "  train.param_dtype=float32; this run has float64",
        "  train.seed=42; this run has 1",
    ]
    assert lines[-1] == "use another --workdir or the same settings"
    assert json.loads((tmp_path / "config.json").read_text()) == saved


def test_a_workdir_without_config_json_is_compared_with_its_newest_checkpoint(tmp_path):
    from tests.training_workers import tiny_model_config

    saved = _payload()
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    meta = {"config": saved["config"], "model_config": tiny_model_config().to_hf()}
    checkpoints.save(_state(1), None, meta)  # as a version before config.json wrote it
    checkpoints.wait()
    fallback = resume.settings_from_checkpoints(checkpoints)
    checkpoints.close()
    assert not (tmp_path / "config.json").exists()
    resume.check_settings(str(tmp_path), _payload(**{"train.num_steps": 9}), fallback=fallback)
    with pytest.raises(ConfigError, match=r"with model\.d_model=64; this run has 96: use another"):
        resume.check_settings(str(tmp_path), _payload(**{"model.d_model": 96}), fallback=fallback)


def test_a_workdir_written_with_the_model_loss_fields_still_resumes(tmp_path):
    """Before the recipe's model group lost the transformers loss fields, config.json held them
    (and the resolved model config still does): they are no settings, so they are not compared."""
    saved = _payload()
    saved["config"]["model"]["bbox_loss_coefficient"] = 50.0
    saved["model"]["bbox_loss_coefficient"] = 50.0
    saved["model"]["eos_coefficient"] = 0.3
    resume.write_settings(str(tmp_path), saved)
    resume.check_settings(str(tmp_path), _payload())
    assert "bbox_loss_coefficient" not in _payload()["config"]["model"]
    from tests.training_workers import get_config, tiny_model_config

    config = get_config()
    config.model.loss.bbox_loss_coefficient = 7.0  # the loss's own setting is compared
    changed = resume.payload(config, tiny_model_config())
    with pytest.raises(
        ConfigError, match=r"model\.loss\.bbox_loss_coefficient=5\.0; this run has 7"
    ):
        resume.check_settings(str(tmp_path), changed)
