"""One error tree for the whole appliance.

Every error has a stable ``code`` (used by the API, the CLI and the docs), an HTTP
``status`` and a message that says what went wrong, plus a ``hint`` that says what to do.
Where a stdlib type fits, the error inherits it too, so callers can catch either.

    ApplianceError (500)             internal_error
    ├── InvalidInput (400)           invalid_input
    │   ├── InvalidModelRef          invalid_model_ref
    │   ├── InvalidModelName         invalid_model_name
    │   ├── InvalidSetting           invalid_setting
    │   ├── UnsupportedFormat        unsupported_format
    │   ├── SourceUnreadable         source_unreadable
    │   ├── DigestRequired           digest_required
    │   ├── NotABundle               not_a_bundle
    │   ├── PromptTooLong            prompt_too_long
    │   ├── ModelNotLoadable         model_not_loadable
    │   └── ProviderUnsupported      unsupported_by_provider
    ├── Unauthorized (401)           unauthorized         (WWW-Authenticate)
    ├── Forbidden (403)              forbidden
    │   ├── Offline                  offline
    │   ├── SourceNotAllowed         source_not_allowed
    │   ├── CredentialsRefused       credentials_refused
    │   ├── DownloadDenied           download_denied
    │   ├── CsrfFailed               csrf_failed
    │   ├── ExternalDenied           external_denied
    │   ├── EgressDenied             egress_denied
    │   ├── ToolDenied               tool_denied
    │   ├── ToolTaskOnly             tool_task_only
    │   ├── ToolNotGranted           tool_not_granted
    │   ├── McpScopeMissing          mcp_scope_missing
    │   └── McpScopeMismatch         mcp_scope_mismatch
    ├── NotFound (404)               not_found
    │   ├── ModelNotFound            model_not_found      (also LookupError)
    │   ├── SourceNotFound           source_not_found     (also FileNotFoundError)
    │   ├── RemoteNotFound           remote_not_found
    │   ├── DownloadNotFound         download_not_found
    │   ├── UserNotFound             user_not_found
    │   ├── ApiKeyNotFound           api_key_not_found
    │   ├── TaskNotFound             task_not_found
    │   ├── NodeNotFound             node_not_found
    │   ├── JoinTokenNotFound        join_token_not_found
    │   ├── ProviderNotFound         provider_not_found
    │   └── ToolNotFound             tool_not_found
    ├── Conflict (409)               conflict
    │   ├── ModelExists              model_exists
    │   ├── DownloadNotPending       download_not_pending
    │   ├── DownloadCancelled        download_cancelled
    │   ├── UserExists               user_exists
    │   ├── TaskFinished             task_finished
    │   ├── TaskElsewhere            task_elsewhere
    │   ├── NodeExists               node_exists
    │   ├── LeaseLost                lease_lost
    │   └── ProviderExists           provider_exists
    ├── DigestMismatch (422)         digest_mismatch
    │   └── BundleDamaged            bundle_damaged
    ├── BodyTooLarge (413)           payload_too_large
    ├── ResultTooLarge (500)         result_too_large
    ├── TooManyAttempts (429)        too_many_attempts    (Retry-After)
    ├── InsufficientStorage (507)    insufficient_storage
    │   ├── DiskFull                 disk_full
    │   └── CacheFull                cache_full
    ├── NotReady (503)               not_ready
    │   ├── EngineBusy               engine_busy          (Retry-After)
    │   ├── BlobFetching             blob_fetching        (Retry-After)
    │   └── ModelNotPresent          model_not_present
    ├── InsufficientMemory (507)     insufficient_memory
    ├── DownloadFailed (502)         download_failed
    ├── PushFailed (502)             push_failed
    ├── ProviderFailed (502)         provider_failed      (Retry-After when the provider sent one)
    ├── SchemeNotSupported (501)     scheme_not_supported
    └── StorageFailure (500)         storage_failure
        ├── StoreFailure             store_failure
        ├── LayoutTooNew             layout_too_new
        ├── EngineFailure            engine_failure
        └── ProviderKeyUnreadable    provider_key_unreadable

A status in parentheses holds for the whole branch below it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ApiKeyNotFound",
    "ApplianceError",
    "BlobFetching",
    "BodyTooLarge",
    "BundleDamaged",
    "CacheFull",
    "Conflict",
    "CredentialsRefused",
    "CsrfFailed",
    "DigestMismatch",
    "DigestRequired",
    "DiskFull",
    "DownloadCancelled",
    "DownloadDenied",
    "DownloadFailed",
    "DownloadNotFound",
    "DownloadNotPending",
    "EgressDenied",
    "EngineBusy",
    "EngineFailure",
    "ExternalDenied",
    "Forbidden",
    "InsufficientMemory",
    "InsufficientStorage",
    "InvalidInput",
    "InvalidModelName",
    "InvalidModelRef",
    "InvalidSetting",
    "JoinTokenNotFound",
    "LayoutTooNew",
    "LeaseLost",
    "McpScopeMismatch",
    "McpScopeMissing",
    "ModelExists",
    "ModelNotFound",
    "ModelNotLoadable",
    "ModelNotPresent",
    "NodeExists",
    "NodeNotFound",
    "NotABundle",
    "NotFound",
    "NotReady",
    "Offline",
    "PromptTooLong",
    "ProviderExists",
    "ProviderFailed",
    "ProviderKeyUnreadable",
    "ProviderNotFound",
    "ProviderUnsupported",
    "PushFailed",
    "RemoteNotFound",
    "ResultTooLarge",
    "SchemeNotSupported",
    "SourceNotAllowed",
    "SourceNotFound",
    "SourceUnreadable",
    "StorageFailure",
    "StoreFailure",
    "TaskElsewhere",
    "TaskFinished",
    "TaskNotFound",
    "TooManyAttempts",
    "ToolDenied",
    "ToolNotFound",
    "ToolNotGranted",
    "ToolTaskOnly",
    "Unauthorized",
    "UnsupportedFormat",
    "UserExists",
    "UserNotFound",
    "all_error_classes",
]


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class InvalidInput(ApplianceError):
    code = "invalid_input"
    status = 400


class InvalidModelRef(InvalidInput):
    code = "invalid_model_ref"
    default_hint = (
        "use a path, file:/abs/path, hf:org/repo[/file][@rev], https://host/path, "
        "s3://bucket/key, oci://registry/repo[:tag|@sha256:HEX] or sha256:HEX"
    )


class InvalidModelName(InvalidInput):
    code = "invalid_model_name"
    default_hint = "use name[:tag] made of letters, digits, '.', '_' and '-' (e.g. llama3.2:3b)"


class InvalidSetting(InvalidInput):
    code = "invalid_setting"


class BodyTooLarge(ApplianceError):
    code = "payload_too_large"
    status = 413

    def __init__(
        self, limit: int, *, what: str = "the request body", setting: str = "server.max_body_bytes"
    ) -> None:
        super().__init__(
            f"{what} is larger than the limit of {limit} bytes",
            hint=f"send less, or raise the {setting} setting",
        )
        self.limit = limit


class ResultTooLarge(ApplianceError):
    """A tool's answer larger than ``mcp.max_result_bytes`` that the tool cannot cut."""

    code = "result_too_large"
    status = 500
    default_hint = "ask for less, or raise the mcp.max_result_bytes setting"


class TooManyAttempts(ApplianceError):
    """Failed logins from one user name or address, answered with ``Retry-After``."""

    code = "too_many_attempts"
    status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, hint=f"wait {retry_after} s before trying again")
        self.retry_after = retry_after


class UnsupportedFormat(InvalidInput):
    code = "unsupported_format"
    default_hint = "pass --format with one of: gguf, safetensors"


class SourceUnreadable(InvalidInput):
    code = "source_unreadable"
    default_hint = "check the file's permissions; the appliance reads it as the user running it"


class DigestRequired(InvalidInput):
    code = "digest_required"
    default_hint = "pass --digest sha256:HEX, or pull without --strict to record the digest unverified"


class NotABundle(InvalidInput):
    code = "not_a_bundle"
    default_hint = "pass a directory or .tar written by `appliance bundle export` (an OCI image layout)"


class Unauthorized(ApplianceError):
    """No credentials, or ones that open nothing (unknown, revoked, expired); answered with
    ``WWW-Authenticate: Bearer``."""

    code = "unauthorized"
    status = 401
    default_hint = (
        "send an API key as `Authorization: Bearer KEY` (or `x-api-key: KEY`); "
        "an admin makes one with `appliance keys create`"
    )


class Forbidden(ApplianceError):
    code = "forbidden"
    status = 403


class Offline(Forbidden):
    code = "offline"
    default_hint = "unset offline (APPLIANCE_OFFLINE, --offline or the preference) to allow downloads"


class SourceNotAllowed(Forbidden):
    code = "source_not_allowed"
    default_hint = "ask an admin to add the source to models.download.allowed_sources"


class CredentialsRefused(Forbidden):
    code = "credentials_refused"
    default_hint = "check the source's credentials in the settings, and that they give access to it"


class DownloadDenied(Forbidden):
    code = "download_denied"
    default_hint = "an admin denied this download; ask them, or pull another model"


class CsrfFailed(Forbidden):
    """A browser session's state-changing request without its CSRF token (a page of another
    site cannot read the token, so it cannot send it)."""

    code = "csrf_failed"
    default_hint = "send the session's csrf_token (from /api/v1/login or /api/v1/me) as X-CSRF-Token"


class ExternalDenied(Forbidden):
    """Routing would need an external provider that policy does not allow (REQ-MODELS-0117)."""

    code = "external_denied"
    default_hint = (
        "an admin may allow the provider in model_routing.allowed_external_providers, or import the model"
    )


class EgressDenied(Forbidden):
    """An outbound call a provider's allow-lists refuse: this subject or this operation."""

    code = "egress_denied"
    default_hint = "an admin may widen the provider's subjects or operations (`appliance providers ls`)"


class ToolDenied(Forbidden):
    """An MCP tool whose action the caller's role may not do."""

    code = "tool_denied"
    default_hint = (
        "ask an admin, or use a key with a role that may (appliance mcp tools lists each tool's action)"
    )


class ToolTaskOnly(Forbidden):
    """An MCP tool that acts on a job's own work directory, called from outside a task's job."""

    code = "tool_task_only"
    default_hint = "only a task's job may call it: grant it to a task (appliance tasks create --tools NAME)"


class ToolNotGranted(Forbidden):
    """An MCP tool a job's task was not granted."""

    code = "tool_not_granted"
    default_hint = "grant it when creating the task: appliance tasks create --tools NAME"


class McpScopeMissing(Forbidden):
    """A job's MCP call without its task_id, run_id and job_id in the request's _meta."""

    code = "mcp_scope_missing"
    default_hint = "send the job's TASK_ID, RUN_ID and JOB_ID as _meta task_id, run_id and job_id"


class McpScopeMismatch(Forbidden):
    """An MCP call whose _meta ids are not the calling job's own (or come from a caller that is no job)."""

    code = "mcp_scope_mismatch"
    default_hint = (
        "send the job's own TASK_ID, RUN_ID and JOB_ID; a caller that is not a task's job sends none"
    )


class NotFound(ApplianceError):
    code = "not_found"
    status = 404


class ModelNotFound(NotFound, LookupError):
    code = "model_not_found"
    default_hint = "list the models with `appliance models ls`"


class SourceNotFound(NotFound, FileNotFoundError):
    code = "source_not_found"
    default_hint = "check the path; it is read on the machine that runs the appliance"


class RemoteNotFound(NotFound):
    code = "remote_not_found"
    default_hint = "check the reference; the remote server answered that it has no such file"


class DownloadNotFound(NotFound):
    code = "download_not_found"
    default_hint = "list the downloads with `appliance downloads ls`"


class UserNotFound(NotFound):
    code = "user_not_found"
    default_hint = "list the users with `appliance users ls`"


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"
    default_hint = "list the keys and their ids with `appliance keys ls`"


class TaskNotFound(NotFound):
    code = "task_not_found"
    default_hint = "list the tasks with `appliance tasks ls`"


class NodeNotFound(NotFound):
    code = "node_not_found"
    default_hint = "`appliance nodes ls` lists the nodes by id and name"


class JoinTokenNotFound(NotFound):
    code = "join_token_not_found"
    default_hint = "`appliance nodes token ls` lists the join tokens"


class ProviderNotFound(NotFound):
    code = "provider_not_found"
    default_hint = "`appliance providers ls` lists the configured providers"


class Conflict(ApplianceError):
    code = "conflict"
    status = 409


class ToolNotFound(NotFound):
    code = "tool_not_found"
    default_hint = "list the tools with tools/list, or: appliance mcp tools"


class ModelExists(Conflict):
    code = "model_exists"
    default_hint = "remove it first with `appliance models rm NAME`, or import under another --name"


class DownloadNotPending(Conflict):
    code = "download_not_pending"
    default_hint = "only a pending download can be approved or denied"


class DownloadCancelled(Conflict):
    code = "download_cancelled"
    default_hint = "pull again to resume it"


class UserExists(Conflict):
    code = "user_exists"
    default_hint = "pick another name, or change this user with `appliance users passwd`"


class TaskFinished(Conflict):
    code = "task_finished"
    default_hint = "a finished task stays as it ended; create a new task to run it again"


class TaskElsewhere(Conflict):
    """A task's files (its output) are in another server's data dir: several servers share the store."""

    code = "task_elsewhere"
    default_hint = "read its output from that server: each server keeps the files of the tasks it ran"


class NodeExists(Conflict):
    code = "node_exists"
    default_hint = "join with another --name, or remove the old node with `appliance nodes rm`"


class LeaseLost(Conflict):
    """Work or a task a worker acts on that is not (or no longer) leased to it."""

    code = "lease_lost"
    default_hint = (
        "the work or task was handed elsewhere, recovered, cancelled or ended: stop it, and take new work"
    )


class ProviderExists(Conflict):
    code = "provider_exists"
    default_hint = "pick another name, or remove the provider first (`appliance providers rm NAME`)"


class DigestMismatch(ApplianceError):
    code = "digest_mismatch"
    status = 422
    default_hint = "the content is not what was expected; fetch it again from a trusted source"


class BundleDamaged(DigestMismatch):
    code = "bundle_damaged"
    default_hint = (
        "copy the bundle again from its source (or export it again); nothing from it was registered"
    )


class InsufficientStorage(ApplianceError):
    code = "insufficient_storage"
    status = 507


class DiskFull(InsufficientStorage):
    code = "disk_full"
    default_hint = "free disk space under the data dir, or run `appliance models gc`"


class CacheFull(InsufficientStorage):
    code = "cache_full"
    default_hint = "raise models.cache.max_bytes, unpin or remove models, then try again"


class NotReady(ApplianceError):
    code = "not_ready"
    status = 503


class EngineBusy(NotReady):
    code = "engine_busy"
    default_hint = "too many requests are waiting; retry after the Retry-After seconds"
    retry_after = 2


class BlobFetching(NotReady):
    """A model's blob is on its way into this server's cache (from a peer, or pulled again)."""

    code = "blob_fetching"
    default_hint = "the model's file is being fetched onto this server; retry after the Retry-After seconds"
    retry_after = 5


class ModelNotPresent(NotReady):
    """A registered model whose blob is in no cache this server can reach."""

    code = "model_not_present"
    default_hint = "pull or import the model again (appliance models pull REF)"


class PromptTooLong(InvalidInput):
    code = "prompt_too_long"
    default_hint = "shorten the prompt or the history, or ask for a larger context (num_ctx)"


class ModelNotLoadable(InvalidInput):
    code = "model_not_loadable"
    default_hint = "only GGUF models can be served; import a .gguf file"


class ProviderUnsupported(InvalidInput):
    """A request field an external provider cannot honour (a llama.cpp sampler, a raw prompt on a
    chat-only API): refused, never dropped in silence."""

    code = "unsupported_by_provider"
    default_hint = "leave the field out, or ask for a local model"


class InsufficientMemory(ApplianceError):
    code = "insufficient_memory"
    status = 507
    default_hint = (
        "unload a model (`appliance models unload NAME`), lower the context, or raise engine.memory_budget"
    )


class DownloadFailed(ApplianceError):
    code = "download_failed"
    status = 502
    default_hint = "check the network and the remote server, then pull again; finished parts are kept"


class PushFailed(ApplianceError):
    code = "push_failed"
    status = 502
    default_hint = (
        "check that the registry is up and takes pushes, then push again; blobs it has are not sent twice"
    )


class ProviderFailed(ApplianceError):
    """An external provider failed the call after the retries (its status and message, scrubbed)."""

    code = "provider_failed"
    status = 502
    default_hint = "`appliance providers test NAME` checks the provider; try again later"

    def __init__(self, message: str, *, hint: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class SchemeNotSupported(ApplianceError):
    code = "scheme_not_supported"
    status = 501
    default_hint = "use an https:// URL to the file for now"


class StorageFailure(ApplianceError):
    code = "storage_failure"
    status = 500


class StoreFailure(StorageFailure):
    code = "store_failure"
    default_hint = "check that the data dir is writable and not on a network filesystem"


class LayoutTooNew(StorageFailure):
    code = "layout_too_new"
    default_hint = "run a newer appliance on this data dir, or point --data-dir elsewhere"


class EngineFailure(StorageFailure):
    code = "engine_failure"
    default_hint = "see the server log"


class ProviderKeyUnreadable(StorageFailure):
    """The key that encrypts provider keys is missing, unreadable or not the one they were sealed with."""

    code = "provider_key_unreadable"
    default_hint = (
        "restore <data>/secrets/provider.key (or egress.encryption_key), or set the provider's key again"
    )


def all_error_classes() -> list[type[ApplianceError]]:
    """Every error class, for the docs check and the API's error map."""
    found: list[type[ApplianceError]] = []
    pending: list[type[ApplianceError]] = [ApplianceError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
