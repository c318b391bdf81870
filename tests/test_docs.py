"""The docs cannot drift: every setting, CLI command and error code is in the README."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from pydantic import BaseModel

import appliance.errors
from appliance.cli import cli
from appliance.errors import ApplianceError, all_error_classes
from appliance.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def setting_names(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_names(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def command_paths(group: click.Group, prefix: str = "appliance") -> Iterator[str]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from command_paths(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}"


@pytest.mark.parametrize("name", list(setting_names(Settings)))
def test_every_setting_is_documented_with_its_variable(name: str) -> None:
    assert f"`{name}`" in README
    assert f"`APPLIANCE_{name.upper().replace('.', '__')}`" in README


@pytest.mark.parametrize("command", list(command_paths(cli)))
def test_every_command_is_documented(command: str) -> None:
    assert f"`{command}" in README


@pytest.mark.parametrize("error", all_error_classes(), ids=lambda error: error.code)
def test_every_error_code_is_documented(error: type) -> None:
    assert f"| `{error.code}` | {error.status} |" in README  # type: ignore[attr-defined]


_TREE_LINE = re.compile(
    r"^    (?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+)(?: \((?P<status>\d+)\))? +(?P<code>[a-z_]+)"
)


def test_the_error_tree_drawing_matches_the_classes() -> None:
    """Each class sits under its real parent, with its own code and status, and none is missing."""
    drawn: dict[str, tuple[str | None, int, str]] = {}  # name: (parent, status, code)
    parents: list[str] = []
    for line in (appliance.errors.__doc__ or "").splitlines():
        match = _TREE_LINE.match(line)
        if match is None:
            continue
        depth = len(match["indent"]) // 4
        del parents[depth:]
        parent = parents[-1] if parents else None
        status = int(match["status"]) if match["status"] else drawn[parent][1] if parent else 0
        drawn[match["name"]] = (parent, status, match["code"])
        parents.append(match["name"])
    actual = {
        cls.__name__: (
            next((base.__name__ for base in cls.__bases__ if issubclass(base, ApplianceError)), None),
            cls.status,
            cls.code,
        )
        for cls in all_error_classes()
        if cls.__module__ == "appliance.errors"  # not the CLI client's relay of a server's error
    }
    assert drawn == actual


def test_every_command_has_an_example_in_its_help() -> None:
    def walk(group: click.Group) -> Iterator[click.Command]:
        for command in group.commands.values():
            if isinstance(command, click.Group):
                yield from walk(command)
            else:
                yield command

    missing = [command.name for command in walk(cli) if "Example: appliance" not in (command.help or "")]
    assert missing == []
