"""Typed, validated run configurations read from TOML files.

A protocol declares its configuration as a (nested) frozen dataclass; :func:`load_config` reads a
TOML file (or a dict) into it and rejects unknown keys, wrong types and wrong units with an error
that names the key. Quantities are written with their unit as a string, ``tau_m = "20 ms"``.
:func:`config_to_dict` turns a configuration back into plain TOML/JSON values for the run record.

Example::

    @dataclass(frozen=True)
    class Fit:
        seed: int = 0
        duration: Quantity = unit_default(25 * ms)
        arm: Literal["pretrained", "supervised"] = "pretrained"

    load_config({"seed": 3, "duration": "50 ms"}, Fit)
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import brian2.units as b2units
import brian2.units.allunits as b2allunits
from brian2 import Quantity, second
from brian2.units.fundamentalunits import DimensionMismatchError, fail_for_dimension_mismatch


class ConfigError(ValueError):
    """A configuration key that is unknown, of the wrong type or of the wrong unit."""


_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*?\s*([A-Za-z]+)\s*$")


def _unit(name: str) -> Quantity | None:
    """A Brian2 unit by the name Brian2 prints it with (``ms``, ``kHz``, ``s``, ``mV`` ...)."""
    if name == "s":
        return second
    for module in (b2units, b2allunits):
        unit = getattr(module, name, None)
        if isinstance(unit, Quantity):
            return unit
    return None


def parse_quantity(text: str, like: Quantity, key: str = "value") -> Quantity:
    """``"25 ms"`` → ``25*ms``, checked to have the dimensions of ``like``."""
    match = _QUANTITY.match(text) if isinstance(text, str) else None
    unit = _unit(match[2]) if match else None
    if not isinstance(unit, Quantity):
        raise ConfigError(f"{key} = {text!r}: write a number and a unit, e.g. {str(like)!r}")
    value = float(match[1]) * unit
    try:
        fail_for_dimension_mismatch(value, like)
    except DimensionMismatchError:
        raise ConfigError(f"{key} = {text!r} has the wrong unit; give it like {str(like)!r}") from None
    return value


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _convert(value: Any, hint: Any, default: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table of keys, got {value!r}")
        return _build(value, hint, key)
    if hint is Quantity:
        if isinstance(value, Quantity):
            return parse_quantity(str(value), default, key) if default is not dataclasses.MISSING else value
        return parse_quantity(value, default, key)
    if origin is Literal:
        if value not in get_args(hint):
            allowed = ", ".join(repr(a) for a in get_args(hint))
            raise ConfigError(f"{key} = {value!r} is not one of {allowed}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, default, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key} = {value!r}: " + "; ".join(errors))
    if origin in (tuple, list):
        (item,) = {a for a in get_args(hint) if a is not Ellipsis} or {Any}
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return origin(_convert(v, item, dataclasses.MISSING, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ConfigError(f"{key} must be {'a string' if hint is str else 'true or false'}, got {value!r}")
        return value
    raise TypeError(f"config field {key} has a type load_config does not handle: {hint!r}")


def _build(values: dict, schema: type, prefix: str = "") -> Any:
    hints = typing.get_type_hints(schema)
    known = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f" in [{prefix}]" if prefix else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
            f"{where}; known keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, field in known.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], _default(field), key)
        elif _default(field) is dataclasses.MISSING:
            raise ConfigError(f"config key {key!r} is required")
    try:
        return schema(**kwargs)
    except (ValueError, TypeError) as err:  # the dataclass's own checks (ranges, choices)
        raise ConfigError(f"{prefix or schema.__name__}: {err}") from None


def load_config(source: str | Path | dict, schema: type) -> Any:
    """Read a TOML file (path) or a dict into the dataclass ``schema``, validating every key."""
    if isinstance(source, dict):
        return _build(source, schema)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    try:
        return _build(values, schema)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_to_dict(config: Any) -> Any:
    """Plain TOML/JSON values of a configuration: quantities as strings like ``'25. ms'``."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Quantity):
        return str(config)
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    return config
