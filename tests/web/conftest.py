"""Fixtures of the web tests: accounts and API keys made before a server starts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import ApiKey

PASSWORD = "correct horse battery"


@dataclass
class Keys:
    admin: str
    user: str
    revoked: str
    expired: str


@pytest.fixture
def keys(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Keys:
    """Auth on (for the server started after this), an admin and a user, and their keys; made
    through the service in this process (the CLI's own tests run the commands)."""
    monkeypatch.setenv("APPLIANCE_SERVER__AUTH", "on")
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        auth, context = runtime.auth, Context.cli()
        auth.add_user("root", "admin", PASSWORD, context)
        auth.add_user("alice", "user", PASSWORD, context)
        revoked = auth.create_key(context, user="alice")
        auth.revoke_key(revoked.id, context)
        # A key that has expired: written as create_key writes one, with a past expiry.
        expired = "apl_" + "x" * 43
        digest = hashlib.sha256(expired.encode()).hexdigest()
        key = ApiKey("expired1", "old", expired[:10], digest, "admin", "root", "t")
        runtime.store.create_api_key(replace(key, expires_at="2000-01-01T00:00:00.000000Z"))
        return Keys(
            admin=auth.create_key(context, user="root").key,
            user=auth.create_key(context, user="alice").key,
            revoked=revoked.key,
            expired=expired,
        )
    finally:
        runtime.close()
