"""Config files: unknown keys, wrong types and wrong units are errors naming the key."""

import dataclasses
import importlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import brian2.units
import pytest
from brian2 import Hz, Quantity, ms

from models.parameters import LIFParameters, unit_default
from protocols.config import ConfigError, config_to_dict, load_config


@dataclass(frozen=True)
class Inner:
    rate: Quantity = unit_default(100 * Hz)
    images: int = 10


@dataclass(frozen=True)
class Outer:
    seed: int = 0
    arm: Literal["pretrained", "supervised"] = "pretrained"
    lr: float = 0.1
    name: str = "run"
    layers: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    lif: LIFParameters = field(default_factory=LIFParameters)


def test_round_trip_and_units(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\nlr = 1\nlayers = [4, 5]\n[inner]\nrate = "1.5 kHz"\n'
                    '[lif]\ntau_m = "0.05 s"\nreset = "subtract"\n')
    config = load_config(path, Outer)
    assert config.seed == 3 and config.lr == 1.0 and config.layers == (4, 5)
    assert config.inner.rate == 1500 * Hz and config.inner.images == 10
    assert config.lif.tau_m == 50 * ms and config.lif.reset == "subtract"
    assert load_config(config_to_dict(config), Outer) == config


@pytest.mark.parametrize("values, message", [
    ({"sead": 1}, "unknown config key 'sead'; known keys: arm, inner, layers"),
    ({"inner": {"rates": "1 Hz"}}, r"unknown config key 'rates' in \[inner\]"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"arm": "both"}, "arm = 'both' is not one of 'pretrained', 'supervised'"),
    ({"inner": {"rate": "5 ms"}}, "inner.rate = '5 ms' has the wrong unit"),
    ({"inner": {"rate": 100}}, "inner.rate = 100: write a number and a unit"),
    ({"lif": {"reset": "hold"}}, "reset = 'hold' is not one of zero, subtract"),
    ({"inner": 3}, r"\[inner\] must be a table"),
])
def test_bad_keys_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(values, Outer)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", Outer)
    (tmp_path / "bad.toml").write_text("seed = = 1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(tmp_path / "bad.toml", Outer)
    (tmp_path / "typo.toml").write_text("seeds = 1")
    with pytest.raises(ConfigError, match="typo.toml: unknown config key 'seeds'"):
        load_config(tmp_path / "typo.toml", Outer)


def _committed_configs():
    root = Path(__file__).resolve().parents[1] / "configs"
    return sorted(root.rglob("*.toml"))


#: command → (module, config dataclass) of every command that reads a TOML config
COMMANDS = {"sweep": ("protocols.sweep", "SweepConfig"),
            "study": ("protocols.study", "StudyConfig"),
            "pretrain": ("protocols.pretrain", "PretrainConfig"),
            "normad": ("protocols.normad", "NormADRunConfig"),
            "deep_stdp": ("protocols.deep_stdp", "DeepSTDPConfig"),
            "deep_stdp --sweep": ("protocols.deep_stdp", "DeepSTDPSweep")}


@pytest.mark.parametrize("path", _committed_configs(), ids=lambda p: p.name)
def test_every_committed_config_loads(path):
    """Each config under configs/ validates against the dataclass of the command it names (its
    ``python -m protocols.<command>`` line, else its file name's first word)."""
    named = re.search(r"python -m protocols\.(\w+)( --sweep)?", path.read_text())
    command = named.group(1) if named else path.name.split("_")[0]
    if named and named.group(2):  # a command whose --sweep reads a grid of its runs
        command += " --sweep"
    assert command in COMMANDS, f"{path.name} names no command of {sorted(COMMANDS)}"
    module, schema = COMMANDS[command]
    kind = getattr(importlib.import_module(module), schema)
    cfg = load_config(path, kind)
    # every value the file sets is the value the command gets (none dropped, none left to a
    # default, units converted): compared with the file read as plain TOML, not through
    # load_config
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    assert raw, f"{path.name} sets nothing"
    _assert_values_taken(raw, cfg, path.name)


def _file_value(text: str) -> Quantity:
    """'10 ms' or '1.5 kHz' as a Brian2 quantity (number times a unit named in brian2.units)."""
    number, unit = text.split()
    return float(number) * getattr(brian2.units, unit)


def _assert_values_taken(raw: dict, cfg, where: str):
    for key, value in raw.items():
        got = getattr(cfg, key)
        if isinstance(value, dict):
            assert dataclasses.is_dataclass(got), f"{where}: [{key}] is not a table of settings"
            _assert_values_taken(value, got, f"{where} [{key}]")
        elif isinstance(got, Quantity):
            assert got == _file_value(value), f"{where}: {key} = {value!r} loaded as {got!r}"
        elif isinstance(value, list):
            assert list(got) == value, f"{where}: {key} = {value!r} loaded as {got!r}"
        else:
            assert got == value and type(got) is type(value) or (
                isinstance(value, int) and type(got) is float and got == value), \
                f"{where}: {key} = {value!r} loaded as {got!r}"
