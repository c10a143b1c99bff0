"""The typed-function command builder (``kiln.cli.args``) with real argparse: ``--config``
files (YAML and JSON) fill in the flags not typed, typed flags win wherever they stand, and a
bad file is a usage error (exit 2) naming the file and the key."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiln.cli.args import add_command, call_command


@dataclass(frozen=True)
class Knobs:
    """Args:
    temperature: 0 for greedy.
    top_k: keep the k likeliest tokens.
    """

    temperature: float = 1.0
    top_k: int | None = None


def demo(
    name: str,
    count: int = 3,
    stop: list[str] | None = None,
    loud: bool = False,
    knobs: Knobs = Knobs(),
) -> dict[str, Any]:
    """A command with every kind of flag.

    Args:
        name: a required flag.
        count: an int flag.
        stop: a repeatable flag.
        loud: a --loud/--no-loud switch.
        knobs: an option group.
    """
    return {"name": name, "count": count, "stop": stop, "loud": loud, "knobs": knobs}


def run(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="t")
    add_command(parser.add_subparsers(required=True), demo)
    return call_command(parser.parse_args(["demo", *argv]))


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_without_config_flags_and_defaults_as_before() -> None:
    out = run("--name", "a", "--stop", "x", "--stop", "y", "--loud", "--top-k", "5")
    assert out == {
        "name": "a",
        "count": 3,
        "stop": ["x", "y"],
        "loud": True,
        "knobs": Knobs(temperature=1.0, top_k=5),
    }


def test_yaml_config_fills_every_kind_of_flag(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "c.yaml",
        "name: from-file\ncount: 7\nstop: [a, b]\nloud: true\ntemperature: 0\ntop-k: 4\n",
    )
    out = run("--config", config)
    assert out == {
        "name": "from-file",  # a required flag may come from the file
        "count": 7,
        "stop": ["a", "b"],
        "loud": True,
        "knobs": Knobs(temperature=0.0, top_k=4),
    }
    assert type(out["knobs"].temperature) is float


@pytest.mark.parametrize("config_first", [True, False])
def test_typed_flags_win_over_the_file_wherever_they_stand(
    tmp_path: Path, config_first: bool
) -> None:
    data = {"name": "f", "count": 7, "stop": ["a"], "loud": True, "temperature": 0.5}
    config = ["--config", write(tmp_path, "c.json", json.dumps(data))]
    typed = ["--count", "2", "--stop", "z", "--no-loud", "--temperature", "0.25"]
    out = run(*(config + typed if config_first else typed + config))
    assert out == {
        "name": "f",
        "count": 2,
        "stop": ["z"],  # replaced, not appended to
        "loud": False,
        "knobs": Knobs(temperature=0.25, top_k=None),
    }


def test_a_flag_left_to_its_default_does_not_hide_the_file(tmp_path: Path) -> None:
    # --count typed with its default value still wins; an untyped one takes the file's.
    config = write(tmp_path, "c.yaml", "name: f\ncount: 9\ntop_k: 8\n")
    assert run("--config", config, "--count", "3")["count"] == 3
    assert run("--config", config)["knobs"].top_k == 8


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("c.yaml", "name: f\ncolour: red\n", "'colour' is not a flag of this command"),
        ("c.yaml", "name: f\ncount: many\n", "'count': invalid value 'many'"),
        ("c.yaml", "name: f\nloud: maybe\n", "'loud' must be true or false, got 'maybe'"),
        ("c.yaml", "name: yes\n", "'name' got True"),
        ("c.json", '{"name": ', "not valid JSON"),
        ("c.yaml", "name: [unclosed\n", "not valid YAML"),
        ("c.yaml", "- a list\n", "expected a mapping of flag names to values"),
        ("c.toml", "name = 'f'\n", "a config file is .yaml, .yml or .json"),
    ],
)
def test_a_bad_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, needle: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(SystemExit) as exit_info:
        run("--config", path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {path}: " in err and needle in err, err


def test_a_missing_config_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("--name", "a", "--config", str(tmp_path / "absent.yaml"))
    assert exit_info.value.code == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_a_required_flag_is_still_required_without_the_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        run("--count", "1")
    assert "the following arguments are required: --name" in capsys.readouterr().err


def test_a_hand_built_command_without_config_still_runs() -> None:
    # Commands built beside add_command (positional arguments) dispatch through call_command.
    parser = argparse.ArgumentParser(prog="t")
    sub = parser.add_subparsers(required=True)
    hand = sub.add_parser("hand")
    hand.add_argument("a")
    hand.set_defaults(_command=lambda a: a.upper(), _groups={})
    assert call_command(parser.parse_args(["hand", "x"])) == "X"
