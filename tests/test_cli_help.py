"""Every option and argument of every command line has help text: the console scripts of
pyproject.toml, their argparse parsers caught as they parse (subcommands included) and train.py's
absl flags."""

from __future__ import annotations

import argparse
import importlib
import pathlib
import tomllib

import pytest
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


class _Caught(Exception):
    pass


def _parsers_of(entry, monkeypatch) -> list[argparse.ArgumentParser]:
    """The argparse parsers `entry([])` parses with (it is stopped right there)."""
    caught = []

    def catch(self, args=None, namespace=None):
        caught.append(self)
        raise _Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(_Caught):
        entry([])
    return caught


def _actions_without_help(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    missing = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                missing += _actions_without_help(sub, f"{prefix}{command} ")
            continue
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append(prefix + name)
    return missing


def _absl_flags_without_help(module_name: str) -> list[str]:
    defined = flags.FLAGS.flags_by_module_dict().get(module_name, [])
    return [f"--{flag.name}" for flag in defined if not (flag.help or "").strip()]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_option_has_help(script, monkeypatch):
    module_name, function = SCRIPTS[script].split(":")
    module = importlib.import_module(module_name)
    absl_defined = flags.FLAGS.flags_by_module_dict().get(module_name)
    if absl_defined:  # train.py: absl flags, parsed by app.run
        assert len(absl_defined) >= 6, [f.name for f in absl_defined]
        assert _absl_flags_without_help(module_name) == []
        return
    parsers = _parsers_of(getattr(module, function), monkeypatch)
    assert parsers and all(len(p._actions) > 1 for p in parsers)  # more than --help
    missing = [name for parser in parsers for name in _actions_without_help(parser)]
    assert missing == [], f"{script}: no help text for {missing}"


def test_the_check_finds_an_option_without_help():
    parser = argparse.ArgumentParser()
    parser.add_argument("--with", help="described")
    parser.add_argument("--without")
    commands = parser.add_subparsers(dest="command", help="what to do")
    commands.add_parser("go").add_argument("target")
    assert _actions_without_help(parser) == ["--without", "go target"]
