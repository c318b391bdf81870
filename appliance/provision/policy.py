"""Which sources a pull may reach: offline mode, then the allow and deny lists.

An entry is a scheme (``https``, ``hf``) or ``scheme://host`` where the host may hold shell
wildcards and a port (``http://mirror.lan:8000``, ``https://*.example.com``); ``*`` is any source.
A deny entry wins over an allow entry. The settings are the defaults; the preferences of the
same name (set by an admin, in the UI) override them. Where a ref comes from is its source's
``origin`` (sources.py). May import: errors, refs, provision.sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from appliance.errors import Offline, SourceNotAllowed
from appliance.provision.sources import source_for
from appliance.refs import ModelRef

__all__ = ["SourcePolicy"]


def _matches(entry: str, scheme: str, host: str) -> bool:
    entry = entry.strip().lower()
    if entry == "*":
        return True
    entry_scheme, separator, entry_host = entry.partition("://")
    if entry_scheme.rstrip(":") != scheme:
        return False
    if not separator or entry_host in ("", "*"):
        return True
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return fnmatchcase(host, entry_host) or fnmatchcase(hostname, entry_host)


@dataclass(frozen=True)
class SourcePolicy:
    offline: bool
    allowed: tuple[str, ...]
    denied: tuple[str, ...]

    def check(self, ref: ModelRef) -> None:
        """Raise Offline or SourceNotAllowed, naming the setting, before any outbound call."""
        if self.offline:
            raise Offline(f"offline mode is on: {ref} would need the network, and no outbound call is made")
        scheme, host = source_for(ref).origin(ref)
        where = f"{scheme}://{host}" if host else scheme
        for entry in self.denied:
            if _matches(entry, scheme, host):
                raise SourceNotAllowed(
                    f"{where} is denied by models.download.denied_sources (entry {entry!r})",
                    hint="ask an admin to change models.download.denied_sources",
                )
        if not any(_matches(entry, scheme, host) for entry in self.allowed):
            allowed = ", ".join(self.allowed) or "nothing"
            raise SourceNotAllowed(
                f"{where} is not in models.download.allowed_sources (which allows: {allowed})"
            )

    def check_redirect(self, origin: str, target: str) -> None:
        """A redirect is followed only to a source the deny list allows, and never from https to http."""
        origin_scheme = urlsplit(origin).scheme
        split = urlsplit(target)
        if origin_scheme == "https" and split.scheme != "https":
            raise SourceNotAllowed(f"{origin} redirected to plain {split.scheme}://{split.netloc}; refused")
        for entry in self.denied:
            if _matches(entry, split.scheme, split.netloc):
                raise SourceNotAllowed(
                    f"{origin} redirected to {split.scheme}://{split.netloc}, which"
                    f" models.download.denied_sources refuses (entry {entry!r})"
                )
