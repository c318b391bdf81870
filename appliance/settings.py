"""Every setting in one place.

Precedence: command-line flags > environment (``APPLIANCE_*``, nested keys joined with
``__``, e.g. ``APPLIANCE_MODELS__CACHE__MAX_BYTES``) > the config file (TOML) > defaults.
The config file is ``--config PATH`` / ``APPLIANCE_CONFIG``, else
``$XDG_CONFIG_HOME/appliance/config.toml`` when it exists.

Settings are read once (``load_settings``) and passed explicitly; nothing else reads the
environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from appliance.errors import InvalidSetting

__all__ = [
    "POSTGRES_SCHEMES",
    "TOKEN_EXPIRY_PATTERN",
    "CacheSettings",
    "ClusterSettings",
    "DownloadSettings",
    "EgressSettings",
    "EngineSettings",
    "ModelRoutingSettings",
    "ModelsSettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "default_advertise_url",
    "load_settings",
    "parse_duration",
    "parse_size",
    "secret_states",
    "url_host",
]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> object:
    """Accept byte counts as ints or as '500GB' / '1.5 TiB' strings; anything else is left to pydantic."""
    if not isinstance(value, str):
        return value
    match = _SIZE_RE.match(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"{value!r} is not a size; use bytes or a number with KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "appliance"


def _default_client_config() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "appliance" / "client.json"


def _default_config_file() -> Path | None:
    explicit = os.environ.get("APPLIANCE_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    candidate = Path(base) / "appliance" / "config.toml"
    try:
        return candidate if candidate.is_file() else None
    except OSError as exc:
        raise InvalidSetting(
            f"cannot look for the config file {candidate}: {exc.strerror or exc}",
            hint="set XDG_CONFIG_HOME to a directory you can read, or pass --config",
        ) from exc


class CacheSettings(BaseModel):
    max_bytes: ByteSize | None = Field(
        default=None, description="Cache budget in bytes (or '500GB'); unset means no limit."
    )
    evict_policy: Literal["lru", "none"] = Field(
        default="lru",
        description="What to do when an import would pass max_bytes: 'lru' evicts the least recently "
        "used unpinned models, 'none' refuses the import.",
    )


_REGISTRY = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::\d{1,5})?$")
_DURATION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Ollama-style keep-alive: seconds as a number, or '300ms', '30s', '5m', '1h'. Negative means forever."""
    if isinstance(value, bool):
        raise ValueError("a duration cannot be true or false")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration; use seconds or a number with ms, s, m or h (e.g. '5m')")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class EngineSettings(BaseModel):
    memory_budget: ByteSize | None = Field(
        default=None,
        description="Bytes loaded models may use (weights + KV cache); unset means 75% of the machine's RAM.",
    )
    keep_alive: Duration = Field(
        default=300.0, description="How long an idle model stays loaded: seconds or '5m'; negative keeps it."
    )
    n_gpu_layers: int | None = Field(
        default=None, description="Layers to offload to the GPU; unset means all when the build supports it."
    )
    parallel: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Requests one model decodes together; unset means chosen per model from the machine "
        "(16 with GPU offload, else 8 or one per physical core, whichever is more), fewer where their KV "
        "cache would take over half of the memory the budget leaves beside the weights.",
    )
    context_length: int = Field(
        default=4096, ge=64, description="Tokens of context per request, capped at the model's own."
    )
    queue_size: int = Field(default=64, ge=1, description="Requests that may wait per model before 503.")
    prompt_reuse: bool = Field(
        default=True,
        description="Keep a finished request's KV cache for the next prompt that shares its prefix.",
    )
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads per model; unset means one per physical core."
    )


class DownloadSettings(BaseModel):
    allowed_sources: list[str] = Field(
        default_factory=lambda: ["https", "http", "hf", "s3", "oci"],
        description="Where pulls may fetch from: a scheme ('https') or scheme://host "
        "('http://mirror.lan:8000', 'https://*.example.com').",
    )
    denied_sources: list[str] = Field(
        default_factory=list, description="Sources refused even when allowed_sources matches them."
    )
    require_user_approval: bool = Field(
        default=False, description="Pulls wait as pending until an admin approves or denies them."
    )
    allowed_roles: list[Literal["admin", "user", "node"]] = Field(
        default=["admin"],
        description="Roles that may pull when auth is on (admins always may); add 'user' to let users pull.",
    )
    max_parallel: int = Field(default=2, ge=1, le=64, description="Downloads that may run at once.")
    connections: int = Field(
        default=16, ge=1, le=64, description="Parallel Range requests per file when the server allows them."
    )
    part_bytes: ByteSize = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="Largest part one Range request fetches (files get about eight parts per connection).",
    )
    retries: int = Field(
        default=5, ge=0, le=100, description="Retries of a part that fails without progress."
    )
    hf_endpoint: str = Field(
        default="https://huggingface.co",
        description="The Hugging Face-compatible hub hf: refs use (a local mirror works).",
    )
    hf_token: SecretStr | None = Field(default=None, description="Access token for the hub (never shown).")
    oci_plain_http: list[str] = Field(
        default_factory=list,
        description="Registries (host:port) oci: refs and pushes reach over plain HTTP, such as a mirror "
        "on the LAN.",
    )
    ollama_registry: str = Field(
        default="registry.ollama.ai",
        description="The Ollama-style registry (host[:port]) bare Ollama names such as llama3.2 or "
        "qwen3:4b are pulled from and pushed to; a site mirror where set.",
    )
    oci_username: str | None = Field(
        default=None, description="User for registries that ask for credentials."
    )
    oci_password: SecretStr | None = Field(default=None, description="Its password or token (never shown).")
    s3_endpoint: str | None = Field(
        default=None, description="S3-compatible endpoint for s3: refs; unset means AWS in s3_region."
    )
    s3_region: str = Field(default="us-east-1", description="Region s3: requests are signed for.")
    s3_access_key_id: str | None = Field(default=None, description="S3 key id; unset means anonymous.")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret (never shown).")
    stall_timeout: Duration = Field(
        default=30.0,
        gt=0,
        description="A connection that sends nothing for this long is dropped and retried.",
    )

    @field_validator("ollama_registry")
    @classmethod
    def _registry(cls, value: str) -> str:
        if not _REGISTRY.match(value):
            raise ValueError(
                f"{value!r} is not a registry host; write e.g. registry.ollama.ai or mirror.lan:5000"
            )
        return value.lower()


class ModelsSettings(BaseModel):
    cache: CacheSettings = Field(default_factory=CacheSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)


class TaskLimitSettings(BaseModel):
    """A task's job limits: its default, and the most a task may ask for (it may only lower them)."""

    cpu_seconds: int = Field(default=300, ge=1, description="CPU seconds per process of a job.")
    address_space_bytes: ByteSize = Field(
        default=4 * 1024**3, ge=1, description="Address space per process of a job (or '4GiB')."
    )
    processes: int = Field(default=256, ge=1, description="Processes and threads a job may have.")
    file_size_bytes: ByteSize = Field(
        default=1024**3, ge=1, description="Largest file a job may write (or '1GiB')."
    )
    timeout_seconds: Duration = Field(
        default=600.0, gt=0, description="Wall-clock time a task may run: seconds or '10m'."
    )
    output_bytes: ByteSize = Field(
        default=256 * 1024, ge=1, description="Output kept per stream (stdout, stderr) of a task."
    )


class TaskSettings(BaseModel):
    max_running: int = Field(default=2, ge=1, le=64, description="Tasks that run at once.")
    max_attachment_bytes: ByteSize = Field(
        default=64 * 1024**2, ge=1, description="Largest total size of one task's attachments (or '64MiB')."
    )
    limits: TaskLimitSettings = Field(default_factory=TaskLimitSettings)
    where: Literal["any", "local", "workers"] = Field(
        default="any",
        description="Where script and commands tasks run: 'any' (the server and its workers both "
        "take them), 'local' (the server only) or 'workers' (workers only; prompt tasks stay on "
        "the server, whose router may send their inference to a worker).",
    )
    lease_seconds: Duration = Field(
        default=30.0,
        ge=1,
        description="How long a running task's lease lasts unrenewed (seconds or '1m'): a task "
        "whose server or worker stopped renewing it this long runs again elsewhere.",
    )


TOKEN_EXPIRY_PATTERN = r"^(never|[1-9][0-9]{0,4}[smhdw])$"  # noqa: S105 (a lifetime, not a secret)


class ClusterSettings(BaseModel):
    """Workers: how often they report, when a silent one stops getting work, how long they may
    hold work without answering, how long a join token lasts, and whether the server's own engine
    serves requests too."""

    heartbeat_interval: Duration = Field(
        default=3.0, gt=0, le=300, description="How often a worker heartbeats (seconds, or '3s')."
    )
    heartbeat_timeout: Duration = Field(
        default=15.0,
        gt=0,
        description="A worker silent this long is unavailable: it gets no new work and its work in "
        "flight fails.",
    )
    work_wait: Duration = Field(
        default=30.0,
        gt=0,
        le=300,
        description="The longest a worker's long-poll for work is held open before it answers empty.",
    )
    lease: Duration = Field(
        default=30.0,
        gt=0,
        description="How long a worker has to start answering work handed to it before it fails.",
    )
    token_expiry: str = Field(
        default="24h",
        pattern=TOKEN_EXPIRY_PATTERN,
        description="How long a join token lasts when `nodes token create` names no --expires "
        "('24h', '7d', 'never').",
    )
    local_inference: bool = Field(
        default=True,
        description="Whether the server's own engine is a routing candidate; false: the server only "
        "coordinates and every request goes to a worker.",
    )


class ModelRoutingSettings(BaseModel):
    """Where a model call goes when the name could be served more than one way (REQ-MODELS-0112..0117).
    Both are also preferences, so an admin may change them while the appliance runs."""

    prefer_local: bool = Field(
        default=True,
        description="Serve from a local engine or a worker when one can; an external provider only when "
        "none fits (the model is not local, or the local queue is full). False: an allowed provider that "
        "serves the model goes first.",
    )
    allowed_external_providers: list[str] = Field(
        default_factory=list,
        description="Providers routing may send model calls to ('*': every configured one); empty: none, "
        "so nothing leaves the box unless an admin allows it.",
    )


class EgressSettings(BaseModel):
    """The one component that calls external providers: where their keys' key is kept, and how
    patiently it calls them."""

    encryption_key: SecretStr | None = Field(
        default=None,
        description="The key that encrypts provider keys at rest (url-safe base64 of 32 bytes, as "
        "`appliance providers keygen` prints); servers sharing a database must set the same one. Unset: "
        "a key file under the data dir (secrets/provider.key, mode 0600), made on first use.",
    )
    connect_timeout: Duration = Field(
        default=10.0, gt=0, description="Seconds to wait for a provider's connection."
    )
    read_timeout: Duration = Field(
        default=300.0, gt=0, description="Seconds a provider may go silent mid-answer before the call fails."
    )
    retries: int = Field(
        default=3,
        ge=0,
        le=10,
        description="Tries again after a 429, a 5xx or a dropped connection, with backoff, before any "
        "byte of the answer is passed on.",
    )
    retry_max_wait: Duration = Field(
        default=30.0, gt=0, description="The longest wait between tries (a provider's Retry-After included)."
    )
    probe_every: Duration = Field(
        default=30.0,
        gt=0,
        description="How long a provider's reachability (for /readyz) is trusted before it is checked again.",
    )


class McpSettings(BaseModel):
    """The MCP gateway at /mcp: the appliance's capabilities as tools for agents."""

    enabled: bool = Field(default=True, description="Serve the MCP gateway at /mcp.")
    max_result_bytes: ByteSize = Field(
        default=64 * 1024,
        ge=1024,
        description="The most a tool's answer may take (its JSON); a longer one is cut, with truncated set.",
    )


# The Ollama release whose documented /api the compatibility routes follow (docs/api.md).
OLLAMA_API_VERSION = "0.12.0"


class ServerSettings(BaseModel):
    auth: Literal["auto", "on"] = Field(
        default="auto",
        description="'on': every API call but /healthz and /readyz needs an API key; "
        "'auto': keys are needed when serving beyond loopback, none on loopback.",
    )
    public_names: list[str] = Field(
        default_factory=list,
        description="Names and addresses LAN clients may use in the Host header (e.g. 'box.lan', "
        "'192.168.1.20'); the TLS certificate of `appliance tls init` covers them too. Other names "
        "stay refused (DNS rebinding).",
    )
    tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate (chain) `serve` answers HTTPS with; unset means the one "
        "`appliance tls init` made, if any, else plain HTTP.",
    )
    tls_key: Path | None = Field(default=None, description="The PEM private key of tls_cert.")
    session_ttl: Duration = Field(
        default=12 * 3600,
        gt=0,
        description="How long a browser login lasts (seconds, or '30m', '12h'); then the UI asks again.",
    )
    login_attempts: int = Field(
        default=5,
        ge=1,
        description="Failed logins allowed per user name and per address within login_lockout; "
        "more are refused with 429 until the window has passed.",
    )
    login_lockout: Duration = Field(
        default=15 * 60,
        gt=0,
        description="The window failed logins are counted in, and how long a lockout lasts ('15m').",
    )
    ollama_version: str = Field(
        default=OLLAMA_API_VERSION,
        pattern=r"^\d+\.\d+\.\d+$",
        description="The version /api/version reports: the Ollama release whose API the /api routes "
        "match (clients such as VS Code's refuse servers below 0.6.4).",
    )
    advertise_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#@\s]+$",
        description="The URL other servers sharing the database reach this one at, to fetch blobs its "
        "cache holds (e.g. 'https://box1.lan:8443'); unset means the first public name, else the bound "
        "address (this host's name when binding every address), with the port and scheme served.",
    )
    peer_wait: Duration = Field(
        default=30.0,
        gt=0,
        le=600,
        description="How long a request waits for a model's blob to arrive from a peer server (or be "
        "pulled again) before it is answered 503 with Retry-After; the fetch goes on.",
    )
    max_body_bytes: ByteSize = Field(
        default=16 * 1024**2,
        ge=1024,
        description="Largest request body (or '16MiB'); larger is refused with 413. Uploads of "
        "blobs (/api/blobs) and bundles (/api/v1/bundle) stream to disk and are not capped.",
    )

    @field_validator("public_names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or any(char in name for char in "/@ ") or name != name.strip():
                raise ValueError(f"{name!r} is not a host name or address; write e.g. box.lan or 10.0.0.2")
        return value


POSTGRES_SCHEMES = ("postgresql", "postgres")


class StoreSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description=(
            "Where the registry lives: sqlite:///ABS/PATH.db, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"
            " (a schema other than public as ?options=-csearch_path%3DNAME) for a database several"
            " servers share; unset means appliance.db in data_dir."
        ),
    )

    @field_validator("url")
    @classmethod
    def _a_store_url(cls, value: str | None) -> str | None:
        # Only the scheme is ever echoed: a database URL may carry a password.
        if value is None:
            return None
        scheme, separator, rest = value.partition("://")
        if not separator:
            raise ValueError("not a store URL; write a file as sqlite:///ABS/PATH.db")
        if scheme in POSTGRES_SCHEMES:
            return value  # well formed; whether this build can open it is the store's to say
        if scheme != "sqlite":
            raise ValueError(f"{scheme}:// is not a store; use sqlite:///ABS/PATH.db or postgresql://…")
        if not rest.startswith("/") or rest.endswith("/"):
            raise ValueError(f"{value!r} does not name a file by its absolute path, as sqlite:///ABS/PATH.db")
        if "?" in rest or "#" in rest:
            raise ValueError(f"{value!r} has a query or fragment; a sqlite URL takes only the file's path")
        return value


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``[::1]``), once."""
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


def default_advertise_url(settings: Settings, *, tls: bool) -> str:
    """Where other servers reach this one when ``server.advertise_url`` is unset: its first public
    name, else the address it binds (this host's name when it binds every address)."""
    host = settings.server.public_names[0] if settings.server.public_names else settings.host
    if host in ("0.0.0.0", "::", "[::]"):  # noqa: S104 (compared, not bound)
        host = socket.gethostname()
    return f"{'https' if tls else 'http'}://{url_host(host)}:{settings.port}"


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (bracketed or not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """The appliance's settings; see the module docstring for where they come from."""

    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    @property
    def auth_enabled(self) -> bool:
        """API keys are needed when ``server.auth`` is on, and always when serving beyond loopback:
        without them whoever reaches the port would be an admin."""
        return self.server.auth == "on" or not is_loopback_host(self.host)

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the cache, the registry and temporary files live.",
    )
    host: str = Field(default="127.0.0.1", description="Address `appliance serve` binds to.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port `appliance serve` listens on.")
    server: ServerSettings = Field(default_factory=ServerSettings)
    api_key: SecretStr | None = Field(
        default=None, description="The API key CLI commands send to a running server (never shown)."
    )
    client_config: Path = Field(
        default_factory=_default_client_config,
        description="The login file `appliance login` writes: the server CLI commands reach, its key "
        "and pinned certificate.",
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    tasks: TaskSettings = Field(default_factory=TaskSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    model_routing: ModelRoutingSettings = Field(default_factory=ModelRoutingSettings)
    egress: EgressSettings = Field(default_factory=EgressSettings)
    mcp: McpSettings = Field(default_factory=McpSettings)
    offline: bool = Field(
        default=False, description="No outbound network call at all (`--offline`, APPLIANCE_OFFLINE=1)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The config file is named by ``load_settings`` in ``model_config["toml_file"]``.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def secret_states(model: BaseModel, prefix: str = "") -> dict[str, str]:
    """Every secret setting (a SecretStr, however deep) as ``set`` or ``unset``: secrets are
    write-only, so this is all any surface ever shows of them."""
    states: dict[str, str] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            states.update(secret_states(value, f"{prefix}{name}."))
        elif field.annotation is SecretStr or SecretStr in get_args(field.annotation):
            states[f"{prefix}{name}"] = "unset" if value is None else "set"
    return states


def load_settings(*, config_file: Path | None = None, **flags: Any) -> Settings:
    """Read the settings once; ``flags`` are the command line's values (None means not given)."""
    given = {key: value for key, value in flags.items() if value is not None}
    path = config_file or _default_config_file()
    settings_cls: type[Settings] = Settings
    if path is not None:
        if not path.is_file():
            raise InvalidSetting(
                f"the config file {path} does not exist", hint="fix --config or APPLIANCE_CONFIG"
            )
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})
        settings_cls = type("Settings", (Settings,), {"model_config": config})
    try:
        return settings_cls(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise InvalidSetting(
            f"invalid setting: {problems}",
            hint="fix the flag, the APPLIANCE_* variable or the config file that sets it",
        ) from exc
    except (OSError, ValueError) as exc:
        raise InvalidSetting(
            f"cannot read the config file {path}: {exc}", hint="fix or remove the config file"
        ) from exc
