"""Pulling models by reference: policy, single-flight, the download engine, verification."""
