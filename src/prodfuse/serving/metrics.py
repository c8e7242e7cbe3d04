"""The service's Prometheus metrics, in a registry of its own (no process-wide state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        r = self.registry
        self.requests = Counter(
            "prodfuse_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "prodfuse_request_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.items = Counter("prodfuse_items", "items classified, by outcome", ["outcome"], registry=r)
        self.batch_size = Histogram("prodfuse_batch_size", "items per model call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(
            "prodfuse_batch_seconds", "seconds per model call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("prodfuse_queue_depth", "items admitted and not yet answered", registry=r)
        self.ocr_restarts = Counter("prodfuse_ocr_pool_restarts", "OCR pools replaced after a worker died", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
