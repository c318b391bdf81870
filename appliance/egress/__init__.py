"""External providers, reached only through this package (REQ-MODELS-0002, 0119, 0124, 0125).

- ``types``: what the rest of the appliance may know of a provider (never its key), the request
  an external call carries, and the protocols the router and the inference service use.
- ``secrets``: the key that encrypts provider keys at rest, kept outside the database.
- ``providers``: ``ProviderService``, adding, listing, changing, removing and testing providers.
- ``client``: ``Egress``, the one place an outbound provider call is made: allow-lists, timeouts,
  retries, streaming, one log and audit record per call, usage counters, key scrubbing.
- ``adapters``: the requests each kind gets (OpenAI's, Anthropic's), and the fields it refuses.
- ``streams``: their streamed answers read back as the engine's events.
- ``scrub``: every configured key replaced in all text that leaves, across stream chunks.

May import: settings, errors, audit, identity, metrics, preferences (offline), the store, and
``appliance.engine.base`` (the event types). Never the router, the inference service, the web
layer, tasks or the cluster.
"""
