"""What a network ref stands for: the files to fetch and the name they register under."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.names import ModelName
from appliance.provision.transfer import RemoteFile

__all__ = ["Plan"]


@dataclass(frozen=True)
class Plan:
    files: list[RemoteFile]
    default_name: ModelName

    @property
    def all_have_digests(self) -> bool:
        return all(remote.digest is not None or remote.git_blob is not None for remote in self.files)
