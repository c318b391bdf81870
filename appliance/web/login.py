"""The browser's way in: log in with a password for a session cookie (HttpOnly, SameSite=Strict,
Secure over HTTPS), log out, and make the first admin with the setup token ``serve`` printed.

The cookie alone opens only what is safe to repeat: a state-changing request must also send the
session's CSRF token as ``X-CSRF-Token`` (``web/auth.py`` checks it), which a page of another
site cannot read.

Imports: the login service, audit and the auth service's limits; the guards for the caller.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.datastructures import Cookie, State
from pydantic import BaseModel, Field

from appliance.audit import Context
from appliance.auth.login import LoginService, NewSession
from appliance.auth.service import MAX_PASSWORD, MIN_PASSWORD, USER_NAME_PATTERN
from appliance.identity import Role
from appliance.runtime import Runtime

__all__ = ["CSRF_HEADER", "LOGIN_ROUTES", "SESSION_COOKIE", "session_login"]

SESSION_COOKIE = "appliance_session"
CSRF_HEADER = "x-csrf-token"
MAX_LOGIN_NAME = 64
MAX_SETUP_TOKEN = 256


def session_login(state: State) -> LoginService:
    runtime: Runtime = state.runtime
    return runtime.login


class LoginIn(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_LOGIN_NAME)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD)


class SetupIn(BaseModel):
    token: str = Field(min_length=1, max_length=MAX_SETUP_TOKEN)
    name: str = Field(pattern=USER_NAME_PATTERN)
    password: str = Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)


class SessionOut(BaseModel):
    name: str
    role: Role
    csrf_token: str
    expires_at: str


def _address(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else "unknown"


def _with_cookie(request: Request[Any, Any, Any], session: NewSession) -> Response[SessionOut]:
    cookie = Cookie(
        key=SESSION_COOKIE,
        value=session.secret,
        max_age=session.ttl_seconds,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    body = SessionOut(
        name=session.user, role=session.role, csrf_token=session.csrf_token, expires_at=session.expires_at
    )
    return Response(body, cookies=[cookie])


@get("/api/v1/login", tags=["auth"], sync_to_thread=True)
def login_state(state: State) -> dict[str, bool]:
    """What the login page needs before anyone logs in: whether logins are needed at all, and
    whether the first admin is still to be made with the setup token."""
    login = session_login(state)
    return {"auth": login.auth.enabled, "setup": login.setup_waiting}


@post("/api/v1/login", tags=["auth"], status_code=200, sync_to_thread=True)
def log_in(
    request: Request[Any, Any, Any], data: LoginIn, state: State, context: Context
) -> Response[SessionOut]:
    """Log in with a password; the session cookie comes back with the CSRF token to send with changes."""
    session = session_login(state).login(data.name, data.password, _address(request), context)
    return _with_cookie(request, session)


@post("/api/v1/logout", tags=["auth"], status_code=200, sync_to_thread=True)
def log_out(request: Request[Any, Any, Any], state: State, context: Context) -> Response[dict[str, bool]]:
    """End this browser's session (an API key, if that is what came, is left alone)."""
    secret = request.cookies.get(SESSION_COOKIE)
    if secret:
        session_login(state).logout(secret, context)
    response = Response({"ok": True})
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@post("/api/v1/setup", tags=["auth"], status_code=200, sync_to_thread=True)
def set_up(
    request: Request[Any, Any, Any], data: SetupIn, state: State, context: Context
) -> Response[SessionOut]:
    """Make the first admin with the setup token `appliance serve` printed, and log them in."""
    session = session_login(state).setup(data.token, data.name, data.password, _address(request), context)
    return _with_cookie(request, session)


LOGIN_ROUTES = (login_state, log_in, log_out, set_up)
