"""``s3://bucket/key`` refs: botocore signs, our transfer engine moves the bytes.

A HEAD of the object gives its size and, when it was uploaded with a full-object SHA-256
checksum, the digest the pull verifies. The bytes come through a presigned GET URL (path-style,
valid for ``PRESIGN_SECONDS``), so the parallel Range parts need no signing of their own.
Without keys the request is anonymous (public buckets). botocore is an optional extra
(``appliance[s3]``): only s3: refs need it. Credentials come only from the settings, never from
the machine's AWS files or environment.
"""

from __future__ import annotations

import base64
from typing import Any

from appliance.errors import (
    CredentialsRefused,
    DownloadFailed,
    RemoteNotFound,
    SchemeNotSupported,
    SourceNotAllowed,
)
from appliance.names import name_from_filename
from appliance.provision.plan import Plan
from appliance.provision.transfer import RemoteFile
from appliance.refs import S3Ref
from appliance.settings import DownloadSettings

__all__ = ["resolve_s3"]

PRESIGN_SECONDS = 12 * 3600


def resolve_s3(ref: S3Ref, options: DownloadSettings) -> Plan:
    try:
        import botocore
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise SchemeNotSupported(
            f"{ref} needs the S3 client, which is not installed",
            hint="install the extra: pip install 'appliance[s3]'",
        ) from exc
    endpoint = options.s3_endpoint or f"https://s3.{options.s3_region}.amazonaws.com"
    keyed = options.s3_access_key_id is not None and options.s3_secret_access_key is not None
    session = botocore.session.Session()
    client: Any = session.create_client(
        "s3",
        region_name=options.s3_region,
        endpoint_url=endpoint,
        aws_access_key_id=options.s3_access_key_id if keyed else None,
        aws_secret_access_key=options.s3_secret_access_key.get_secret_value()
        if keyed and options.s3_secret_access_key
        else None,
        config=Config(
            signature_version="s3v4" if keyed else botocore.UNSIGNED,
            s3={"addressing_style": "path"},
            retries={"max_attempts": options.retries + 1, "mode": "standard"},
            connect_timeout=30,
            read_timeout=options.stall_timeout,
        ),
    )
    try:
        head = client.head_object(Bucket=ref.bucket, Key=ref.key, ChecksumMode="ENABLED")
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": ref.bucket, "Key": ref.key}, ExpiresIn=PRESIGN_SECONDS
        )
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise RemoteNotFound(f"{endpoint} has no object {ref.key} in bucket {ref.bucket}") from exc
        if status in (401, 403) and keyed:
            raise CredentialsRefused(
                f"{endpoint} refused access to {ref} ({status}): it refused the credentials sent",
                hint="check models.download.s3_access_key_id and s3_secret_access_key, and that this key"
                " may read the object",
            ) from exc
        if status in (401, 403):
            raise SourceNotAllowed(
                f"{endpoint} refused access to {ref} ({status})",
                hint="set models.download.s3_access_key_id and s3_secret_access_key",
            ) from exc
        raise DownloadFailed(f"{endpoint} answered {status} for {ref}") from exc
    except BotoCoreError as exc:
        raise DownloadFailed(f"cannot reach {endpoint} for {ref}: {exc}") from exc
    finally:
        client.close()
    filename = ref.key.rsplit("/", 1)[-1]
    remote = RemoteFile(
        url=url,
        filename=filename,
        digest=_full_object_sha256(head),
        size=head.get("ContentLength"),
        identity=f"{endpoint}/{ref.bucket}/{ref.key}",  # the presigned URL differs on every call
        credentials="models.download.s3_access_key_id and s3_secret_access_key" if keyed else None,
    )
    return Plan([remote], name_from_filename(filename))


def _full_object_sha256(head: dict[str, Any]) -> str | None:
    """The object's own sha256, when S3 holds one for the whole object (not a checksum of part checksums)."""
    checksum = head.get("ChecksumSHA256")
    if not checksum or "-" in checksum or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    return "sha256:" + base64.b64decode(checksum).hex()
