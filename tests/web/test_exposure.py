"""Serving beyond loopback, safely: TLS from `appliance tls init` with real clients, the refusals
before binding, public names in the Host check, and the request body cap."""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import ssl
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import CredentialsRefused
from appliance.tls import fetch_pinned_ca
from tests.conftest import import_file
from tests.web.serving import serving

PROBLEM = "application/problem+json"


def _fingerprint(output: str) -> str:
    return next(line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("CA fingerprint"))


def test_tls_init_makes_a_ca_and_a_certificate_for_the_names_and_keeps_keys_private(
    cli: object, data_dir: Path
) -> None:
    env = {"APPLIANCE_SERVER__PUBLIC_NAMES": '["box.lan", "192.168.7.7"]'}
    made = cli("tls", "init", "--names", "extra.lan, 10.1.2.3", env=env)  # type: ignore[operator]
    assert made.returncode == 0, made.stderr
    tls = data_dir / "tls"
    assert {path.name: path.stat().st_mode & 0o777 for path in tls.iterdir()} == {
        "ca.crt": 0o644,
        "ca.key": 0o600,
        "server.crt": 0o644,
        "server.key": 0o600,
    }
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    der = ca.public_bytes(serialization.Encoding.DER)
    fingerprint = _fingerprint(made.stdout)
    assert fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    shown = cli("tls", "show")  # type: ignore[operator]
    assert _fingerprint(shown.stdout) == fingerprint
    server = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns_names = {*sans.get_values_for_type(x509.DNSName)}
    assert dns_names >= {"localhost", socket.gethostname(), "box.lan", "extra.lan"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} >= {
        "127.0.0.1",
        "::1",
        "192.168.7.7",
        "10.1.2.3",
    }
    again = cli("tls", "init")  # type: ignore[operator]
    assert again.returncode == 1
    assert "already holds a CA" in again.stderr
    assert "--force" in again.stderr
    assert _fingerprint(cli("tls", "show").stdout) == fingerprint  # type: ignore[operator]
    forced = cli("tls", "init", "--force")  # type: ignore[operator]
    assert forced.returncode == 0
    assert _fingerprint(forced.stdout) != fingerprint


def test_tls_init_into_a_data_dir_it_cannot_write_says_so(cli: object, data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / "tls").write_text("a file where the directory would go")
    made = cli("tls", "init")  # type: ignore[operator]
    assert made.returncode == 1
    assert "cannot write the TLS files" in made.stderr
    assert "Traceback" not in made.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("APPLIANCE_SERVER__PUBLIC_NAMES", '["http://box.lan"]', "is not a host name or address"),
        ("APPLIANCE_SERVER__MAX_BODY_BYTES", "100", "server.max_body_bytes"),
    ],
)
def test_bad_server_settings_are_refused(cli: object, variable: str, value: str, message: str) -> None:
    refused = cli("serve", "--port", "0", env={variable: value})  # type: ignore[operator]
    assert refused.returncode == 1
    assert message in refused.stderr


def test_tls_show_without_init_says_how(cli: object) -> None:
    shown = cli("tls", "show")  # type: ignore[operator]
    assert shown.returncode == 1
    assert "appliance tls init" in shown.stderr


def test_serve_answers_https_with_the_certificate_of_tls_init_to_real_clients(
    cli: object, data_dir: Path, tmp_path: Path
) -> None:
    fingerprint = _fingerprint(cli("tls", "init").stdout)  # type: ignore[operator]
    ca = ssl.create_default_context(cafile=data_dir / "tls" / "ca.crt")
    with serving(data_dir, https=True, verify=ca) as server:
        assert server.client.get("/api/v1/models").json() == []
        with httpx.Client(verify=ca) as http:
            compatible = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=http)
            listed = compatible.models.list()
        assert listed.data == []
        with ollama.Client(host=server.url, verify=ca) as native:
            assert native.list().models == []
        # The CLI's calls to the server follow: the data dir's CA is what it trusts.
        ps = cli("ps", "--port", str(server.port))  # type: ignore[operator]
        assert ps.returncode == 0, ps.stderr
        # A client that knows only the fingerprint (as a join token carries it) trusts the server.
        pinned = ssl.create_default_context(cadata=fetch_pinned_ca("127.0.0.1", server.port, fingerprint))
        assert httpx.get(f"{server.url}/healthz", verify=pinned).status_code == 200
        with pytest.raises(CredentialsRefused, match="does not present the CA"):
            fetch_pinned_ca("127.0.0.1", server.port, "sha256:" + "0" * 64)
        # Another CA, or the system's, does not vouch for it.
        other = tmp_path / "other"
        assert cli("--data-dir", str(other), "tls", "init").returncode == 0  # type: ignore[operator]
        wrong = ssl.create_default_context(cafile=other / "tls" / "ca.crt")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{server.url}/healthz", verify=wrong)
        with (
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as system_trust,
            pytest.raises(openai.APIConnectionError),
        ):
            system_trust.models.list()
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP to an HTTPS port
            httpx.get(f"http://127.0.0.1:{server.port}/healthz")
    assert f"serving on https://127.0.0.1:{server.port}" in server.output[0]


def test_plain_http_beyond_loopback_needs_insecure_http_which_warns_and_api_keys_are_needed(
    cli: object, data_dir: Path
) -> None:
    plain = cli("serve", "--host", "10.77.0.1", "--port", "0")  # type: ignore[operator]
    assert plain.returncode == 1
    assert "over plain HTTP" in plain.stderr
    for way in ("--tls-cert", "appliance tls init", "--insecure-http"):
        assert way in plain.stderr
    with serving(data_dir, "--host", "0.0.0.0", "--insecure-http") as insecure:
        assert "warning: serving 0.0.0.0 over plain HTTP (--insecure-http)" in insecure.line_with("warning")
        assert "setup token" in insecure.line_with("setup token")  # beyond loopback, API keys are on
    assert cli("tls", "init").returncode == 0  # type: ignore[operator]
    ca = ssl.create_default_context(cafile=data_dir / "tls" / "ca.crt")
    with serving(data_dir, "--host", "0.0.0.0", https=True, verify=ca) as over_tls:
        over_tls.line_with("setup token")
    assert "warning" not in "".join(over_tls.output)


def _expired_pair(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "old.crt", directory / "old.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_a_bad_certificate_or_key_is_refused_before_binding(
    cli: object, data_dir: Path, tmp_path: Path
) -> None:
    old_cert, old_key = _expired_pair(tmp_path / "old")
    assert cli("tls", "init").returncode == 0  # type: ignore[operator]
    cert = str(data_dir / "tls" / "server.crt")
    cases = {
        "expired on": ("--tls-cert", str(old_cert), "--tls-key", str(old_key)),
        "does not belong to the certificate": ("--tls-cert", cert, "--tls-key", str(old_key)),
        "a TLS key is missing": ("--tls-cert", cert),
        "does not exist": ("--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(old_key)),
        "is not a PEM private key": ("--tls-cert", cert, "--tls-key", cert),
        "contradict each other": ("--tls-cert", str(old_cert), "--tls-key", str(old_key), "--insecure-http"),
    }
    for message, flags in cases.items():
        refused = cli("serve", "--port", "0", *flags)  # type: ignore[operator]
        assert refused.returncode == 1, message
        assert message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert "serving on" not in refused.stderr  # refused before it bound anything


def test_public_names_are_served_and_other_names_stay_refused(data_dir: Path) -> None:
    env = {"APPLIANCE_SERVER__PUBLIC_NAMES": '["box.lan", "192.168.7.7", "fd00::7"]'}
    with serving(data_dir, env=env) as server:
        port = server.port
        for host in ("box.lan", f"BOX.lan:{port}", f"192.168.7.7:{port}", f"[fd00::7]:{port}"):
            assert server.client.get("/api/v1/models", headers={"Host": host}).status_code == 200, host
        rebound = server.client.get("/api/v1/models", headers={"Host": f"attacker.example:{server.port}"})
        assert rebound.status_code == 400
        assert "server.public_names" in rebound.json()["hint"]
        assert server.client.get("/api/tags", headers={"Host": "box.lan.evil.example"}).status_code == 400


def test_a_body_over_the_cap_is_refused_with_the_limit_on_every_surface(data_dir: Path) -> None:
    big = json.dumps({"model": "x", "prompt": "a" * 70_000})
    with serving(data_dir, env={"APPLIANCE_SERVER__MAX_BODY_BYTES": "64KiB"}) as server:
        client = server.client
        headers = {"Content-Type": "application/json"}
        problem = client.post("/api/v1/models/pull", content=big, headers=headers)
        assert problem.status_code == 413
        assert problem.headers["content-type"].startswith(PROBLEM)
        assert problem.json()["code"] == "payload_too_large"
        assert "65536 bytes" in problem.json()["detail"]
        assert "server.max_body_bytes" in problem.json()["hint"]
        compatible = client.post("/v1/completions", content=big, headers=headers)
        assert compatible.status_code == 413
        assert "65536 bytes" in compatible.json()["error"]["message"]
        native = client.post("/api/generate", content=big, headers=headers)
        assert native.status_code == 413
        assert "65536 bytes" in native.json()["error"]

        def chunks() -> object:  # no Content-Length: the cap counts what arrives
            yield big.encode()

        streamed = client.post("/api/chat", content=chunks(), headers=headers)  # type: ignore[arg-type]
        assert streamed.status_code == 413
        small = client.post("/api/v1/models/pull", json={"ref": "ftp://x/y.gguf"})
        assert small.status_code == 400  # under the cap: reaches the handler


def test_blob_and_bundle_uploads_are_not_held_to_the_json_cap(
    cli: object, data_dir: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    body = tiny_gguf.read_bytes()
    assert len(body) > 64 * 1024
    import_file(data_dir, tiny_gguf, "tiny")
    bundle = tmp_path / "tiny.tar"
    assert cli("bundle", "export", "tiny", "-o", str(bundle)).returncode == 0  # type: ignore[operator]
    assert cli("models", "rm", "tiny").returncode == 0  # type: ignore[operator]
    with serving(data_dir, env={"APPLIANCE_SERVER__MAX_BODY_BYTES": "64KiB"}) as server:
        digest = "sha256:" + hashlib.sha256(body + b"x").hexdigest()
        blob = server.client.post(f"/api/blobs/{digest}", content=body + b"x")
        assert blob.status_code == 201
        imported = server.client.post(
            "/api/v1/bundle", content=bundle.read_bytes(), headers={"Content-Type": "application/x-tar"}
        )
        assert imported.status_code == 200, imported.text
        assert server.client.get("/api/v1/models/tiny").status_code == 200
