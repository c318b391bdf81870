"""Values typed at the CLI: bad ones are refused with the accepted forms, odd-looking good ones are taken."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CliResult


def refused(result: CliResult, message: str) -> None:
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr, result.stderr
    assert "hint: " in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_audit_refuses_a_time_that_is_not_one(cli: object, option: str) -> None:
    result: CliResult = cli("audit", "ls", option, "notadate")  # type: ignore[operator]
    refused(result, "invalid timestamp 'notadate'")
    assert "2026-11-01T09:30:00Z" in result.stderr


def test_audit_since_and_until_take_dates_times_and_offsets(cli: object) -> None:
    assert cli("prefs", "set", "offline", "true").returncode == 0  # type: ignore[operator]
    events = json.loads(cli("audit", "ls", "--json").stdout)  # type: ignore[operator]
    assert len(events) == 1
    at = events[0]["at"]  # e.g. 2026-12-02T12:38:04.123456Z
    day = at[:10]
    for since, until, expected in [
        (day, "9999-12-31", 1),
        (at, None, 1),  # inclusive
        (None, at, 0),  # exclusive
        (at[:19] + "+00:00", None, 1),  # same second, offset form: at or before the event
        (at[:19] + "-01:00", None, 0),  # an hour later
        ("2000-01-01T00:00:00Z", day, 0),
    ]:
        args = [*(["--since", since] if since else []), *(["--until", until] if until else [])]
        result: CliResult = cli("audit", "ls", "--json", *args)  # type: ignore[operator]
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)) == expected, (since, until)


def test_downloads_refuse_an_unknown_state(cli: object) -> None:
    result: CliResult = cli("downloads", "ls", "--state", "pending", "--state", "bogus")  # type: ignore[operator]
    refused(result, "invalid download state 'bogus'")
    assert "pending, approved, queued, running, done, failed, denied, cancelled" in result.stderr
    assert cli("downloads", "ls", "--state", "failed", "--json").stdout.strip() == "[]"  # type: ignore[operator]


@pytest.mark.parametrize("value", ["-5", "-1", "--5"])
def test_prefs_set_takes_a_value_starting_with_a_dash(cli: object, value: str) -> None:
    result: CliResult = cli("prefs", "set", "models.cache.max_bytes", value)  # type: ignore[operator]
    refused(result, "invalid value for models.cache.max_bytes")
    assert "No such option" not in result.stderr


def test_prefs_set_still_has_help(cli: object) -> None:
    result: CliResult = cli("prefs", "set", "--help")  # type: ignore[operator]
    assert result.returncode == 0
    assert "Example: appliance prefs set" in result.stdout
