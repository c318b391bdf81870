"""Browser logins: a user name and password traded for a session (the cookie's secret and a CSRF
token), the one-time setup token that makes the first admin, and the brake on guessing.

A session's secret is stored only as its SHA-256, like an API key's; it lasts ``server.session_ttl``
and ends at logout or when the user's password changes. Failed logins are counted per user name
and per address (``Throttle``): past ``server.login_attempts`` within ``server.login_lockout`` the
name or address is refused with 429 until the window has passed. The counts live in the serving
process (a restart forgives them; several servers on one database count apart).

Audited: ``auth.login`` (each success and failure, with the reason), ``auth.locked`` (once per
lockout), ``auth.logout`` and ``auth.setup``.

Imports: the auth service, the store, audit, identity, errors and settings.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from appliance.audit import AuditNote, Context, audited, record
from appliance.auth.service import AuthService
from appliance.errors import Conflict, TooManyAttempts, Unauthorized
from appliance.identity import Actor, Role
from appliance.settings import Settings
from appliance.store.base import LoginSession, Store, User, utcnow

__all__ = ["LoginService", "LoginSession", "NewSession", "Throttle"]


class Throttle:
    """Failures per key (``user:NAME``, ``addr:IP``) within a sliding window; thread-safe."""

    def __init__(self, attempts: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            self._failures.pop(key, None)
        return failures

    def wait(self, keys: Iterable[str]) -> int:
        """Seconds until every key may try again; 0 when none is locked."""
        with self._lock:
            now = self._clock()
            waits = [
                failures[-self.attempts] + self.window - now
                for failures in (self._recent(key, now) for key in keys)
                if len(failures) >= self.attempts
            ]
        return math.ceil(max(waits)) if waits else 0

    def fail(self, keys: Iterable[str]) -> list[str]:
        """Count a failure against each key; the keys this failure locked."""
        locked = []
        with self._lock:
            now = self._clock()
            for key in keys:
                failures = self._recent(key, now)
                failures.append(now)
                self._failures[key] = failures
                if len(failures) == self.attempts:
                    locked.append(key)
        return locked

    def forgive(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


@dataclass(frozen=True)
class NewSession:
    """A login just made: the cookie's secret goes to the browser and nowhere else."""

    secret: str
    user: str
    role: Role
    csrf_token: str
    expires_at: str
    ttl_seconds: int


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LoginService:
    def __init__(self, settings: Settings, store: Store, auth: AuthService) -> None:
        self.store = store
        self.auth = auth
        self.ttl = timedelta(seconds=settings.server.session_ttl)
        self.throttle = Throttle(settings.server.login_attempts, settings.server.login_lockout)
        self._setup_sha256: str | None = None

    # -- the first admin -----------------------------------------------------------------------

    def offer_setup(self, token: str) -> None:
        """Accept ``token`` (printed by ``serve``) once, to make the first admin."""
        self._setup_sha256 = _digest(token)

    @property
    def setup_waiting(self) -> bool:
        return self._setup_sha256 is not None and not self.auth.has_admin()

    def setup(self, token: str, name: str, password: str, address: str, context: Context) -> NewSession:
        """Make the first admin with the setup token, and log them in; the token is then spent."""
        self._check_throttle(name, address)
        with audited(self.store, context, action="auth.setup", target=name):
            if self.auth.has_admin():
                raise Conflict(
                    "this appliance has an admin already",
                    hint="log in, or ask an admin for an account",
                )
            expected = self._setup_sha256
            if expected is None or not hmac.compare_digest(expected, _digest(token)):
                self._fail(name, address, context)
                raise Unauthorized(
                    "that is not this server's setup token",
                    hint="copy the setup token `appliance serve` printed when it started",
                )
            self.auth.add_user(name, "admin", password, context)
            self._setup_sha256 = None
        return self._open(self.store.get_user(name), address)

    # -- logins --------------------------------------------------------------------------------

    def login(self, name: str, password: str, address: str, context: Context) -> NewSession:
        self._check_throttle(name, address)
        user = self.auth.check_password(name, password)
        if user is None:
            record(
                self.store,
                context,
                action="auth.login",
                note=AuditNote(
                    target=name, outcome="error", detail={"reason": "wrong user name or password"}
                ),
            )
            self._fail(name, address, context)
            raise Unauthorized(
                "wrong user name or password",
                hint="check both; an admin can set a new password with `appliance users passwd NAME`",
            )
        self.throttle.forgive(f"user:{name}")
        session = self._open(user, address)
        as_user = Context(Actor(id=user.name, kind="user", role=user.role), context.correlation_id)
        record(self.store, as_user, action="auth.login", note=AuditNote(target=name))
        return session

    def logout(self, secret: str, context: Context) -> None:
        with audited(self.store, context, action="auth.logout", target=context.who.id):
            self.store.delete_login_session(_digest(secret))

    def resolve(self, secret: str) -> tuple[Actor, LoginSession]:
        """The user a session cookie acts as, with the session; Unauthorized when it opens nothing."""
        session = self.store.get_login_session(_digest(secret))
        user = self.store.get_user(session.user_name) if session is not None else None
        if session is None or user is None or session.expires_at <= utcnow():
            raise Unauthorized(
                "your session has ended (logged out, expired or the password changed)",
                hint="log in again",
            )
        return Actor(id=user.name, kind="user", role=user.role), session

    def _open(self, user: User | None, address: str) -> NewSession:
        assert user is not None  # just checked or made
        secret = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        session = LoginSession(
            id_sha256=_digest(secret),
            user_name=user.name,
            csrf_token=secrets.token_urlsafe(32),
            address=address,
            created_at=_stamp(now),
            expires_at=_stamp(now + self.ttl),
        )
        self.store.create_login_session(session)
        return NewSession(
            secret=secret,
            user=user.name,
            role=user.role,
            csrf_token=session.csrf_token,
            expires_at=session.expires_at,
            ttl_seconds=math.ceil(self.ttl.total_seconds()),
        )

    # -- the brake -----------------------------------------------------------------------------

    def _check_throttle(self, name: str, address: str) -> None:
        wait = self.throttle.wait((f"user:{name}", f"addr:{address}"))
        if wait:
            raise TooManyAttempts(f"too many failed logins for {name!r} or from {address}", retry_after=wait)

    def _fail(self, name: str, address: str, context: Context) -> None:
        for key in self.throttle.fail((f"user:{name}", f"addr:{address}")):
            record(
                self.store,
                context,
                action="auth.locked",
                note=AuditNote(
                    target=key,
                    outcome="error",
                    detail={
                        "failures": self.throttle.attempts,
                        "window_s": self.throttle.window,
                    },
                ),
            )
