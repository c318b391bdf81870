"""The docs cannot drift: every setting, CLI command and error code is in the README."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from pydantic import BaseModel

from appliance.cli import cli
from appliance.errors import all_error_classes
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


def test_every_command_has_an_example_in_its_help() -> None:
    def walk(group: click.Group) -> Iterator[click.Command]:
        for command in group.commands.values():
            if isinstance(command, click.Group):
                yield from walk(command)
            else:
                yield command

    missing = [command.name for command in walk(cli) if "Example: appliance" not in (command.help or "")]
    assert missing == []
