"""Workers: join tokens and node credentials, heartbeats and model availability, the work channel
a worker holds open (it opens every connection; the server never dials it), leases, blob fetches
from the server's cache, and the placement that picks a node for a request.

``wire.py`` is the engine's types as JSON for that channel.
"""
