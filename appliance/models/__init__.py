"""Models: the registry's main noun (service, schemas, formats)."""
