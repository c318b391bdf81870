"""Accounts and API keys: users with a role and an argon2 password hash, API keys stored as their
SHA-256 (a 256-bit random secret needs no slow hash), and the checks a request passes.

Every change is audited (``users.add``, ``users.passwd``, ``users.role``, ``users.rm``, ``keys.create``,
``keys.revoke``), and so is every refusal: a key that opens nothing (``auth.failed``) and an
action the actor's role does not allow (``auth.denied``).

Imports: the store, preferences, audit, identity, errors and settings.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta
from functools import cached_property

from argon2 import PasswordHasher
from pydantic import BaseModel

from appliance.audit import AuditNote, Context, audited, record
from appliance.auth.policy import Action, Deny, Resource, decide
from appliance.errors import Forbidden, InvalidInput, Unauthorized, UserNotFound
from appliance.identity import ROLES, Actor, Role
from appliance.preferences import ALLOWED_ROLES, PreferenceService
from appliance.settings import Settings
from appliance.store.base import ApiKey, Store, User, utcnow

__all__ = [
    "EXPIRES_PATTERN",
    "KEY_PREFIX",
    "MAX_KEY_NAME",
    "MAX_PASSWORD",
    "MIN_PASSWORD",
    "ROLES",
    "USER_NAME_PATTERN",
    "AuthService",
    "KeyOut",
    "NewKeyOut",
    "UserOut",
]

KEY_PREFIX = "apl_"
MIN_PASSWORD = 10
_RANK: dict[Role, int] = {"node": 0, "user": 1, "admin": 2}
USER_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
EXPIRES_PATTERN = "^[1-9][0-9]{0,3}[hdw]$"  # up to 9999 weeks: a date a timestamp can hold
MAX_PASSWORD = 1024
MAX_KEY_NAME = 100
_NAME = re.compile(USER_NAME_PATTERN)
_EXPIRES = re.compile(EXPIRES_PATTERN)
_EXPIRES_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
# Writing last_used_at on every request would make each one a database write; once a minute says enough.
_TOUCH_EVERY = timedelta(minutes=1)


class UserOut(BaseModel):
    name: str
    role: Role
    has_password: bool
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            name=user.name,
            role=user.role,
            has_password=user.password_hash is not None,
            created_at=user.created_at,
            updated_at=user.updated_at,
        )


class KeyOut(BaseModel):
    """An API key as listed: never its secret, only its first characters."""

    id: str
    name: str
    prefix: str
    role: Role
    user: str | None
    state: str  # active, revoked or expired
    created_by: str
    created_at: str
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            role=key.role,
            user=key.user_name,
            state=_state(key),
            created_by=key.created_by,
            created_at=key.created_at,
            expires_at=key.expires_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
        )


class NewKeyOut(KeyOut):
    """A key just made: the only time its secret is shown."""

    key: str


def _state(key: ApiKey) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= utcnow():
        return "expired"
    return "active"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_expiry(text: str) -> str:
    """'30d' (also h, w) from now, as a stored timestamp."""
    match = _EXPIRES.match(text.strip())
    if match is None:
        raise InvalidInput(
            f"{text!r} is not a key lifetime",
            hint="write a number from 1 to 9999 with h, d or w, like 12h, 30d or 8w",
        )
    count, unit = match.group()[:-1], match.group()[-1]
    return _stamp(datetime.now(UTC) + int(count) * _EXPIRES_UNITS[unit])


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise InvalidInput(f"{role!r} is not a role", hint=f"roles are: {', '.join(ROLES)}")
    return role


class AuthService:
    def __init__(self, settings: Settings, store: Store, preferences: PreferenceService) -> None:
        self.store = store
        self.preferences = preferences
        self.enabled = settings.auth_enabled
        self._hasher = PasswordHasher()

    # -- users ---------------------------------------------------------------------------------

    def list_users(self) -> list[UserOut]:
        return [UserOut.of(user) for user in self.store.list_users()]

    def add_user(self, name: str, role: str, password: str | None, context: Context) -> UserOut:
        if not _NAME.match(name):
            raise InvalidInput(
                f"{name!r} is not a user name",
                hint="use 1 to 64 letters, digits and . _ @ -, starting with a letter or digit",
            )
        checked = check_role(role)
        password_hash = self._hash(password) if password is not None else None
        with audited(self.store, context, action="users.add", target=name) as note:
            note.detail["role"] = checked
            user = self.store.create_user(User(name=name, role=checked, password_hash=password_hash))
        return UserOut.of(user)

    def set_password(self, name: str, password: str, context: Context) -> UserOut:
        password_hash = self._hash(password)
        with audited(self.store, context, action="users.passwd", target=name) as note:
            user = self.store.update_user(name, password_hash=password_hash)
            note.detail["sessions_ended"] = self.store.delete_login_sessions(name)
        return UserOut.of(user)

    def set_role(self, name: str, role: str, context: Context) -> UserOut:
        """Change a user's role; their keys follow at once (a key never does more than its user)."""
        checked = check_role(role)
        with audited(self.store, context, action="users.role", target=name) as note:
            note.detail["role"] = checked
            user = self.store.update_user(name, role=checked)
        return UserOut.of(user)

    def remove_user(self, name: str, context: Context) -> UserOut:
        with audited(self.store, context, action="users.rm", target=name) as note:
            keys = self.store.list_api_keys(user_name=name)
            user = self.store.remove_user(name)
            note.detail["keys_removed"] = len(keys)
        return UserOut.of(user)

    def check_password(self, name: str, password: str) -> User | None:
        """The user when the password is theirs. An unknown name costs the same argon2 time as a
        wrong password, so timing does not tell which names exist."""
        user = self.store.get_user(name)
        stored = user.password_hash if user is not None and user.password_hash else self._decoy
        try:
            matches: bool = self._hasher.verify(stored, password)
        except Exception:  # argon2 raises VerifyMismatchError, or InvalidHashError on a damaged hash
            matches = False
        return user if matches and stored is not self._decoy else None

    @cached_property
    def _decoy(self) -> str:
        """A hash of nothing anyone knows, made on first need (hashing takes a while)."""
        return self._hasher.hash(secrets.token_urlsafe(16))

    def _hash(self, password: str) -> str:
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise InvalidInput(
                "the password is too weak" if password else "the password is empty",
                hint=f"use {MIN_PASSWORD} to {MAX_PASSWORD} characters (a passphrase of a few words works)",
            )
        return self._hasher.hash(password)

    def has_admin(self) -> bool:
        return any(user.role == "admin" for user in self.store.list_users())

    def needs_admin(self) -> bool:
        """Serving with auth on and nobody who could log in to manage it."""
        return self.enabled and not self.has_admin()

    # -- keys ----------------------------------------------------------------------------------

    def list_keys(self, *, user: str | None = None) -> list[KeyOut]:
        return [KeyOut.of(key) for key in self.store.list_api_keys(user_name=user)]

    def create_key(
        self,
        context: Context,
        *,
        name: str = "",
        role: str | None = None,
        expires: str | None = None,
        user: str | None = None,
    ) -> NewKeyOut:
        """A new key for ``user`` (or of its own when None); its role is at most the user's."""
        owner = self.store.get_user(user) if user is not None else None
        if user is not None and owner is None:
            raise UserNotFound(f"no user {user!r}")
        checked = check_role(role) if role is not None else (owner.role if owner else "user")
        if owner is not None and _RANK[checked] > _RANK[owner.role]:
            raise InvalidInput(
                f"a key of {owner.name} cannot have the {checked} role: {owner.name} is {owner.role}",
                hint=f"leave --role out (the key gets the {owner.role} role) or pick a lesser one",
            )
        if len(name) > MAX_KEY_NAME:
            raise InvalidInput(f"a key name has at most {MAX_KEY_NAME} characters", hint="shorten --name")
        expires_at = parse_expiry(expires) if expires else None
        secret = KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
        key = ApiKey(
            id=secrets.token_hex(6),
            name=name or (f"{user}'s key" if user else "key"),
            prefix=secret[: len(KEY_PREFIX) + 6],
            secret_sha256=_digest(secret),
            role=checked,
            user_name=user,
            created_by=context.actor,
            expires_at=expires_at,
        )
        with audited(self.store, context, action="keys.create", target=key.id) as note:
            note.detail.update(name=key.name, role=key.role, user=user, expires_at=expires_at)
            self.store.create_api_key(key)
        return NewKeyOut(**KeyOut.of(key).model_dump(), key=secret)

    def get_key(self, key_id: str) -> KeyOut | None:
        key = self.store.get_api_key(key_id)
        return KeyOut.of(key) if key else None

    def revoke_key(self, key_id: str, context: Context) -> KeyOut:
        with audited(self.store, context, action="keys.revoke", target=key_id):
            key = self.store.revoke_api_key(key_id)
        return KeyOut.of(key)

    # -- requests ------------------------------------------------------------------------------

    def authenticate(self, secret: str, context: Context) -> Actor:
        """The actor a presented key acts as; Unauthorized (audited) when it opens nothing."""
        key = self.store.find_api_key(_digest(secret)) if secret.startswith(KEY_PREFIX) else None
        state = _state(key) if key is not None else "unknown"
        if key is None or state != "active":
            shown = key.prefix if key is not None else secret[: len(KEY_PREFIX) + 6]
            record(
                self.store,
                context,
                action="auth.failed",
                note=AuditNote(target=shown, outcome="error", detail={"reason": f"{state} key"}),
            )
            raise Unauthorized(f"the API key {shown}… is {state}")
        now = datetime.now(UTC)
        if key.last_used_at is None or key.last_used_at < _stamp(now - _TOUCH_EVERY):
            self.store.touch_api_key(key.id, _stamp(now))
        owner = self.store.get_user(key.user_name) if key.user_name else None
        if owner is None:
            return Actor(id=key.name, kind="key", role=key.role)
        # A user's key never does more than the user may now (a demoted user's keys follow).
        role = key.role if _RANK[key.role] <= _RANK[owner.role] else owner.role
        return Actor(id=owner.name, kind="user", role=role)

    def authorize(self, context: Context, action: Action, *, owner: str | None = None) -> None:
        """Forbidden (audited, with the reason) when ``decide`` denies; nothing to check with auth off."""
        if not self.enabled:
            return
        granted = self.preferences.effective(ALLOWED_ROLES) if action == "models.pull" else ()
        decision = decide(context.who, action, Resource(owner=owner, granted_roles=granted))
        if isinstance(decision, Deny):
            record(
                self.store,
                context,
                action="auth.denied",
                note=AuditNote(target=action, outcome="error", detail={"reason": decision.reason}),
            )
            raise Forbidden(
                f"not allowed: {decision.reason}", hint="ask an admin, or use a key with that role"
            )
