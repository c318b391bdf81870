"""TLS for serving beyond loopback: a self-signed CA and a server certificate in the data dir
(``appliance tls init``), the CA's fingerprint that clients pin (a cluster join token carries it,
as k3s and kubeadm do), and the check of a certificate and key before ``serve`` binds.

``serve`` answers HTTPS with ``--tls-cert/--tls-key`` (or ``server.tls_cert/tls_key``), else with
the files ``tls init`` made when they exist, else plain HTTP. Imports: errors and settings only.
"""

from __future__ import annotations

import _ssl
import datetime
import hashlib
import hmac
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# cryptography loads where a certificate is read or made: `serve` over plain HTTP never needs it.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from appliance.errors import Conflict, CredentialsRefused, InvalidSetting, NotFound, NotReady
from appliance.settings import Settings, is_loopback_host

__all__ = [
    "TlsFiles",
    "TlsPair",
    "ca_fingerprint",
    "check_pair",
    "fetch_pinned_ca",
    "init_tls",
    "require_transport",
    "serving_pair",
    "tls_files",
]

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest a server certificate may live for Apple's clients to trust it


@dataclass(frozen=True)
class TlsPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsFiles:
    """Where ``tls init`` keeps its files, under ``DATA_DIR/tls``."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server(self) -> TlsPair:
        return TlsPair(self.directory / "server.crt", self.directory / "server.key")


def tls_files(settings: Settings) -> TlsFiles:
    return TlsFiles(settings.data_dir / "tls")


def ca_fingerprint(cert_file: Path) -> str:
    """``sha256:`` and the hex SHA-256 of the certificate's DER (what ``openssl x509 -fingerprint
    -sha256`` shows, without colons)."""
    from cryptography.hazmat.primitives import serialization

    cert = _load_cert(cert_file)
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def fetch_pinned_ca(host: str, port: int, fingerprint: str, *, timeout: float = 10) -> str:
    """The PEM of the CA in the chain a server presents, accepted only when its fingerprint is
    ``fingerprint``: how a client that knows only the fingerprint (a join token) comes to trust it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted from this connection but the pinned CA
    try:
        with (
            socket.create_connection((host.strip("[]"), port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host.strip("[]")) as connection,
        ):
            # Public as SSLSocket.get_unverified_chain from Python 3.13.
            chain: Any = getattr(connection, "_sslobj").get_unverified_chain()  # noqa: B009
    except OSError as exc:
        raise NotReady(
            f"cannot reach {host}:{port} over TLS: {exc}", hint="check the address and that it serves HTTPS"
        ) from exc
    for certificate in chain or []:
        der: bytes = certificate.public_bytes(_ssl.ENCODING_DER)
        if hmac.compare_digest("sha256:" + hashlib.sha256(der).hexdigest(), fingerprint.lower()):
            return ssl.DER_cert_to_PEM_cert(der)
    raise CredentialsRefused(
        f"the server at {host}:{port} does not present the CA with fingerprint {fingerprint}",
        hint="check the fingerprint (`appliance tls show` on the server prints it) and the address",
    )


def init_tls(settings: Settings, names: list[str], *, force: bool = False) -> TlsFiles:
    """Make the CA and the server certificate for localhost, the loopback addresses, this host's
    name, ``server.public_names`` and ``names``. Refuses to replace them unless ``force``: clients
    pinned the old CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = tls_files(settings)
    if files.ca_cert.exists() and not force:
        raise Conflict(
            f"{files.directory} already holds a CA (fingerprint {ca_fingerprint(files.ca_cert)})",
            hint="`appliance tls show` prints it; --force replaces it (clients must then trust the new one)",
        )
    sans = _subject_alt_names([*settings.server.public_names, *names])
    common_name = socket.gethostname() or "appliance"
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Appliance CA ({socket.gethostname()})")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    try:
        files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(files.ca_key, _key_pem(ca_key), secret=True)
        _write(files.server.key, _key_pem(key), secret=True)
        _write(files.server.cert, cert.public_bytes(pem) + ca_cert.public_bytes(pem))  # the chain
        _write(files.ca_cert, ca_cert.public_bytes(pem))  # last: its presence means "done"
    except OSError as exc:
        raise InvalidSetting(
            f"cannot write the TLS files in {files.directory}: {exc.strerror or exc}",
            hint="check that the data dir is writable by the user running the appliance",
        ) from exc
    return files


def serving_pair(
    settings: Settings, *, cert: Path | None, key: Path | None, insecure_http: bool
) -> TlsPair | None:
    """The certificate and key ``serve`` answers HTTPS with (checked), or None for plain HTTP."""
    cert = cert or settings.server.tls_cert
    key = key or settings.server.tls_key
    if insecure_http:
        if cert or key:
            raise InvalidSetting(
                "--insecure-http and a TLS certificate contradict each other",
                hint="drop --insecure-http to serve HTTPS, or the --tls-cert/--tls-key (or server.tls_*)",
            )
        return None
    if cert is None and key is None:
        made = tls_files(settings).server
        return check_pair(made) if made.cert.exists() else None
    if cert is None or key is None:
        raise InvalidSetting(
            f"a TLS {'key' if cert else 'certificate'} is missing: HTTPS needs both",
            hint="pass --tls-cert FILE and --tls-key FILE together (or server.tls_cert and server.tls_key)",
        )
    return check_pair(TlsPair(cert, key))


def check_pair(pair: TlsPair) -> TlsPair:
    """Refuse, before binding, a certificate that is expired or not yet valid, or a key not its own."""
    from cryptography.hazmat.primitives import serialization

    cert = _load_cert(pair.cert)
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise InvalidSetting(
            f"the TLS certificate {pair.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            hint="renew it, or run `appliance tls init --force` for a new self-signed one",
        )
    if cert.not_valid_before_utc > now:
        raise InvalidSetting(
            f"the TLS certificate {pair.cert} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            hint="check this machine's clock, or use a certificate valid now",
        )
    key = _load_key(pair.key)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise InvalidSetting(
            f"the TLS key {pair.key} does not belong to the certificate {pair.cert}",
            hint="pass the key the certificate was issued for",
        )
    try:  # what uvicorn will do: catches a chain file that cryptography read only the first of
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(pair.cert, pair.key)
    except ssl.SSLError as exc:
        raise InvalidSetting(
            f"cannot serve with {pair.cert} and {pair.key}: {exc.reason or exc}",
            hint="pass a PEM certificate (chain) and its unencrypted PEM key",
        ) from exc
    return pair


def _subject_alt_names(extra: list[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    names: list[str] = ["localhost", "127.0.0.1", "::1"]
    hostname = socket.gethostname()
    for name in [hostname, *extra] if hostname else extra:
        if name.strip("[]") not in names:
            names.append(name.strip("[]"))
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            try:
                sans.append(x509.DNSName(name.encode("idna").decode("ascii")))
            except UnicodeError as exc:
                raise InvalidSetting(
                    f"{name!r} is not a host name or address", hint="pass names like box.lan or 192.168.1.20"
                ) from exc
    return sans


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(
            f"the TLS {what} {path} does not exist",
            hint="pass the right path, or run `appliance tls init` to make a certificate",
        ) from exc
    except OSError as exc:
        raise InvalidSetting(
            f"cannot read the TLS {what} {path}: {exc.strerror or exc}",
            hint="check its permissions: the appliance reads it as the user running it",
        ) from exc


def _load_cert(path: Path) -> x509.Certificate:
    from cryptography import x509

    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise InvalidSetting(
            f"{path} is not a PEM certificate", hint="pass the certificate file (-----BEGIN CERTIFICATE-----)"
        ) from exc


def _load_key(path: Path) -> PrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted
        raise InvalidSetting(
            f"the TLS key {path} is encrypted", hint="pass an unencrypted PEM key (keep it 0600)"
        ) from exc
    except ValueError as exc:
        raise InvalidSetting(
            f"{path} is not a PEM private key", hint="pass the key file (-----BEGIN PRIVATE KEY-----)"
        ) from exc


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Write via a temporary file and rename, so a failure leaves no half file; keys 0600 from birth."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # a leftover would keep its old mode
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)
    os.replace(partial, path)


def require_transport(settings: Settings, *, tls: bool, insecure_http: bool) -> str | None:
    """Beyond loopback, traffic is encrypted unless the admin said ``--insecure-http``: then the
    warning to print on every start; None when there is nothing to warn about."""
    if tls or is_loopback_host(settings.host):
        return None
    if not insecure_http:
        raise InvalidSetting(
            f"refusing to serve {settings.host} over plain HTTP: anyone on that network could read "
            "and change the traffic",
            hint="pass --tls-cert FILE --tls-key FILE, or run `appliance tls init` once (serve then uses "
            "its certificate); --insecure-http serves plain HTTP anyway",
        )
    return (
        f"serving {settings.host} over plain HTTP (--insecure-http): anyone on that network can read "
        "and change the traffic; use TLS (`appliance tls init`) instead"
    )
