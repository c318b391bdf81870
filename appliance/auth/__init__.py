"""Identity: accounts, API keys and who may do what (``decide``)."""
