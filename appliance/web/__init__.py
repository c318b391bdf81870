"""The HTTP surface: the management API now; the OpenAI-compatible API and the UI join it later."""
