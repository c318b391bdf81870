"""Join tokens and node credentials: their text, and the hashes the server keeps of them.

A join token is ``apjoin1.<fingerprint>.<token id>.<secret>``: ``<fingerprint>`` is the hex of
the server CA's SHA-256 fingerprint (``appliance tls show`` prints it with ``sha256:``), or ``-``
when the server answers plain HTTP, so a worker can pin the CA before it sends anything (as
kubeadm and k3s tokens do). A node credential is ``apnode_`` and 43 URL-safe characters; a
worker sends it as ``Authorization: Bearer apnode_…``. A server credential is ``apserver_`` and 43
more: what a server sharing the database sends to fetch a peer's blobs (``cluster/peers.py``). The
server keeps the SHA-256 of each secret only (256 random bits need no slow hash).

Shared by the server and the worker. Imports: errors only.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from appliance.errors import InvalidInput

__all__ = [
    "CREDENTIAL_PREFIX",
    "JOIN_PREFIX",
    "JoinTokenText",
    "hash_secret",
    "is_node_credential",
    "is_server_credential",
    "make_credential",
    "make_join_token",
    "make_server_credential",
    "parse_join_token",
]

JOIN_PREFIX = "apjoin1"
CREDENTIAL_PREFIX = "apnode_"
SERVER_CREDENTIAL_PREFIX = "apserver_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{8,32}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
_CREDENTIAL = re.compile(rf"^{CREDENTIAL_PREFIX}[A-Za-z0-9_-]{{43}}$")
_SERVER_CREDENTIAL = re.compile(rf"^{SERVER_CREDENTIAL_PREFIX}[A-Za-z0-9_-]{{43}}$")


@dataclass(frozen=True)
class JoinTokenText:
    """A join token's parts. ``fingerprint`` is ``sha256:HEX``, or None for a plain-HTTP server."""

    fingerprint: str | None
    token_id: str
    secret: str

    def __str__(self) -> str:
        pinned = "-" if self.fingerprint is None else self.fingerprint.removeprefix("sha256:")
        return f"{JOIN_PREFIX}.{pinned}.{self.token_id}.{self.secret}"


def make_join_token(fingerprint: str | None) -> JoinTokenText:
    """A new token: a random id and a 256-bit secret, carrying ``fingerprint`` (``sha256:HEX``)."""
    if fingerprint is not None and not _HEX64.match(fingerprint.removeprefix("sha256:")):
        raise InvalidInput(f"{fingerprint!r} is not a sha256:HEX certificate fingerprint")
    return JoinTokenText(fingerprint, secrets.token_hex(8), secrets.token_urlsafe(32))


def parse_join_token(text: str) -> JoinTokenText:
    """The parts of a join token; InvalidInput (saying which part) when it is not one."""
    parts = text.strip().split(".")
    hint = "copy the whole token `appliance nodes token create` printed (it starts with apjoin1.)"
    if len(parts) != 4 or parts[0] != JOIN_PREFIX:
        raise InvalidInput(f"not a join token: it should read {JOIN_PREFIX}.FINGERPRINT.ID.SECRET", hint=hint)
    _, pinned, token_id, secret = parts
    if pinned != "-" and not _HEX64.match(pinned):
        raise InvalidInput("not a join token: its fingerprint is not 64 hex digits or -", hint=hint)
    if not _TOKEN_ID.match(token_id) or not _SECRET.match(secret):
        raise InvalidInput("not a join token: its id or secret is malformed", hint=hint)
    return JoinTokenText(None if pinned == "-" else f"sha256:{pinned}", token_id, secret)


def make_credential() -> str:
    return CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


def is_node_credential(text: str) -> bool:
    return bool(_CREDENTIAL.match(text))


def make_server_credential() -> str:
    return SERVER_CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


def is_server_credential(text: str) -> bool:
    return bool(_SERVER_CREDENTIAL.match(text))


def hash_secret(secret: str) -> str:
    """The SHA-256 hex the server stores of a join token's secret or a node credential."""
    return hashlib.sha256(secret.encode()).hexdigest()
