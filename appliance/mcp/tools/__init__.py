"""The gateway's tools, one module per capability; each module's ``TOOLS`` lists its own."""
