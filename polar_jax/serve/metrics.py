"""The server's Prometheus metrics, in a registry of their own: an engine `Observer` (tokens,
requests running and waiting, KV pages, preemptions, step time, time to first token, time per
output token, prefix-cache lookups and hits; named like vLLM's where vLLM has one, so that its dashboards read them) and the
HTTP requests answered and completions finished. Part of the `[serve]` extra
(prometheus_client)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """What `/metrics` exposes; pass it to the `Engine` as its observer (thread-safe)."""

    def __init__(self, prefix: str = "polar_jax"):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(f"{prefix}_requests", "HTTP requests answered, by endpoint and "
                                "status code", ("endpoint", "code"), registry=registry)
        self.finished_requests = Counter(f"{prefix}_completions_finished", "Completions (one per "
                                         "prompt) ended, by finish reason", ("reason",),
                                         registry=registry)
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "Prompt tokens admitted",
                                     registry=registry)
        self.generated_tokens = Counter(f"{prefix}_generated_tokens", "Tokens generated",
                                        registry=registry)
        self.running = Gauge(f"{prefix}_num_requests_running", "Requests holding a slot "
                             "(prefilling or decoding)", registry=registry)
        self.waiting = Gauge(f"{prefix}_num_requests_waiting", "Requests waiting for a slot and "
                             "KV pages", registry=registry)
        self.pages_total = Gauge(f"{prefix}_kv_pages_total", "KV-cache pages in the pool",
                                 registry=registry)
        self.pages_used = Gauge(f"{prefix}_kv_pages_used", "KV-cache pages held by requests",
                                registry=registry)
        self.preemptions = Counter(f"{prefix}_num_preemptions", "Requests preempted (pages "
                                   "freed, recomputed later) when the pool ran out",
                                   registry=registry)
        self.prefix_queries = Counter(f"{prefix}_prefix_cache_queries", "Prompt tokens looked "
                                      "up in the prefix cache", registry=registry)
        self.prefix_hits = Counter(f"{prefix}_prefix_cache_hits", "Prompt tokens found in the "
                                   "prefix cache (not computed again)", registry=registry)
        self.step_seconds = Histogram(f"{prefix}_step_seconds", "Engine iteration (prefill "
                                      "chunks and one decode step), dispatch to dispatch", buckets=STEP_BUCKETS,
                                      registry=registry)
        self.ttft_seconds = Histogram(f"{prefix}_time_to_first_token_seconds", "From submission "
                                      "to the first token", buckets=LATENCY_BUCKETS,
                                      registry=registry)
        self.tpot_seconds = Histogram(f"{prefix}_time_per_output_token_seconds", "Per token "
                                      "after the first, per completion", buckets=STEP_BUCKETS,
                                      registry=registry)

    # -- the engine's Observer ---------------------------------------------------------------

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft_seconds.observe(seconds)

    def finished(self, completion_tokens: int, seconds_per_token: float | None) -> None:
        self.generated_tokens.inc(completion_tokens)
        if seconds_per_token is not None:
            self.tpot_seconds.observe(seconds_per_token)

    def step(self, seconds: float, running: int, waiting: int, pages_used: int) -> None:
        self.step_seconds.observe(seconds)
        self.running.set(running)
        self.waiting.set(waiting)
        self.pages_used.set(pages_used)

    def preempted(self) -> None:
        self.preemptions.inc()

    def pool(self, pages: int) -> None:
        self.pages_total.set(pages)

    def prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_queries.inc(queries)
        self.prefix_hits.inc(hits)

    # -- the server's ------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
