"""Query values for the audit log and the downloads list: normalised when valid, refused clearly when not."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidInput
from appliance.queries import DOWNLOAD_STATES, check_download_states, parse_timestamp
from appliance.store.base import utcnow


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2026-11-01", "2026-11-01T00:00:00.000000Z"),
        ("2026-11-01T09:30:00Z", "2026-11-01T09:30:00.000000Z"),
        ("2026-11-01T09:30:00.25Z", "2026-11-01T09:30:00.250000Z"),
        ("2026-11-01T09:30:00", "2026-11-01T09:30:00.000000Z"),
        ("2026-11-01T11:30:00+02:00", "2026-11-01T09:30:00.000000Z"),
        ("2026-11-01T00:30:00-01:00", "2026-11-01T01:30:00.000000Z"),
        (" 2026-11-01 09:30 ", "2026-11-01T09:30:00.000000Z"),
        ("0001-01-01", "0001-01-01T00:00:00.000000Z"),
    ],
)
def test_timestamp_is_normalised_to_the_stored_form(text: str, stored: str) -> None:
    assert parse_timestamp(text) == stored


def test_normalised_timestamps_order_like_stored_ones() -> None:
    now = utcnow()
    assert len(parse_timestamp(now)) == len(now)
    assert parse_timestamp("2000-01-01") < now < parse_timestamp("9999-12-31")


@pytest.mark.parametrize(
    "text", ["notadate", "", "2026-13-01", "2026-11-01T25:00:00Z", "yesterday", "0001-01-01T00:00:00+01:00"]
)
def test_bad_timestamp_is_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_timestamp(text)
    assert caught.value.code == "invalid_input"
    assert repr(text) in caught.value.message
    assert "2026-11-01T09:30:00Z" in caught.value.hint


def test_every_download_state_is_accepted() -> None:
    assert check_download_states(DOWNLOAD_STATES) == DOWNLOAD_STATES
    assert check_download_states(["pending", "done"]) == ("pending", "done")
    assert check_download_states(()) == ()


@pytest.mark.parametrize("states", [["bogus"], ["pending", "Pending"], [""]])
def test_unknown_download_state_is_refused_with_the_accepted_ones(states: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_download_states(states)
    assert caught.value.code == "invalid_input"
    assert "pending, approved, queued, running, done, failed, denied, cancelled" in caught.value.hint
