"""``hf:`` refs: the hub's metadata through huggingface_hub, the bytes through our transfer engine.

``hf:org/repo/path/file[@rev]`` is one file; ``hf:org/repo[@rev]`` is the whole repo (config,
tokenizer, sharded weights). The revision is pinned to the commit the hub reports, so every
file of one pull comes from the same commit. LFS files carry the hub's sha256 and small files
their git blob id, and the pull checks each against it. huggingface_hub is an optional extra
(``appliance[hf]``): it weighs about 20 MB with its dependencies, and only hf: refs need it.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import (
    CredentialsRefused,
    DownloadFailed,
    RemoteNotFound,
    SchemeNotSupported,
    SourceNotAllowed,
)
from appliance.names import ModelName, name_from_filename
from appliance.provision.plan import Plan
from appliance.provision.transfer import RemoteFile
from appliance.refs import HfRef
from appliance.settings import DownloadSettings

__all__ = ["default_name", "resolve_hf"]

SKIPPED = {".gitattributes"}


def resolve_hf(ref: HfRef, options: DownloadSettings) -> Plan:
    try:
        from huggingface_hub import HfApi, hf_hub_url
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:
        raise SchemeNotSupported(
            f"{ref} needs the hub client, which is not installed",
            hint="install the extra: pip install 'appliance[hf]'",
        ) from exc
    endpoint = options.hf_endpoint.rstrip("/")
    token = options.hf_token.get_secret_value() if options.hf_token else None
    revision = ref.revision or "main"
    # token=False: never fall back to a token saved on this machine by other tools
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info: Any = api.model_info(ref.repo, revision=revision, files_metadata=True)
    except GatedRepoError as exc:
        if token:
            raise CredentialsRefused(
                f"{ref.repo} on {endpoint} is gated or private, and it refused the token sent",
                hint="check models.download.hf_token, and that its account was granted access to the repo",
            ) from exc
        raise SourceNotAllowed(
            f"{ref.repo} on {endpoint} is gated or private",
            hint="set models.download.hf_token to a token with access",
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise RemoteNotFound(f"{endpoint} has no repo {ref.repo} at revision {revision}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 404:
            raise RemoteNotFound(f"{endpoint} has no repo {ref.repo} at revision {revision}") from exc
        if status in (401, 403) and token:
            raise CredentialsRefused(
                f"{endpoint} answered {status} for {ref.repo}: it refused the token sent",
                hint="check models.download.hf_token, and that its account has access to the repo",
            ) from exc
        if status in (401, 403):
            raise SourceNotAllowed(
                f"{endpoint} answered {status} for {ref.repo}: it needs a token",
                hint="set models.download.hf_token to a token with access",
            ) from exc
        raise DownloadFailed(f"{endpoint} answered {status} for {ref.repo}@{revision}") from exc
    except Exception as exc:  # the client's own transport errors (it brings its HTTP library)
        raise DownloadFailed(f"cannot reach {endpoint} for {ref.repo}: {exc}") from exc
    commit = info.sha or revision
    siblings = [sibling for sibling in info.siblings or [] if sibling.rfilename not in SKIPPED]
    if ref.filename is not None:
        siblings = [sibling for sibling in siblings if sibling.rfilename == ref.filename]
        if not siblings:
            raise RemoteNotFound(f"{ref.repo}@{revision} on {endpoint} has no file {ref.filename}")
    if not siblings:
        raise RemoteNotFound(f"{ref.repo}@{revision} on {endpoint} has no files")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    files = [
        RemoteFile(
            url=hf_hub_url(ref.repo, sibling.rfilename, revision=commit, endpoint=endpoint),
            filename=sibling.rfilename,
            headers=headers,
            credentials="models.download.hf_token" if token else None,
            digest=f"sha256:{sibling.lfs.sha256}" if sibling.lfs else None,
            size=sibling.lfs.size if sibling.lfs else sibling.size,
            git_blob=None if sibling.lfs else sibling.blob_id,
        )
        for sibling in siblings
    ]
    return Plan(files, default_name(ref.repo, ref.filename))


def default_name(repo: str, filename: str | None) -> ModelName:
    """The name an ``hf:`` model registers under: a file's cleaned stem, or the repo's name."""
    # a repo's name keeps its dots ("Llama-3.2-1B"): the suffix is what name_from_filename strips
    return name_from_filename(filename or repo.rsplit("/", 1)[-1] + ".repo")
