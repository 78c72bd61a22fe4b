"""Prometheus metrics of the gateway, served over HTTP at /metrics (`--metrics-port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_PER_TOKEN = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2.5)


class GatewayMetrics:
    """Request outcomes and latencies, per-replica load, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("gemma_requests", "Generate calls by final gRPC status code", ["method", "code"],
                                registry=r)
        self.time_to_first_token = Histogram("gemma_time_to_first_token_seconds", "Call start to first token",
                                             buckets=_LATENCY, registry=r)
        self.time_per_output_token = Histogram("gemma_time_per_output_token_seconds",
                                               "Mean time between tokens after the first, per request",
                                               buckets=_PER_TOKEN, registry=r)
        self.request_latency = Histogram("gemma_request_latency_seconds", "Call start to last token (end to end)",
                                         buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("gemma_queue_time_seconds", "Arrival in the engine to first scheduled",
                                    buckets=_LATENCY, registry=r)
        self.generated_tokens = Counter("gemma_generated_tokens", "Tokens generated", registry=r)
        self.waiting = Gauge("gemma_requests_waiting", "Requests waiting in a replica's scheduler", ["replica"],
                             registry=r)
        self.running = Gauge("gemma_requests_running", "Requests running in a replica", ["replica"], registry=r)
        self.kv_blocks_used = Gauge("gemma_kv_blocks_used", "KV-cache pages in use (a page: one block of positions "
                                    "of one layer group)", ["replica"], registry=r)
        self.kv_blocks_total = Gauge("gemma_kv_blocks_total", "KV-cache pages", ["replica"], registry=r)
        self.kv_pages_used = Gauge("gemma_kv_pages_used", "KV-cache pages held by one pool's block tables: global "
                                   "(full-attention layers) or local (sliding-window layers, their windows only)",
                                   ["replica", "pool"], registry=r)
        self.kv_blocks_cached = Gauge("gemma_kv_blocks_cached", "KV-cache blocks held by the prefix cache "
                                      "(in use or reusable)", ["replica"], registry=r)
        self.prefix_cache_queries = Gauge("gemma_prefix_cache_queries_tokens", "Prompt tokens looked up in a "
                                          "replica's prefix cache (cumulative)", ["replica"], registry=r)
        self.prefix_cache_hits = Gauge("gemma_prefix_cache_hits_tokens", "Prompt tokens found in a replica's "
                                       "prefix cache, not computed (cumulative)", ["replica"], registry=r)
        self.prefix_cache_hit_rate = Gauge("gemma_prefix_cache_hit_rate", "Share of looked-up prompt tokens "
                                           "found cached, since the replica started", ["replica"], registry=r)
        self.replicas_ready = Gauge("gemma_replicas_ready", "Replicas ready to serve", registry=r)
        self.replicas_desired = Gauge("gemma_replicas_desired", "Replicas the autoscaler (or the last Scale call) "
                                      "wants", registry=r)
        self.engine_steps = Gauge("gemma_engine_steps", "Engine steps run by a replica (cumulative)", ["replica"],
                                  registry=r)
        self.engine_step_seconds = Gauge(
            "gemma_engine_step_seconds", "Host seconds a replica's engine spent per step phase (cumulative): "
            "schedule, prepare, forward, sample, postprocess, transport, idle (the runner waiting between steps)",
            ["replica", "phase"], registry=r)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a thread; returns its port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def forget_replica(self, name: str) -> None:
        """Drop a removed replica's gauges (a stale last value would read as a live replica's)."""
        for gauge in (self.waiting, self.running, self.kv_blocks_used, self.kv_blocks_total, self.kv_pages_used,
                      self.kv_blocks_cached, self.prefix_cache_queries, self.prefix_cache_hits,
                      self.prefix_cache_hit_rate, self.engine_steps, self.engine_step_seconds):
            for labels in [labels for labels in gauge._metrics if labels[0] == name]:
                gauge.remove(*labels)

    def record_replica(self, name: str, stats) -> None:
        """Set one replica's gauges from its EngineStats."""
        self.waiting.labels(name).set(stats.waiting)
        self.running.labels(name).set(stats.running)
        self.kv_blocks_used.labels(name).set(stats.total_blocks - stats.free_blocks)
        self.kv_blocks_total.labels(name).set(stats.total_blocks)
        self.kv_pages_used.labels(name, "global").set(stats.global_pages_used)
        self.kv_pages_used.labels(name, "local").set(stats.local_pages_used)
        self.engine_steps.labels(name).set(stats.steps)
        self.kv_blocks_cached.labels(name).set(stats.cached_blocks)
        self.prefix_cache_queries.labels(name).set(stats.prefix_cache_queries)
        self.prefix_cache_hits.labels(name).set(stats.prefix_cache_hits)
        self.prefix_cache_hit_rate.labels(name).set(stats.prefix_cache_hit_rate)
        for phase, seconds in stats.times.items():
            self.engine_step_seconds.labels(name, phase).set(seconds)
