"""Inference: the Engine protocol (``base``), the in-process llama.cpp engine (``pool`` over
``llama``, ``batcher`` and ``chat``), the router from model names to engines, and the inference
service the APIs call. The engine proper imports no registry, store or web module; the router and
the service are the layer that joins it to the registry (see ``tests/test_layering.py``)."""
