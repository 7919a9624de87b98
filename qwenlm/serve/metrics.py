"""Prometheus metrics of `qwen serve` (text format at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qwenlm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("qwenlm_errors", "error responses by status", ["status"], registry=r)
        self.prompt_tokens = Counter("qwenlm_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qwenlm_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("qwenlm_time_to_first_token_seconds", "time to first token", buckets=_LATENCY,
                              registry=r)
        self.latency = Histogram("qwenlm_request_latency_seconds", "request latency, end to end", buckets=_LATENCY,
                                 registry=r)
        Gauge("qwenlm_queue_length", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_length)
        Gauge("qwenlm_running_sequences", "sequences in the running batch", registry=r).set_function(
            lambda: engine.running)
        Gauge("qwenlm_prompt_tokens_reused", "prompt tokens whose keys/values came from the prefix cache (total)",
              registry=r).set_function(lambda: engine.stats["prompt_tokens_reused"])
        Gauge("qwenlm_kv_cache_bytes", "KV cache size", registry=r).set(engine.kv_bytes)
        Gauge("qwenlm_max_num_seqs", "slots in the running batch", registry=r).set(engine.max_num_seqs)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
