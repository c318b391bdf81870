"""Inference: GGUF metadata now; the in-process llama.cpp pool comes with the engine issue."""
