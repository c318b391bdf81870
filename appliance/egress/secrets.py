"""The key that encrypts provider keys at rest, kept outside the database (REQ-MODELS-0119).

A provider's key is stored only as a Fernet token (AES-128-CBC with an HMAC-SHA256), sealed with
this key, so a copied database alone reveals nothing. The key comes from:

```
egress.encryption_key            # when set: servers sharing one database must all set the same one
<data>/secrets/provider.key      # else: made on the first seal; dir 0700, file 0600
```

The file is made atomically (a unique temp file, fsynced, then hard-linked into place, so two
processes racing both end up with the one that won) and refused when its group or others may read
it. It is read on first use, not on open: a command that never touches a provider key never
needs it.

Imports: settings and errors.
"""

from __future__ import annotations

import os
import secrets as random
import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from appliance.errors import InvalidSetting, ProviderKeyUnreadable
from appliance.settings import Settings

__all__ = ["KEY_FILE", "KeyBox"]

KEY_FILE = Path("secrets") / "provider.key"


class KeyBox:
    """Seals and opens provider keys with the key kept outside the database."""

    def __init__(self, *, key: str | None, path: Path) -> None:
        self._given = key
        self._path = path
        self._fernet: Fernet | None = None

    @classmethod
    def open(cls, settings: Settings) -> KeyBox:
        """The box for these settings: ``egress.encryption_key`` if set, else the key file."""
        secret = settings.egress.encryption_key
        given = None if secret is None else secret.get_secret_value()
        box = cls(key=given, path=settings.data_dir / KEY_FILE)
        if box._given is not None:
            box._fernet = _fernet(box._given, source="egress.encryption_key")
        return box

    @staticmethod
    def generate() -> str:
        """A new key, as ``egress.encryption_key`` takes it (url-safe base64 of 32 random bytes)."""
        return Fernet.generate_key().decode()

    @property
    def source(self) -> str:
        """Where the key comes from, for messages (never the key)."""
        return "egress.encryption_key" if self._given is not None else str(self._path)

    def seal(self, plaintext: str) -> bytes:
        """The ciphertext of a provider key; makes the key file if there is none yet."""
        return self._load(create=True).encrypt(plaintext.encode())

    def unseal(self, ciphertext: bytes) -> str:
        """The provider key a ``seal`` made; ProviderKeyUnreadable when this key did not make it
        (another data dir's file, a changed setting) or the ciphertext is damaged."""
        try:
            return self._load(create=False).decrypt(ciphertext).decode()
        except InvalidToken as exc:
            raise ProviderKeyUnreadable(
                f"a provider key was sealed with another key than {self.source}, or it is damaged",
                hint="restore the key it was sealed with (the data dir's secrets/provider.key or "
                "egress.encryption_key), or set the provider's key again: "
                "`appliance providers set NAME --key-stdin`",
            ) from exc

    def _load(self, *, create: bool) -> Fernet:
        if self._fernet is None:
            self._fernet = _fernet(self._read_file(create=create), source=str(self._path))
        return self._fernet

    def _read_file(self, *, create: bool) -> str:
        try:
            info = self._path.stat()
        except FileNotFoundError:
            if not create:
                raise ProviderKeyUnreadable(
                    f"the key that encrypts provider keys ({self._path}) is missing"
                ) from None
            return self._create()
        except OSError as exc:
            raise ProviderKeyUnreadable(f"cannot read {self._path}: {exc.strerror}") from exc
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ProviderKeyUnreadable(
                f"{self._path} may be read by others than its owner (mode {stat.S_IMODE(info.st_mode):o})",
                hint=f"chmod 600 {self._path}",
            )
        try:
            return self._path.read_text().strip()
        except OSError as exc:
            raise ProviderKeyUnreadable(f"cannot read {self._path}: {exc.strerror}") from exc

    def _create(self) -> str:
        key = self.generate()
        folder = self._path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            staged = folder / f".provider.key.{random.token_hex(8)}"
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(key + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                os.link(staged, self._path)  # never replaces: a racing process's key wins
            except FileExistsError:
                return self._read_file(create=False)
            finally:
                staged.unlink(missing_ok=True)
            _fsync_dir(folder)
        except OSError as exc:
            raise ProviderKeyUnreadable(
                f"cannot make {self._path}: {exc.strerror}",
                hint="make the data dir writable, or set egress.encryption_key",
            ) from exc
        return key


def _fernet(key: str, *, source: str) -> Fernet:
    try:
        return Fernet(key.strip().encode())
    except (ValueError, TypeError) as exc:
        if source == "egress.encryption_key":
            raise InvalidSetting(
                "egress.encryption_key is not a key: it must be url-safe base64 of 32 bytes",
                hint="make one with `appliance providers keygen`",
            ) from exc
        raise ProviderKeyUnreadable(f"{source} does not hold a key (it is damaged)") from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
