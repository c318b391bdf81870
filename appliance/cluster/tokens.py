"""Join tokens: what an admin hands to a machine that should become a worker.

    apjoin1.<fingerprint>.<token id>.<secret>

``<fingerprint>`` is the server CA's sha256 (64 hex digits, without ``sha256:``), or ``-`` when
the server serves plain HTTP: the worker pins that CA before it sends the secret anywhere, so
joining over TLS needs no CA set-up and cannot be intercepted (as k3s and kubeadm tokens do).
The server keeps only ``sha256(secret)``. Imports: errors only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.errors import InvalidInput

__all__ = ["PREFIX", "JoinToken", "format_token", "parse_token"]

PREFIX = "apjoin1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PART = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class JoinToken:
    fingerprint: str | None  # "sha256:HEX" of the server's CA; None: the server serves plain HTTP
    token_id: str
    secret: str

    def __str__(self) -> str:
        return format_token(self.fingerprint, self.token_id, self.secret)


def format_token(fingerprint: str | None, token_id: str, secret: str) -> str:
    pin = "-" if fingerprint is None else fingerprint.removeprefix("sha256:").lower()
    return f"{PREFIX}.{pin}.{token_id}.{secret}"


def parse_token(text: str) -> JoinToken:
    """The token's parts, or InvalidInput saying what is wrong with it (never echoing the secret)."""
    hint = "copy the whole token `appliance nodes token create` printed on the server (apjoin1.…)"
    parts = text.strip().split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise InvalidInput(
            f"not a join token: it should read {PREFIX}.<fingerprint>.<id>.<secret>", hint=hint
        )
    _, pin, token_id, secret = parts
    if pin != "-" and not _HEX64.match(pin.lower()):
        raise InvalidInput("the join token's fingerprint is neither 64 hex digits nor '-'", hint=hint)
    if not _PART.match(token_id) or not _PART.match(secret):
        raise InvalidInput(
            "the join token's id or secret is empty or has characters a token never has", hint=hint
        )
    return JoinToken(None if pin == "-" else f"sha256:{pin.lower()}", token_id, secret)
