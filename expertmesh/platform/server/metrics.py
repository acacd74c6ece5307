"""Prometheus metrics of the server: requests and latencies observed by the handlers, and the engine's state
and the experts' load read fresh at every scrape.

Each app has its own registry (two servers in one process do not share counters). Names follow
Prometheus conventions: `expertmesh_` prefix, seconds, `_total` for counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # the `_created` series only add noise to every scrape

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], dict]):
        """`snapshot()` returns the engine's state and the experts' load (see `app.ServerState.snapshot`)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("expertmesh_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("expertmesh_request_latency_seconds", "Time from request to its last byte",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("expertmesh_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("expertmesh_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.rejected = Counter("expertmesh_requests_rejected", "Requests refused with 429 (queue full)",
                                registry=r)
        self.cancelled = Counter("expertmesh_requests_cancelled", "Requests whose client went away before the end",
                                 registry=r)
        self.prompt_tokens = Counter("expertmesh_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("expertmesh_generation_tokens", "Tokens generated", registry=r)
        self.loop_lag = Histogram("expertmesh_event_loop_lag_seconds",
                                  "How late the server's event loop ran a task that was due (every request waits "
                                  "this on top of its own work)", buckets=_TOKEN_BUCKETS, registry=r)
        self.inflight = Gauge("expertmesh_http_requests_in_flight", "HTTP requests being answered", registry=r)
        r.register(_EngineCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from the engine and the router at scrape time."""

    def __init__(self, snapshot: Callable[[], dict]):
        self._snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        s = self._snapshot()
        for name, help_text, key in (
            ("expertmesh_requests_running", "Requests being decoded", "running"),
            ("expertmesh_requests_waiting", "Requests queued for the engine", "waiting"),
            ("expertmesh_kv_cache_blocks_used", "Paged KV-cache blocks in use", "blocks_used"),
            ("expertmesh_kv_cache_blocks_total", "Paged KV-cache blocks in all", "blocks_total"),
            ("expertmesh_generation_tokens_per_second", "Tokens generated per second, last 10 s", "tokens_per_s"),
            ("expertmesh_engine_steps", "Engine steps run since start", "steps"),
        ):
            yield GaugeMetricFamily(name, help_text, value=s[key])
        tokens = GaugeMetricFamily("expertmesh_expert_tokens",
                                   "Tokens routed to each expert of each MoE layer over the recent window",
                                   labels=["layer", "expert"])
        for layer, counts in sorted(s["load"].items()):
            for expert, count in enumerate(counts):
                tokens.add_metric([str(layer), str(expert)], count)
        yield tokens
        figures = (
            ("expertmesh_expert_busiest_share", "Share of a layer's tokens taken by its busiest expert",
             "busiest_share"),
            ("expertmesh_expert_max_over_mean", "Busiest expert's load over the mean load", "max_over_mean"),
            ("expertmesh_routing_entropy", "Routing entropy over experts, normalised to [0, 1]", "entropy"),
            ("expertmesh_experts_idle", "Experts of a layer that received no token in the window",
             "idle_experts"),
        )
        for name, help_text, key in figures:
            family = GaugeMetricFamily(name, help_text, labels=["layer"])
            for h in s["health"]:
                family.add_metric([str(h["layer"])], h[key])
            yield family
        balance = GaugeMetricFamily("expertmesh_layer_balancedness",
                                    "Mean over busiest shard's load of a MoE layer, over the recent window (1 is even)",
                                    labels=["layer"])
        for layer, value in sorted(s["balancedness"].items()):
            balance.add_metric([str(layer)], value)
        yield balance
        yield GaugeMetricFamily("expertmesh_placement_version", "Version of the expert placement in force",
                                value=s["placement_version"])
