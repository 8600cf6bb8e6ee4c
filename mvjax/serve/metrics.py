"""Prometheus metrics of the speech server (``GET /metrics``), through ``prometheus_client``.

Each app owns a :class:`~prometheus_client.CollectorRegistry`, so several servers in one process
(tests) do not share counters.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mvjax_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.queue_depth = Gauge("mvjax_queue_depth", "speech requests admitted and not finished", registry=r)
        self.waiting_chunks = Gauge("mvjax_waiting_chunks", "text chunks waiting for the model", registry=r)
        self.chunks_started = Counter("mvjax_chunks_started", "text chunks whose first stage started", registry=r)
        self.batch_size = Histogram("mvjax_batch_size", "text chunks per model batch (engine: per decode round)",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.batch_requests = Histogram("mvjax_batch_requests", "requests sharing a model batch",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.latency = Histogram("mvjax_speech_latency_seconds", "speech request time, arrival to last byte",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfa = Histogram("mvjax_time_to_first_audio_seconds", "speech request time, arrival to first audio",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("mvjax_stage1_tokens", "first-stage tokens generated", registry=r)
        self.stage1_seconds = Counter("mvjax_stage1_seconds", "time spent in first-stage decoding", registry=r)
        self.tokens_per_second = Gauge("mvjax_stage1_tokens_per_second",
                                       "first-stage tokens per second of the last batch", registry=r)
        self.audio_seconds = Counter("mvjax_audio_seconds", "seconds of speech produced", registry=r)
        self.dropped = Counter("mvjax_jobs_dropped", "speech requests dropped before finishing, by reason",
                               ["reason"], registry=r)

    def batch(self, stats) -> None:
        self.chunks_started.inc(stats.started)
        self.batch_size.observe(stats.chunks)
        self.batch_requests.observe(stats.utterances)
        self.tokens.inc(stats.tokens)
        self.stage1_seconds.inc(stats.stage1_seconds)
        if stats.stage1_seconds > 0:
            self.tokens_per_second.set(stats.tokens / stats.stage1_seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
