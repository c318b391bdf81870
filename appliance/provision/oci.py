"""``oci://`` refs: a manifest from an OCI distribution registry, its model layer through our transfer engine.

Ollama publishes models as OCI manifests whose ``application/vnd.ollama.image.model`` layer is
the GGUF; other artifacts name their file in the ``org.opencontainers.image.title`` annotation.
A model an appliance bundle put there (its ``artifactType``, see ``appliance/bundles``) is pulled
whole: every layer is one of its files. A model an appliance pushed in Ollama's layout
(``push.py``) brings its template, system, messages and params layers too. Every layer is
checked against its digest (the transfer verifies it as the source's digest), and a manifest
pinned by ``@sha256:`` must hash to that digest. Registries that ask for a token get the
distribution token flow (``WWW-Authenticate: Bearer realm=…``), with the configured credentials
when there are some; Basic auth likewise (``RegistryAuth``, which pushes use too).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import httpx

from appliance.bundles.layout import ARTIFACT_TYPE
from appliance.bundles.layout import NAME_ANNOTATION as BUNDLE_NAME
from appliance.errors import (
    ApplianceError,
    CredentialsRefused,
    DigestMismatch,
    DownloadFailed,
    InvalidModelName,
    RemoteNotFound,
    SourceNotAllowed,
)
from appliance.models.layers import LAYERS
from appliance.models.layers import MEDIA_TYPE as LAYER_MEDIA_TYPE
from appliance.names import ModelName, name_from_filename
from appliance.provision.plan import Plan
from appliance.provision.transfer import RemoteFile
from appliance.refs import OciRef
from appliance.settings import DownloadSettings

__all__ = ["MANIFEST_TYPES", "OLLAMA_MODEL_LAYER", "TITLE", "RegistryAuth", "registry_base", "resolve_oci"]

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)
TITLE = "org.opencontainers.image.title"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CREDENTIALS = "models.download.oci_username and oci_password"
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def registry_base(ref: OciRef, options: DownloadSettings, *, plain_http: bool = False) -> str:
    """The URL of the ref's repository: plain HTTP for registries in oci_plain_http (or when asked)."""
    scheme = "http" if plain_http or ref.registry in options.oci_plain_http else "https"
    return f"{scheme}://{ref.registry}/v2/{ref.repository}"


def resolve_oci(ref: OciRef, options: DownloadSettings, new_client: Callable[[], httpx.Client]) -> Plan:
    base = registry_base(ref, options)
    reference = ref.digest or ref.tag or "latest"
    auth = RegistryAuth(options, ref.repository, new_client)
    with new_client() as client:
        response = auth.get(client, f"{base}/manifests/{reference}", {"Accept": ", ".join(MANIFEST_TYPES)})
    body = response.content
    if len(body) > MAX_MANIFEST_BYTES:
        raise DownloadFailed(f"the manifest of {ref} is larger than {MAX_MANIFEST_BYTES} bytes")
    if ref.digest is not None:
        actual = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if actual != ref.digest:
            raise DigestMismatch(f"the manifest of {ref} has digest {actual}, not the one the ref pins")
    try:
        manifest: dict[str, Any] = response.json()
        layers: list[dict[str, Any]] = manifest["layers"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DownloadFailed(f"{ref} did not answer with an image manifest") from exc
    if manifest.get("artifactType") == ARTIFACT_TYPE:
        return _bundle_plan(ref, manifest, base, auth)
    layer, filename = _model_layer(ref, layers)
    last = ref.repository.rsplit("/", 1)[-1]
    name = name_from_filename(f"{last}.oci")
    if ref.tag and ref.digest is None:
        name = ModelName.parse(f"{name.name}:{ref.tag.lower()}")
    files = [_remote(ref, layer, filename, base, auth)]
    files += [_remote(ref, extra, title, base, auth) for extra, title in _appliance_layers(layers)]
    return Plan(files, name)


def _appliance_layers(layers: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The Ollama layers an appliance pushed (template, system, ...: see models/layers.py), which it
    titles with their name. Ollama's own carry Go templates and options the engine does not read,
    so only a model's GGUF is taken from those."""
    found = []
    for layer in layers:
        title = str((layer.get("annotations") or {}).get(TITLE, ""))
        if title in LAYERS and layer.get("mediaType") == LAYER_MEDIA_TYPE.format(layer=title):
            found.append((layer, title))
    return found


def _remote(ref: OciRef, layer: dict[str, Any], filename: str, base: str, auth: RegistryAuth) -> RemoteFile:
    digest = str(layer.get("digest", ""))
    if not digest.startswith("sha256:"):
        raise DownloadFailed(f"the layer {filename} of {ref} has no sha256 digest")
    return RemoteFile(
        url=f"{base}/blobs/{digest}",
        filename=filename,
        headers=auth.headers,
        credentials=CREDENTIALS if auth.has_credentials else None,
        digest=digest,
        size=int(layer["size"]) if "size" in layer else None,
        reauthorize=auth.renew if auth.headers else None,
    )


def _bundle_plan(ref: OciRef, manifest: dict[str, Any], base: str, auth: RegistryAuth) -> Plan:
    """A model an appliance bundle put in the registry: every layer is one of its files, and the
    model keeps the name it had (a bundle's manifest carries it)."""
    files: list[RemoteFile] = []
    for layer in manifest["layers"]:
        title = str((layer.get("annotations") or {}).get(TITLE, ""))
        if not title:
            raise DownloadFailed(f"a layer of {ref} has no {TITLE} annotation")
        files.append(_remote(ref, layer, title, base, auth))
    if not files:
        raise RemoteNotFound(f"{ref} is an appliance model with no files")
    try:
        name = ModelName.parse(str((manifest.get("annotations") or {})[BUNDLE_NAME]))
    except (KeyError, InvalidModelName) as exc:
        raise DownloadFailed(f"{ref} is an appliance model without a valid {BUNDLE_NAME} annotation") from exc
    return Plan(files, name)


def _model_layer(ref: OciRef, layers: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    last = ref.repository.rsplit("/", 1)[-1]
    for layer in layers:
        if layer.get("mediaType") == OLLAMA_MODEL_LAYER:
            title = str((layer.get("annotations") or {}).get(TITLE, "")).rsplit("/", 1)[-1]
            return layer, title if title.endswith(".gguf") else f"{last}.gguf"  # titled by a push
    for layer in layers:
        title = str((layer.get("annotations") or {}).get(TITLE, ""))
        if title.endswith((".gguf", ".safetensors")):
            return layer, title.rsplit("/", 1)[-1]
    raise RemoteNotFound(
        f"{ref} has no model layer (no {OLLAMA_MODEL_LAYER} layer, no layer titled *.gguf or *.safetensors)"
    )


class RegistryAuth:
    """Answers a registry's 401 challenge once, then sends the same Authorization to every blob.

    ``actions`` is the scope a token is asked for (``pull``, or ``pull,push`` for a push);
    ``failure`` the error an unreachable registry raises."""

    def __init__(
        self,
        options: DownloadSettings,
        repository: str,
        new_client: Callable[[], httpx.Client],
        *,
        actions: str = "pull",
        failure: type[ApplianceError] = DownloadFailed,
    ) -> None:
        self.options = options
        self.repository = repository
        self.new_client = new_client
        self.actions = actions
        self.failure = failure
        self.headers: dict[str, str] = {}
        self._challenge: tuple[str, str] | None = None  # the last 401's WWW-Authenticate, and its URL

    def renew(self) -> dict[str, str]:
        """A fresh token for the blob downloads, when the one they carry has expired."""
        if self._challenge is not None:
            with self.new_client() as client:
                self._answer(client, *self._challenge)
        return self.headers

    def get(self, client: httpx.Client, url: str, headers: dict[str, str]) -> httpx.Response:
        response = self.send(client, "GET", url, headers=headers)
        if response.status_code == 404:
            raise RemoteNotFound(f"{httpx.URL(url).host} has no {self.repository} {url.rsplit('/', 1)[-1]}")
        if response.status_code != 200:
            raise DownloadFailed(f"{httpx.URL(url).host} answered {response.status_code} for {url}")
        return response

    def send(
        self,
        client: httpx.Client,
        method: str,
        url: str | httpx.URL,
        *,
        headers: dict[str, str] | None = None,
        content: Callable[[], Iterable[bytes]] | bytes | None = None,
    ) -> httpx.Response:
        """One request, answering a 401 challenge and sending it again; a refusal raises.
        ``content`` is a callable when it streams, so the retry can stream it again."""

        def attempt() -> httpx.Response:
            body = content() if callable(content) else content
            return client.request(
                method,
                url,
                headers={**(headers or {}), **self.headers},
                content=body,
                follow_redirects=method in ("GET", "HEAD"),
            )

        try:
            response = attempt()
            if response.status_code == 401:
                self._challenge = (response.headers.get("www-authenticate", ""), str(url))
                self._answer(client, *self._challenge)
                response = attempt()
        except httpx.TransportError as exc:
            raise self.failure(f"cannot reach {httpx.URL(url).host}: {exc!r}") from exc
        if response.status_code in (401, 403):
            self._refused(
                f"{httpx.URL(url).host} refused access to {self.repository} ({response.status_code})"
            )
        return response

    def _refused(self, message: str) -> NoReturn:
        """Without credentials the registry wants some; with them, it refused the ones sent."""
        if not self.has_credentials:
            raise SourceNotAllowed(message, hint=f"set {CREDENTIALS} for this registry")
        raise CredentialsRefused(
            f"{message}: the registry refused the credentials sent",
            hint=f"check {CREDENTIALS}, and that this account may pull {self.repository}",
        )

    @property
    def has_credentials(self) -> bool:
        return self._credentials() is not None

    def _credentials(self) -> tuple[str, str] | None:
        if self.options.oci_username and self.options.oci_password:
            return self.options.oci_username, self.options.oci_password.get_secret_value()
        return None

    def _answer(self, client: httpx.Client, challenge: str, url: str) -> None:
        kind, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        credentials = self._credentials()
        if kind.lower() == "basic":
            if credentials is None:
                return  # the retry gets 401 again and says which settings to set
            encoded = base64.b64encode(":".join(credentials).encode()).decode()
            self.headers = {"Authorization": f"Basic {encoded}"}
            return
        if kind.lower() != "bearer" or "realm" not in params:
            raise DownloadFailed(
                f"{httpx.URL(url).host} asked for an authentication this client does not speak"
            )
        query = {
            "service": params.get("service", ""),
            "scope": params.get("scope", f"repository:{self.repository}:{self.actions}"),
        }
        try:
            answer = client.get(
                params["realm"], params=query, auth=httpx.BasicAuth(*credentials) if credentials else None
            )
        except httpx.TransportError as exc:
            raise DownloadFailed(f"cannot reach the token service {params['realm']}: {exc!r}") from exc
        if answer.status_code in (401, 403):
            self._refused(f"the token service of {httpx.URL(url).host} answered {answer.status_code}")
        if answer.status_code != 200:
            raise DownloadFailed(f"the token service of {httpx.URL(url).host} answered {answer.status_code}")
        try:
            document = answer.json()
            token = str(document.get("token") or document["access_token"])
        except (ValueError, KeyError, AttributeError) as exc:
            raise DownloadFailed(f"the token service of {httpx.URL(url).host} sent no token") from exc
        self.headers = {"Authorization": f"Bearer {token}"}
