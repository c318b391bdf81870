"""Appliance: a self-hosted AI appliance (model cache and registry, local inference, workers)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("appliance")
except PackageNotFoundError:  # a frozen executable carries no package metadata
    __version__ = "0.1.0"
