"""Output kept up to the cap, cut on a UTF-8 boundary, and streamed as it is kept."""

from __future__ import annotations

import pytest

from appliance.tasks import OutputChunk
from appliance.tasks.output import OutputCapture, utf8_prefix
from tests.tasks.conftest import RunScript


def test_output_past_the_cap_is_cut_before_a_split_character_and_flagged(run_script: RunScript) -> None:
    # 9 bytes of "a", then "é" (2 bytes) would end at byte 11: a cap of 10 keeps the "a"s only.
    result = run_script("printf 'aaaaaaaaaé and more'\nprintf 'short' >&2\n", output_bytes=10)
    assert result.stdout == "a" * 9
    assert result.stderr == "short"
    assert (result.truncated.stdout, result.truncated.stderr) == (True, False)
    assert result.ok


def test_a_job_printing_far_past_the_cap_is_not_blocked(run_script: RunScript) -> None:
    result = run_script("head -c 5000000 /dev/zero | tr '\\0' x\necho done >&2\n", output_bytes=1000)
    assert result.stdout == "x" * 1000
    assert result.stderr == "done\n"
    assert result.truncated.stdout
    assert result.ok


def test_the_default_cap_is_256_kib_per_stream(run_script: RunScript) -> None:
    result = run_script("head -c 300000 /dev/zero | tr '\\0' y\n")
    assert len(result.stdout) == 256 * 1024
    assert result.truncated.stdout


@pytest.mark.parametrize(
    ("data", "limit", "kept"),
    [
        (b"abc", 5, b"abc"),
        ("abé".encode(), 3, b"ab"),  # é is 2 bytes
        ("a€".encode(), 3, b"a"),  # € is 3 bytes
        ("a€".encode(), 4, "a€".encode()),
        ("😀b".encode(), 3, b""),  # 😀 is 4 bytes
        ("😀b".encode(), 4, "😀".encode()),
        (b"\xff\xfe\xfd\xfc", 2, b"\xff\xfe"),  # not UTF-8: cut at the cap
    ],
)
def test_utf8_prefix_never_ends_inside_a_character(data: bytes, limit: int, kept: bytes) -> None:
    assert utf8_prefix(data, limit) == kept


def test_streamed_text_is_what_is_kept_even_when_a_character_spans_reads() -> None:
    chunks: list[OutputChunk] = []
    capture = OutputCapture("stdout", limit=6, on_output=chunks.append)
    data = "ab€€".encode()  # 2 + 3 + 3 bytes: the cap of 6 falls inside the second €
    capture.feed(data[:3])  # "ab" and the first byte of €
    capture.feed(data[3:])
    capture.close()
    assert capture.text == "ab€"
    assert capture.truncated
    assert "".join(chunk.text for chunk in chunks) == "ab€"


def test_a_character_cut_off_by_the_end_of_output_reads_as_a_replacement() -> None:
    chunks: list[OutputChunk] = []
    capture = OutputCapture("stderr", limit=100, on_output=chunks.append)
    capture.feed("x€".encode()[:2])
    capture.close()
    assert capture.text == "x\ufffd"
    assert "".join(chunk.text for chunk in chunks) == "x\ufffd"
    assert not capture.truncated
