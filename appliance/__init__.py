"""Appliance: a self-hosted AI appliance (model cache and registry, local inference, workers)."""

# The one place the version is written (pyproject.toml reads it): reading the installed package's
# metadata instead costs every command, `--help` included, about 60 ms at start-up.
__version__ = "0.1.0"
