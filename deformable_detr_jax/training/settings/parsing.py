"""A recipe's ConfigDict (or a mapping of the same groups) -> `Settings`, and back.

`parse` is called once, where a run starts (`train()`); every other room receives the typed
groups. A key that is no setting, a value of the wrong type or outside its choices, and a setting
that would do nothing raise `ConfigError` naming it and the nearest valid one. Missing keys take
the field's default, so `train({"data": {...}})` gets what the recipes get.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from deformable_detr_jax.training.settings import groups
from deformable_detr_jax.training.settings.errors import ConfigError


def _hint(field: dataclasses.Field) -> Any:
    hint = field.type
    return eval(hint, vars(groups)) if isinstance(hint, str) else hint  # noqa: S307 (our types)


def _is_settings(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _nearest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else f" (settings: {', '.join(candidates)})"


def _as_plain(config: Any) -> Any:
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else config


def _unknown(where: str, key: str, names: list[str]) -> ConfigError:
    dotted = f"{where}.{key}" if where else key
    if where == "model" and key in groups.MODEL_LOSS_FIELDS:
        kept = "kept in the model config only for transformers' config.json"
        if key in names_of(groups.LossSettings):
            return ConfigError(
                f"{dotted} does nothing ({kept}): set model.loss.{key}, which the loss reads"
            )
        loss = ", ".join(names_of(groups.LossSettings))
        return ConfigError(
            f"{dotted} does nothing ({kept}) and the loss has no such setting; model.loss has "
            f"{loss}"
        )
    candidates = [f"{where}.{n}" if where else n for n in names]
    return ConfigError(f"{dotted} is not a setting{_nearest(dotted, candidates)}")


def names_of(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _wrong(where: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field type `hint`, or ConfigError naming `where`."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is tuple or hint is tuple:
        if not isinstance(value, (tuple, list)):
            return _tuple_error(value, where)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise _wrong(where, value, f"a tuple of {len(args)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, (bool, _np_bool())):
            raise _wrong(where, value, "True or False")
        return bool(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(where, value, "a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _wrong(where, value, "a whole number")
        return int(value)
    if hint is str:
        if not isinstance(value, str):
            raise _wrong(where, value, "a string")
        return value
    return value


def _tuple_error(value: Any, where: str):
    raise _wrong(where, value, "a tuple, e.g. (1, 2)")


def _np_bool():
    import numpy as np

    return np.bool_


def parse_group(cls: type, raw: Any, where: str) -> Any:
    """One group (and its sub-groups) of `cls` from a mapping; defaults for missing keys."""
    raw = _as_plain(raw)
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a group of settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _unknown(where, str(key), list(fields))
    values = {}
    for name, value in raw.items():
        field, dotted = fields[name], f"{where}.{name}" if where else name
        hint = _hint(field)
        if _is_settings(hint):
            values[name] = parse_group(hint, value, dotted)
            continue
        values[name] = _convert(value, hint, dotted)
        choices = field.metadata.get("choices", ())
        if choices and values[name] not in choices:
            near = _nearest(str(values[name]), [str(c) for c in choices])
            raise ConfigError(f"{dotted}={values[name]!r} is not one of {', '.join(choices)}{near}")
    return cls(**values)


def parse(config: Any) -> groups.Settings:
    """The typed `Settings` of a recipe's ConfigDict or a mapping of its groups."""
    if isinstance(config, groups.Settings):
        return config
    return parse_group(groups.Settings, config, "")


# ----------------------------------------------------------------------------- back to plain data


def as_dict(settings: Any) -> dict[str, Any]:
    """The settings as nested plain dicts (the format of a recipe's `to_dict()`)."""
    out = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        out[field.name] = as_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def _placeholder_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    inner = args[0] if args else hint
    return typing.get_origin(inner) or inner


def to_config_dict(settings: Any) -> ml_collections.ConfigDict:
    """A ConfigDict of the settings: every key present, a None value a typed placeholder, so that
    `--config.group.key=value` is checked against it."""
    group = ml_collections.ConfigDict()
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            group[field.name] = to_config_dict(value)
        elif value is None:
            group[field.name] = config_dict.placeholder(_placeholder_type(_hint(field)))
        else:
            group[field.name] = value
    return group


def field_of(dotted: str) -> dataclasses.Field | None:
    """The field of a dotted setting name (`"optimizer.lr"`), or None when it is no setting."""
    cls: Any = groups.Settings
    field = None
    for part in dotted.split("."):
        if not _is_settings(cls):
            return None
        field = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if field is None:
            return None
        cls = _hint(field)
    return field


def check_name(dotted: str) -> None:
    """Raises ConfigError when `dotted` (e.g. `"train.num_steps"`) names no setting (with the
    nearest one, or where a model loss field belongs)."""
    cls: Any = groups.Settings
    where = ""
    for part in dotted.split("."):
        if not _is_settings(cls):
            raise ConfigError(f"{where} is a setting, not a group: {dotted} names nothing")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise _unknown(where, part, list(fields))
        cls = _hint(fields[part])
        where = f"{where}.{part}" if where else part
