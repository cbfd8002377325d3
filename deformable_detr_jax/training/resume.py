"""What a workdir remembers of the run that wrote it, and what a resumed run may change.

The first checkpoint of a workdir is written together with `workdir/config.json`: the run's whole
config and the model config it resolved to (`num_labels` from the data, the fields of a
`model.init_from` checkpoint). A run that finds checkpoints in its workdir compares its settings
with that file before anything is compiled and stops with one `ConfigError` listing every
difference, e.g.

    workdir runs/x was trained with model.d_model=64; this run has 96: use another --workdir or
    the same settings

Every setting is compared except those whose field says `may_change` (`settings/groups.py`):
how long to train, how often to log, evaluate and checkpoint, where the data files are and how
they are loaded, which kernel computes the attention, and the optimizer's rates and schedule
(lowering a learning rate and resuming is a manual schedule). The model, what is frozen, the
optimizer groups, the data (source, order, augmentation, batch), the dtypes and the seeds shape
the state or the run and must stay as they were. A setting the file does not know (added by a
later version) is not compared, nor one that is no setting of this version (the model config's
transformers loss fields, `model.bbox_loss_coefficient` etc., that a workdir written before
they were dropped from the recipe holds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.training import settings as settings_lib
from deformable_detr_jax.training.settings import ConfigError

logger = logging.getLogger(__name__)

SETTINGS_FILE = "config.json"
FORMAT = 1


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
    """What `config.json` holds: the run's settings (`config`: `Settings`, or a recipe that
    parses to them) and the model config they resolved to."""
    settings = settings_lib.as_dict(settings_lib.parse(config))
    record = {"format": FORMAT, "config": settings, "model": dataclasses.asdict(model)}
    return json.loads(json.dumps(record))


def compared(key: str) -> bool:
    """Whether a resumed run must keep the dotted setting `key` as it was: a setting of this
    version whose field does not say `may_change`."""
    field = settings_lib.field_of(key)
    return field is not None and not field.metadata.get("may_change", False)


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
        if compared(key) and before[key] != now[key]:
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


def settings_from_checkpoints(checkpoints) -> dict[str, Any] | None:
    """The `payload` of a workdir written before `config.json` existed, rebuilt from the newest
    checkpoint (`checkpointing.Checkpoints`) whose meta item reads."""
    for step in reversed(checkpoints.all_steps()):
        meta = checkpoints.read_meta(step)
        if meta and "config" in meta and "model_config" in meta:
            model = DeformableDetrConfig.from_hf(meta["model_config"])
            return {
                "config": meta["config"],
                "model": json.loads(json.dumps(dataclasses.asdict(model))),
            }
    return None
