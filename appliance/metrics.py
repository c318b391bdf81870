"""Prometheus metrics, on a registry of their own per app (no process-wide globals).

The nodes' heartbeat ages are not kept here: each scrape passes them as the nodes list reads then
(a gauge set by the server's sweep would lag by up to a sweep and keep a removed node's series
until cleared). The sweep sets the other node gauges.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _HeartbeatAges(Collector):
    def __init__(self, ages: Mapping[str, float]) -> None:
        self.ages = ages

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "appliance_node_heartbeat_age_seconds",
            "Seconds since each worker node's last heartbeat (none for a node that never sent one).",
            labels=["node"],
        )
        for node, age in self.ages.items():
            family.add_metric([node], age)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "appliance_inference_requests",
            "Inference requests served, by model, endpoint and outcome.",
            ["model", "endpoint", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "appliance_inference_request_seconds",
            "Time from request to last token.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "appliance_inference_time_to_first_token_seconds",
            "Time from request to first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "appliance_tokens_generated", "Completion tokens generated.", ["model"], registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "appliance_tokens_per_second",
            "Completion tokens/s of the last finished request.",
            ["model"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens", "Prompt tokens of served requests.", ["model"], registry=self.registry
        )
        self.cached_prompt_tokens = Counter(
            "appliance_prompt_tokens_cached",
            "Prompt tokens taken from an earlier request's KV cache instead of decoded.",
            ["model"],
            registry=self.registry,
        )
        self.loaded_models = Gauge(
            "appliance_loaded_models", "Models loaded in the engine.", registry=self.registry
        )
        self.nodes = Gauge(
            "appliance_nodes", "Worker nodes that joined, by state.", ["state"], registry=self.registry
        )
        self.node_work = Gauge(
            "appliance_node_work",
            "Work in flight on each worker node: queued for it, handed to it, or being answered.",
            ["node"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth",
            "Requests waiting for a free sequence.",
            ["model"],
            registry=self.registry,
        )
        self.egress_requests = Counter(
            "appliance_egress_requests",
            "Calls to external providers, by provider, operation and outcome (ok, failed, denied, "
            "offline, unsupported, cancelled).",
            ["provider", "operation", "outcome"],
            registry=self.registry,
        )
        self.egress_seconds = Histogram(
            "appliance_egress_seconds",
            "Time of a call to an external provider, from admission to its last byte.",
            ["provider", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.egress_tokens = Counter(
            "appliance_egress_tokens",
            "Tokens external providers counted, by provider, subject (who the call was for) and "
            'direction ("in": prompt, "out": answer).',
            ["provider", "subject", "direction"],
            registry=self.registry,
        )

        self.mcp_calls = Counter(
            "appliance_mcp_calls",
            "MCP tool calls, by tool and outcome (ok, failed, denied).",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.mcp_seconds = Histogram(
            "appliance_mcp_call_seconds",
            "Time of an MCP tool call, from its arrival to its answer.",
            ["tool"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(
        self,
        *,
        model: str,
        endpoint: str,
        outcome: str,
        seconds: float,
        completion_tokens: int,
        first_token_seconds: float | None,
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
    ) -> None:
        self.requests.labels(model=model, endpoint=endpoint, outcome=outcome).inc()
        self.latency.labels(model=model, endpoint=endpoint).observe(seconds)
        self.tokens.labels(model=model).inc(completion_tokens)
        self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        self.cached_prompt_tokens.labels(model=model).inc(cached_prompt_tokens)
        if first_token_seconds is not None:
            self.first_token.labels(model=model).observe(first_token_seconds)
        if completion_tokens and seconds > 0:
            self.tokens_per_second.labels(model=model).set(completion_tokens / seconds)

    def observe_egress(
        self,
        *,
        provider: str,
        operation: str,
        outcome: str,
        seconds: float,
        subject: str,
        tokens_in: int,
        tokens_out: int,
    ) -> None:
        self.egress_requests.labels(provider=provider, operation=operation, outcome=outcome).inc()
        self.egress_seconds.labels(provider=provider, operation=operation).observe(seconds)
        if tokens_in or tokens_out:
            self.egress_tokens.labels(provider=provider, subject=subject, direction="in").inc(tokens_in)
            self.egress_tokens.labels(provider=provider, subject=subject, direction="out").inc(tokens_out)

    def observe_mcp_call(self, *, tool: str, outcome: str, seconds: float) -> None:
        self.mcp_calls.labels(tool=tool, outcome=outcome).inc()
        self.mcp_seconds.labels(tool=tool).observe(seconds)

    def render(self, heartbeat_ages: Mapping[str, float] | None = None) -> bytes:
        """The text format: this registry's metrics, then each node's heartbeat age (by name)."""
        scrape = CollectorRegistry()
        scrape.register(_HeartbeatAges(heartbeat_ages or {}))
        rendered: bytes = generate_latest(self.registry) + generate_latest(scrape)
        return rendered
