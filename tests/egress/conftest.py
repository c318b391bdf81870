"""Fixtures of the egress tests: the fake providers (tests/egress/fakes.py) on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.egress.fakes import FakeAnthropic, FakeOpenAI, serve_fake_anthropic, serve_fake_openai


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with serve_fake_openai() as fake:
        yield fake


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with serve_fake_anthropic() as fake:
        yield fake
