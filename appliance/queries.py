"""Validation of list-query values shared by the CLI and the HTTP API.

A filter that cannot match (a date that is not a date, a state that does not exist) is refused
with the accepted forms instead of silently returning nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import get_args

from appliance.errors import InvalidInput
from appliance.store.base import DownloadState

__all__ = ["DOWNLOAD_STATES", "check_download_states", "parse_timestamp"]

DOWNLOAD_STATES: tuple[str, ...] = get_args(DownloadState)

_TIMESTAMP_HINT = (
    "use ISO 8601: a date (2026-11-01, midnight UTC), a UTC time (2026-11-01T09:30:00Z) "
    "or a time with an offset (2026-11-01T09:30:00+02:00)"
)


def parse_timestamp(text: str) -> str:
    """``text`` as the stored form ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, so string comparison orders it.

    A time without an offset is taken as UTC.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"invalid timestamp {text!r}", hint=_TIMESTAMP_HINT) from exc
    # isoformat, unlike strftime, always writes a four-digit year.
    return moment.isoformat(timespec="microseconds") + "Z"


def check_download_states(states: Iterable[str]) -> tuple[str, ...]:
    """``states`` unchanged, once each is known to be a download state."""
    checked = tuple(states)
    for state in checked:
        if state not in DOWNLOAD_STATES:
            raise InvalidInput(
                f"invalid download state {state!r}", hint=f"use one of: {', '.join(DOWNLOAD_STATES)}"
            )
    return checked
