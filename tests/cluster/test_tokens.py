"""Join tokens and node credentials as text: made, parsed, refused when malformed."""

from __future__ import annotations

import pytest

from appliance.cluster.tokens import (
    CREDENTIAL_PREFIX,
    JoinTokenText,
    hash_secret,
    is_node_credential,
    make_credential,
    make_join_token,
    parse_join_token,
)
from appliance.errors import InvalidInput

FINGERPRINT = "sha256:" + "ab" * 32


@pytest.mark.parametrize("fingerprint", [FINGERPRINT, None])
def test_a_token_reads_back_as_it_was_made(fingerprint: str | None) -> None:
    made = make_join_token(fingerprint)
    text = str(made)
    assert text.startswith("apjoin1.")
    assert text.split(".")[1] == ("-" if fingerprint is None else "ab" * 32)
    assert parse_join_token(f"  {text}\n") == made


def test_two_tokens_differ_in_id_and_secret() -> None:
    first, second = make_join_token(None), make_join_token(None)
    assert first.token_id != second.token_id
    assert first.secret != second.secret


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "it should read"),
        ("apjoin2.-.0123456789abcdef." + "a" * 43, "it should read"),
        ("apjoin1.-.0123456789abcdef", "it should read"),
        ("apjoin1.abc.0123456789abcdef." + "a" * 43, "fingerprint"),
        ("apjoin1.-.NOTHEX.." + "a" * 43, "it should read"),
        ("apjoin1.-.nothex!." + "a" * 43, "id or secret"),
        ("apjoin1.-.0123456789abcdef.short", "id or secret"),
    ],
)
def test_a_malformed_token_is_refused_saying_which_part(text: str, complaint: str) -> None:
    with pytest.raises(InvalidInput, match=complaint) as raised:
        parse_join_token(text)
    assert "apjoin1" in raised.value.hint


def test_a_fingerprint_that_is_not_one_cannot_go_into_a_token() -> None:
    with pytest.raises(InvalidInput):
        make_join_token("sha256:1234")


def test_a_credential_has_its_prefix_and_is_recognised() -> None:
    credential = make_credential()
    assert credential.startswith(CREDENTIAL_PREFIX)
    assert len(credential) == len(CREDENTIAL_PREFIX) + 43
    assert is_node_credential(credential)
    assert not is_node_credential("apl_" + credential[len(CREDENTIAL_PREFIX) :])
    assert not is_node_credential(credential[:-1])


def test_secrets_are_kept_as_sha256_hex() -> None:
    assert hash_secret("x") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert str(JoinTokenText(None, "0123456789abcdef", "s" * 43)).endswith(".0123456789abcdef." + "s" * 43)
