"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """Request counts, request latency, batch sizes and queue depth.

    Metric names (all prefixed ``rmkit_``):

    * ``requests_total{endpoint, status}``: answered requests by HTTP status.
    * ``request_latency_seconds{endpoint}``: histogram, arrival to answer.
    * ``batch_rows``: histogram of rows (responses) per ``predict`` call.
    * ``batch_requests``: histogram of requests merged into one ``predict`` call.
    * ``batch_seconds``: histogram of the time of one ``predict`` call.
    * ``rows_scored_total``: responses scored.
    * ``queue_rows``: gauge of rows waiting for a batch.
    """

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rmkit_requests", "Answered requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("rmkit_request_latency_seconds", "Request latency, arrival to answer",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("rmkit_batch_rows", "Rows (responses) per predict call",
                                    buckets=_SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("rmkit_batch_requests", "Requests merged into one predict call",
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("rmkit_batch_seconds", "Duration of one predict call",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.rows_scored = Counter("rmkit_rows_scored", "Responses scored", registry=r)
        self.queue = Gauge("rmkit_queue_rows", "Rows waiting for a batch", registry=r)

    def observe_request(self, endpoint, status, seconds):
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, rows, requests, seconds):
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)
        self.rows_scored.inc(rows)

    def set_queue(self, rows):
        self.queue.set(rows)

    def render(self):
        """The Prometheus text exposition (and its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
