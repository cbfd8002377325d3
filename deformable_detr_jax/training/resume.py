"""What a workdir remembers of the run that wrote it, and what a resumed run may change.

The first checkpoint of a workdir is written together with `workdir/config.json`: the run's whole
config and the model config it resolved to (`num_labels` from the data, the fields of a
`model.init_from` checkpoint). A run that finds checkpoints in its workdir compares its settings
with that file before anything is compiled and stops with one `ConfigError` listing every
difference, e.g.

    workdir runs/x was trained with model.d_model=64; this run has 96: use another --workdir or
    the same settings

Every setting is compared except those in `MAY_CHANGE`: how long to train, how often to log,
evaluate and checkpoint, where the data files are and how they are loaded, which kernel computes
the attention, and the optimizer's rates and schedule (lowering a learning rate and resuming is a
manual schedule). The model, what is frozen, the optimizer groups, the data (source, order,
augmentation, batch), the dtypes and the seeds shape the state or the run and must stay as they
were. A setting the file does not know (added by a later version) is not compared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.training.setup import ConfigError

logger = logging.getLogger(__name__)

SETTINGS_FILE = "config.json"
FORMAT = 1

# Dotted settings (or group prefixes ending in ".") that a resumed run may change.
MAY_CHANGE = (
    # how long, how often, what is written
    "train.num_steps",
    "train.num_epochs",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpoints",
    "train.eval_every",
    "train.eval_at_end",
    "train.eval_top_k",
    "train.save_model",
    "train.tensorboard",
    "train.handle_sigterm",
    "train.compilation_cache_dir",
    # where the data is and how it is loaded (not what it is)
    "data.eval_batch_size",
    "data.num_threads",
    "data.backend",
    "data.strict",
    "data.shapes.num_eval",
    "data.coco_json.train_images",
    "data.coco_json.train_annotations",
    "data.coco_json.eval_images",
    "data.coco_json.eval_annotations",
    "data.yolo.folder",
    "data.yolo.eval_split",
    "data.tfds.data_dir",
    "data.tfds.eval_split",
    # which kernel computes the attention (the same numbers); where a fresh run started from
    "model.msda_implementation",
    "model.init_from",
    "model.backbone_weights",
    # the optimizer's rates and schedule (its groups and state stay)
    "optimizer.lr",
    "optimizer.lr_backbone",
    "optimizer.lr_linear_proj_mult",
    "optimizer.weight_decay",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.eps",
    "optimizer.clip_max_norm",
    "optimizer.lr_drop_epochs",
    "optimizer.lr_drop_factor",
    "optimizer.warmup_steps",
)


def config_json(config: Any) -> Any:
    """The run's ConfigDict (or mapping) as plain JSON data."""
    to_dict = getattr(config, "to_dict", None)
    try:
        return json.loads(json.dumps(to_dict() if to_dict else dict(config), default=str))
    except (TypeError, ValueError):
        return str(config)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def settings_record(saved: Mapping[str, Any]) -> dict[str, Any]:
    """`{"group.key": value}` of a `config.json` payload: the data, optimizer and train groups as
    configured, the model as resolved (`model.<DeformableDetrConfig field>`), and `model.loss.*`,
    `model.init_from`, `model.backbone_weights` as configured."""
    config = saved.get("config") or {}
    out: dict[str, Any] = {}
    for group in ("data", "optimizer", "train"):
        if isinstance(config.get(group), Mapping):
            _flatten(group, config[group], out)
    model_group = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    for key in ("loss", "init_from", "backbone_weights"):
        if key in model_group:
            _flatten(f"model.{key}", model_group[key], out)
    for key, value in (saved.get("model") or {}).items():
        out[f"model.{key}"] = value
    return out


def payload(config: Any, model: DeformableDetrConfig) -> dict[str, Any]:
    """What `config.json` holds."""
    return json.loads(
        json.dumps(
            {
                "format": FORMAT,
                "config": config_json(config),
                "model": dataclasses.asdict(model),
            }
        )
    )


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def _show(value: Any) -> str:
    if isinstance(value, list):
        text = "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    elif isinstance(value, str):
        text = value if value else "''"
    else:
        text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`"key=saved; this run has current"` for every compared setting that differs."""
    before, now = settings_record(saved), settings_record(current)
    lines = []
    for key in sorted(set(before) & set(now)):
        if not may_change(key) and before[key] != now[key]:
            lines.append(f"{key}={_show(before[key])}; this run has {_show(now[key])}")
    return lines


def read_settings(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{path} cannot be read ({err}); it records the settings this workdir was trained "
            "with. Restore it, or use another --workdir"
        ) from err
    if not isinstance(saved, Mapping) or "config" not in saved:
        raise ConfigError(f"{path} is not a settings record of deformable_detr_jax")
    return dict(saved)


def write_settings(workdir: str, record: Mapping[str, Any]) -> None:
    """Writes `config.json` (atomically: a temporary file renamed over it)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, SETTINGS_FILE)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


def check_settings(
    workdir: str,
    current: Mapping[str, Any],
    *,
    shown: str | None = None,
    fallback: Mapping[str, Any] | None = None,
) -> None:
    """Raises `ConfigError` listing every difference between `current` (a `payload`) and the
    settings the workdir was trained with (`config.json`, else `fallback`: the same payload
    rebuilt from a checkpoint's meta item, for workdirs written before `config.json` existed).

    `shown`: the workdir as the user wrote it, for the message."""
    saved = read_settings(workdir) or fallback
    if saved is None:
        logger.warning("workdir %s records no settings: its settings are not compared", workdir)
        return
    lines = differences(saved, current)
    if not lines:
        return
    name = shown or workdir
    advice = "use another --workdir or the same settings"
    if len(lines) == 1:
        raise ConfigError(f"workdir {name} was trained with {lines[0]}: {advice}")
    raise ConfigError(
        f"workdir {name} was trained with other settings than this run ({len(lines)} "
        "differences):\n" + "\n".join(f"  {line}" for line in lines) + f"\n{advice}"
    )
