"""Accounts and API keys over HTTP, and the check every request passes when ``server.auth`` is on.

Every route maps to one policy action in ``ROUTE_ACTIONS`` (keyed by method and path template); a
route missing there is refused, and a test walks the app's routes so none ships unmapped. With
auth on, a request names its key as ``Authorization: Bearer KEY`` or ``x-api-key: KEY``: no key,
or one unknown, revoked or expired, gets 401 with ``WWW-Authenticate: Bearer``; an action the
key's role may not do gets 403 (audited, with the reason). A browser comes with its session
cookie instead (``web/login.py``), and then sends ``X-CSRF-Token`` with every change.
A job's inference or MCP call comes through the task forwarder (``tasks/forwarder.py``) with no key:
it carries the forwarder's per-process secret (or a worker's node credential), and acts as its task
(``task:<id>``), auth on or off; the run and job ids vouched beside it become
``request.state.task_scope``, which the MCP gateway checks a call's own ids against (``None`` for
any other request).

Imports: the auth service, audit and identity; the guards for the checks that come first; the
login routes for the cookie's and the header's names.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme
from pydantic import BaseModel, Field

from appliance.audit import Context
from appliance.auth.login import LoginSession
from appliance.auth.policy import Action
from appliance.auth.service import (
    EXPIRES_PATTERN,
    MAX_KEY_NAME,
    MAX_PASSWORD,
    MIN_PASSWORD,
    USER_NAME_PATTERN,
    AuthService,
    KeyOut,
    NewKeyOut,
    UserOut,
)
from appliance.cluster.tokens import is_node_credential, is_server_credential
from appliance.errors import ApiKeyNotFound, CsrfFailed, Forbidden, Unauthorized
from appliance.identity import Actor, Role, TaskScope
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.tasks.forwarder import (
    FORWARDER_HEADER,
    JOB_HEADER,
    MCP_PATH,
    RUN_HEADER,
    TASK_HEADER,
    task_actor,
)
from appliance.web.dependencies import provide_context
from appliance.web.guards import request_actor, request_guard
from appliance.web.login import CSRF_HEADER, SESSION_COOKIE, session_login

__all__ = [
    "OPENAPI_COMPONENTS",
    "OPENAPI_SECURITY",
    "ROUTE_ACTIONS",
    "KeysController",
    "UsersController",
    "auth_guard",
    "me",
    "provide_auth",
]

OPENAPI_COMPONENTS = Components(
    security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", description="An API key")}
)
OPENAPI_SECURITY: list[SecurityRequirement] = [{"bearer": []}]

_MODELS = "/api/v1/models"
_NODES = "/api/v1/nodes"
_PROVIDERS = "/api/v1/providers"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# (method, path template) -> action. HEAD is GET's where it has none of its own; OPTIONS is
# answered before any of this.
ROUTE_ACTIONS: dict[tuple[str, str], Action] = {
    ("GET", "/"): "public",
    ("GET", "/ui/{file_path}"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    # The API's description holds no data; the docs page cannot send a key.
    ("GET", "/schema"): "public",
    ("GET", "/schema/{path}"): "public",
    ("GET", "/schema/openapi.json"): "public",
    ("GET", "/schema/oauth2-redirect.html"): "public",
    ("GET", "/schema/assets/{file_path}"): "public",
    ("GET", "/api/v1/me"): "me",
    ("GET", "/api/v1/login"): "public",
    ("POST", "/api/v1/login"): "public",  # the password is the credential (throttled)
    ("POST", "/api/v1/setup"): "public",  # the setup token is (throttled, good once)
    ("POST", "/api/v1/logout"): "me",
    ("GET", "/api/v1/users"): "users.manage",
    ("POST", "/api/v1/users"): "users.manage",
    ("DELETE", "/api/v1/users/{name}"): "users.manage",
    ("PUT", "/api/v1/users/{name}/password"): "users.manage",
    ("PUT", "/api/v1/users/{name}/role"): "users.manage",
    ("GET", "/api/v1/keys"): "keys.own",
    ("POST", "/api/v1/keys"): "keys.own",
    ("DELETE", "/api/v1/keys/{key_id}"): "keys.own",
    ("GET", _MODELS): "models.read",
    ("GET", f"{_MODELS}/{{name}}"): "models.read",
    ("POST", f"{_MODELS}/pull"): "models.pull",
    ("POST", f"{_MODELS}/gc"): "models.manage",
    ("POST", f"{_MODELS}/import"): "models.manage",
    ("POST", f"{_MODELS}/import-dir"): "models.manage",
    ("POST", f"{_MODELS}/verify"): "models.manage",
    ("POST", f"{_MODELS}/load"): "models.manage",
    ("POST", f"{_MODELS}/unload"): "models.manage",
    ("DELETE", f"{_MODELS}/{{name}}"): "models.manage",
    ("PATCH", f"{_MODELS}/{{name}}"): "models.manage",
    ("GET", "/api/v1/bundle"): "models.manage",
    ("POST", "/api/v1/bundle"): "models.manage",
    ("GET", "/api/v1/downloads"): "downloads.read",
    ("GET", "/api/v1/downloads/events"): "downloads.read",
    ("GET", "/api/v1/downloads/{download_id}"): "downloads.read",
    ("POST", "/api/v1/downloads/{download_id}/approve"): "downloads.decide",
    ("POST", "/api/v1/downloads/{download_id}/deny"): "downloads.decide",
    ("DELETE", "/api/v1/downloads/{download_id}"): "downloads.decide",
    ("GET", "/api/v1/tasks"): "tasks.run",
    ("POST", "/api/v1/tasks"): "tasks.run",
    ("GET", "/api/v1/tasks/{task_id}"): "tasks.run",
    ("GET", "/api/v1/tasks/{task_id}/events"): "tasks.run",
    ("GET", "/api/v1/tasks/{task_id}/output"): "tasks.run",
    ("POST", "/api/v1/tasks/{task_id}/cancel"): "tasks.run",
    ("GET", "/api/v1/preferences"): "preferences.read",
    ("PUT", "/api/v1/preferences/{key}"): "preferences.write",
    ("GET", "/api/v1/system"): "system.read",
    ("GET", "/api/v1/db"): "system.read",
    ("GET", "/api/v1/audit"): "audit.read",
    ("GET", "/api/v1/inference"): "audit.read",
    ("GET", "/api/v1/ps"): "system.read",
    ("GET", "/metrics"): "system.read",
    # The gateway: each tool then needs its own action, or a job's grant (appliance.mcp.server).
    ("POST", "/mcp"): "mcp.tool.invoke",
    ("GET", "/mcp"): "mcp.tool.invoke",
    ("DELETE", "/mcp"): "mcp.tool.invoke",
    ("GET", "/api/v1/mcp/tools"): "mcp.tool.invoke",
    ("GET", "/v1/models"): "models.read",
    ("GET", "/v1/models/{name}"): "models.read",
    ("POST", "/v1/chat/completions"): "infer",
    ("POST", "/v1/completions"): "infer",
    ("POST", "/v1/embeddings"): "infer",
    ("POST", "/v1/responses"): "infer",
    ("POST", "/v1/messages"): "infer",
    ("GET", "/api/version"): "models.read",
    ("GET", "/api/tags"): "models.read",
    ("POST", "/api/show"): "models.read",
    ("GET", "/api/ps"): "models.read",
    ("DELETE", "/api/delete"): "models.manage",
    ("POST", "/api/generate"): "infer",
    ("POST", "/api/chat"): "infer",
    ("POST", "/api/pull"): "models.pull",
    ("HEAD", "/api/blobs/{digest}"): "models.manage",  # a client asks before it uploads
    ("POST", "/api/blobs/{digest}"): "models.manage",
    ("POST", "/api/create"): "models.manage",
    ("POST", "/api/copy"): "models.manage",
    ("POST", "/api/push"): "models.manage",
    ("POST", "/api/embed"): "infer",
    ("POST", "/api/embeddings"): "infer",
    # A worker's routes check its node credential themselves, auth on or off; join takes a join
    # token instead (the token is the credential).
    ("POST", "/api/v1/cluster/join"): "public",
    ("POST", "/api/v1/cluster/heartbeat"): "cluster.node",
    ("GET", "/api/v1/cluster/work"): "cluster.node",
    ("POST", "/api/v1/cluster/work/{work_id}/events"): "cluster.node",
    ("GET", "/api/v1/blobs/{digest}"): "blobs.read",  # a worker's, or a peer server's (apserver_…)
    ("GET", "/api/v1/servers"): "servers.read",
    ("POST", "/api/v1/cluster/tasks/claim"): "cluster.node",
    ("GET", "/api/v1/cluster/tasks/{task_id}/attachments/{name}"): "cluster.node",
    ("POST", "/api/v1/cluster/tasks/{task_id}/output"): "cluster.node",
    ("POST", "/api/v1/cluster/tasks/{task_id}/renew"): "cluster.node",
    ("POST", "/api/v1/cluster/tasks/{task_id}/finish"): "cluster.node",
    ("GET", _NODES): "nodes.read",
    ("GET", f"{_NODES}/{{node_ref}}"): "nodes.read",
    ("GET", f"{_NODES}/tokens"): "nodes.read",
    ("POST", f"{_NODES}/tokens"): "nodes.manage",
    ("DELETE", f"{_NODES}/tokens/{{token_id}}"): "nodes.manage",
    ("POST", f"{_NODES}/{{node_ref}}/drain"): "nodes.manage",
    ("POST", f"{_NODES}/{{node_ref}}/undrain"): "nodes.manage",
    ("DELETE", f"{_NODES}/{{node_ref}}"): "nodes.manage",
    ("POST", f"{_NODES}/{{node_ref}}/models"): "nodes.manage",
    ("DELETE", f"{_NODES}/{{node_ref}}/models/{{model}}"): "nodes.manage",
    ("GET", _PROVIDERS): "providers.read",
    ("GET", f"{_PROVIDERS}/{{name}}"): "providers.read",
    ("POST", _PROVIDERS): "providers.manage",
    ("PATCH", f"{_PROVIDERS}/{{name}}"): "providers.manage",
    ("DELETE", f"{_PROVIDERS}/{{name}}"): "providers.manage",
    ("POST", f"{_PROVIDERS}/{{name}}/test"): "providers.manage",
}


def _auth(state: State) -> AuthService:
    runtime: Runtime = state.runtime
    return runtime.auth


def provide_auth(state: State) -> AuthService:
    return _auth(state)


def _presented_key(request: Request[Any, Any, Any]) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def auth_guard(settings: Settings) -> Callable[[Request[Any, Any, Any]], Awaitable[Response[None] | None]]:
    """The guards' checks, then, with auth on, the key and the route's action."""
    base = request_guard(settings)

    async def guard(request: Request[Any, Any, Any]) -> Response[None] | None:
        forwarded = _forwarded_task(request)
        request.state.task_scope = None
        if forwarded is not None:
            request.state.actor = forwarded
            request.state.task_scope = _task_scope(request, forwarded.id)
        answered = await base(request)
        auth = _auth(request.app.state)
        if answered is not None or not auth.enabled:
            return answered
        template = str(request.scope.get("path_template"))
        action = ROUTE_ACTIONS.get((request.method, template))
        if action is None and request.method == "HEAD":
            action = ROUTE_ACTIONS.get(("GET", template))
        if action == "public":
            return None
        if forwarded is None:  # else it acts as its task, set above
            secret = _presented_key(request)
            # Synchronous store calls, as the other guards' are: a key lookup is one indexed read.
            if secret is not None and is_node_credential(secret):
                request.state.actor = _node_actor(request, secret)
            elif secret is not None and is_server_credential(secret):
                request.state.actor = _server_actor(request, secret)
            elif secret is not None:
                request.state.actor = auth.authenticate(secret, provide_context(request))
            else:
                request.state.actor = _session_actor(request)
        if action is None:  # fail closed; the route-table test keeps this from happening
            raise Forbidden(
                f"{request.method} {request.url.path} has no policy action", hint="please report it"
            )
        auth.authorize(provide_context(request), action)
        return None

    return guard


def _forwarded_task(request: Request[Any, Any, Any]) -> Actor | None:
    """The task a job's call came from, when the forwarder sent it (this process's, with its
    secret, or a worker's, with its node credential); a wrong secret is refused."""
    secret = request.headers.get(FORWARDER_HEADER)
    runtime: Runtime = request.app.state.runtime
    if secret is None:
        task_id = request.headers.get(TASK_HEADER)
        return None if task_id is None else _node_task(request, task_id)
    if not runtime.tasks.forwarder.trusts(secret):
        raise Forbidden(
            f"refused a request with a wrong {FORWARDER_HEADER} header",
            hint="call the API with an API key; that header is the appliance's own",
        )
    task_id = request.headers.get(TASK_HEADER, "")
    if not task_id:
        raise Forbidden(
            f"refused a forwarded request without its {TASK_HEADER} header", hint="please report it"
        )
    return task_actor(task_id)


def _task_scope(request: Request[Any, Any, Any], task_id: str) -> TaskScope | None:
    """The job a forwarded call came from; an MCP call must name it (the forwarder always does),
    else the gateway could not hold the job to its task's tools."""
    run_id, job_id = request.headers.get(RUN_HEADER, ""), request.headers.get(JOB_HEADER, "")
    if run_id and job_id:
        return TaskScope(task_id=task_id, run_id=run_id, job_id=job_id)
    if request.url.path == MCP_PATH:
        raise Forbidden(
            f"refused a forwarded MCP call without its {RUN_HEADER} and {JOB_HEADER} headers",
            hint="update the worker that forwarded it to this server's version",
        )
    return None


def _node_task(request: Request[Any, Any, Any], task_id: str) -> Actor:
    """A call a worker's forwarder made for a job of a task it runs: it acts as that task, only
    while the task is leased to that node, and is audited here (the worker has no audit log)."""
    credential = _presented_key(request)
    if credential is None or not is_node_credential(credential):
        raise Forbidden(
            f"refused a request with a {TASK_HEADER} header but no node credential",
            hint="call the API with an API key; that header is the appliance's own",
        )
    runtime: Runtime = request.app.state.runtime
    node = runtime.cluster.authenticate(credential, provide_context(request))
    return runtime.tasks.node_acts_for(
        task_id,
        node.id,
        route=f"{request.method} {request.url.path}",
        run_id=request.headers.get(RUN_HEADER) or None,
    )


def _node_actor(request: Request[Any, Any, Any], credential: str) -> Actor:
    """A worker: its node credential acts only on the cluster's routes (policy gives the node role
    nothing else)."""
    runtime: Runtime = request.app.state.runtime
    node = runtime.cluster.authenticate(credential, provide_context(request))
    return Actor(id=node.id, kind="node", role="node")


def _server_actor(request: Request[Any, Any, Any], credential: str) -> Actor:
    """A server sharing the database: its credential reaches the blob route only (policy)."""
    runtime: Runtime = request.app.state.runtime
    server = runtime.peers.authenticate(credential, provide_context(request))
    return Actor(id=server.id, kind="server")


def _session_actor(request: Request[Any, Any, Any]) -> Actor:
    """The user a session cookie acts as; a change must carry the session's CSRF token too."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        raise Unauthorized("this appliance needs an API key, or a login in the browser")
    actor, session = session_login(request.app.state).resolve(cookie)
    request.state.session = session
    if request.method not in _SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
            raise CsrfFailed(f"refused a {request.method} of a browser session without its CSRF token")
    return actor


@get("/api/v1/me", tags=["auth"], sync_to_thread=False)
def me(request: Request[Any, Any, Any], state: State) -> dict[str, Any]:
    """Who the request acts as, with which role, whether the appliance asks for keys, and (for a
    browser session) the CSRF token its changes must carry."""
    actor = request_actor(request)
    session: LoginSession | None = request.state.get("session")
    return {
        "actor": actor.label,
        "kind": actor.kind,
        "name": actor.id,
        "role": actor.role if _auth(state).enabled else "admin",
        "auth": _auth(state).enabled,
        "session": session is not None,
        "csrf_token": session.csrf_token if session is not None else None,
        "setup": session_login(state).setup_waiting,
    }


class UserIn(BaseModel):
    name: str = Field(pattern=USER_NAME_PATTERN)
    role: Role = "user"
    password: str | None = Field(None, min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)  # None: keys only


class PasswordIn(BaseModel):
    password: str = Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)


class RoleIn(BaseModel):
    role: Role


class UsersController(Controller):
    path = "/api/v1/users"
    tags = ["auth"]  # noqa: RUF012 (Litestar reads it as a class attribute)
    dependencies = {"auth": Provide(provide_auth, sync_to_thread=False)}  # noqa: RUF012

    @get("/", sync_to_thread=True)
    def list_users(self, auth: AuthService) -> list[UserOut]:
        return auth.list_users()

    @post("/", sync_to_thread=True)
    def add_user(self, data: UserIn, auth: AuthService, context: Context) -> UserOut:
        """Add a user (admin only); the password, when given, is stored as its argon2 hash."""
        return auth.add_user(data.name, data.role, data.password, context)

    @put("/{name:str}/role", sync_to_thread=True)
    def set_role(self, name: str, data: RoleIn, auth: AuthService, context: Context) -> UserOut:
        """Change a user's role; their API keys follow at once."""
        return auth.set_role(name, data.role, context)

    @delete("/{name:str}", status_code=200, sync_to_thread=True)
    def remove_user(self, name: str, auth: AuthService, context: Context) -> UserOut:
        """Remove a user and their API keys."""
        return auth.remove_user(name, context)

    @put("/{name:str}/password", sync_to_thread=True)
    def set_password(self, name: str, data: PasswordIn, auth: AuthService, context: Context) -> UserOut:
        return auth.set_password(name, data.password, context)


class KeyIn(BaseModel):
    name: str = Field("", max_length=MAX_KEY_NAME)
    role: Role | None = None  # None: the user's role
    expires: str | None = Field(None, pattern=EXPIRES_PATTERN)  # '30d', '12h', '8w'; None: never
    user: str | None = None  # None: the caller's own key (an admin may name anyone, or no one)


class KeysController(Controller):
    path = "/api/v1/keys"
    tags = ["auth"]  # noqa: RUF012 (Litestar reads it as a class attribute)
    dependencies = {"auth": Provide(provide_auth, sync_to_thread=False)}  # noqa: RUF012

    @get("/", sync_to_thread=True)
    def list_keys(self, auth: AuthService, context: Context, user: str | None = None) -> list[KeyOut]:
        """An admin's view: every key (or one user's); anyone else's: their own."""
        actor = context.who
        if not auth.enabled or actor.role == "admin":
            return auth.list_keys(user=user)
        return auth.list_keys(user=actor.id) if actor.kind == "user" else []

    @post("/", sync_to_thread=True)
    def create_key(self, data: KeyIn, auth: AuthService, context: Context) -> NewKeyOut:
        """Make a key: the response is the only time its secret is shown."""
        actor = context.who
        user = data.user if data.user is not None else (actor.id if actor.kind == "user" else None)
        if auth.enabled and actor.role != "admin":
            auth.authorize(context, "keys.own", owner=user or "")  # "": a key of no user is an admin's
        return auth.create_key(context, name=data.name, role=data.role, expires=data.expires, user=user)

    @delete("/{key_id:str}", status_code=200, sync_to_thread=True)
    def revoke_key(self, key_id: str, auth: AuthService, context: Context) -> KeyOut:
        """Revoke a key at once; it stays listed, as revoked."""
        key = auth.get_key(key_id)
        if key is None:
            raise ApiKeyNotFound(f"no API key {key_id!r}")
        if context.who.role != "admin":
            auth.authorize(context, "keys.own", owner=key.user or "")
        return auth.revoke_key(key_id, context)
