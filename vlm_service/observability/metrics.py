"""Prometheus metrics (prometheus-client), served over HTTP on ``--metrics-port``.

Each server has its own registry. Latencies, tokens and statuses are recorded as they happen (the
scheduler threads and the RPC handlers share thread-safe instruments); queue depth, running requests
and open streams (and the image caches' hit and miss counts) come from a :class:`Snapshot` that the
engine's snapshot function returns when Prometheus scrapes, so the hot path pays nothing for them and
this module never reads the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vlm_service.types import FinishReason

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass(frozen=True)
class ModelSnapshot:
    """One served model at a scrape; None where it has no scheduler (queue) or backend (cache) yet."""

    name: str
    queued: int | None = None
    running: int | None = None
    image_cache_hits: Mapping[str, int] | None = None  # by kind (preprocessing, features, ...)
    image_cache_misses: Mapping[str, int] | None = None


@dataclass(frozen=True)
class Snapshot:
    """What the server reports at a scrape, beyond the instruments."""

    models: tuple[ModelSnapshot, ...] = ()
    open_streams: int = 0


class Metrics:
    """The service's instruments, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "vlm_time_to_first_token_seconds",
            "From the request's arrival to its first text.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "vlm_inter_token_latency_seconds",
            "Time between a request's successive tokens: its first token to its first decode step, then decode step "
            "to decode step (one token each; one text piece of the remote code for Moondream). Prefill chunks and "
            "stop checks are not tokens.",
            ["model"],
            buckets=_TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vlm_queue_time_seconds",
            "From the request's arrival to the start of its generation.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_expired = Counter(
            "vlm_queue_expired",
            "Requests whose deadline passed while they waited in the queue: they never started (DEADLINE_EXCEEDED).",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "vlm_batch_size", "Requests in each decode step.", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.tokens = Counter("vlm_generated_tokens", "Tokens generated.", ["model"], registry=r)
        self.tokens_after_end = Counter(
            "vlm_tokens_after_rpc_end",
            "Decode steps run for requests whose RPC had already ended when the step began (cancel, deadline, "
            "disconnect): work for nobody; should stay near one per ended RPC.",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "vlm_requests",
            "Caption, Query, Detect, Point and Watch RPCs by final status code.",
            ["method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "vlm_request_duration_seconds",
            "Caption, Query, Detect, Point and Watch RPCs end to end, from the call's arrival to its end, by final status code.",
            ["method", "code"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vlm_prompt_tokens", "Prompt tokens (image tokens included) of the generations run.", ["model"], registry=r
        )
        self.finish_reasons = Counter(
            "vlm_finish_reasons",
            "Generations that ran to their end, by why they ended (stop, length, stop_sequence).",
            ["model", "reason"],
            registry=r,
        )
        self.watch_frames_received = Counter(
            "vlm_watch_frames_received", "Frames received by Watch streams.", ["model"], registry=r
        )
        self.watch_frames = Counter(
            "vlm_watch_frames",
            "Watch frames by what became of them: answered (to the answer's end), interrupted (a newer frame "
            "stopped the answer), skipped (a newer frame replaced it before its answer), rejected (an error "
            "message: bad image or frame id, queue full, model failure), unanswered (the stream ended first).",
            ["model", "outcome"],
            registry=r,
        )

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Report what ``snapshot()`` returns (queue depth, running requests, open streams, image cache
        counts) at each scrape."""
        self.registry.register(_SnapshotCollector(snapshot))

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Serve ``/metrics`` over HTTP on ``port`` (a daemon thread); returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._snapshot()
        queued = GaugeMetricFamily("vlm_queue_depth", "Requests waiting for their model.", labels=["model"])
        running = GaugeMetricFamily("vlm_running_requests", "Requests being generated.", labels=["model"])
        for model in snapshot.models:
            if model.queued is not None:
                queued.add_metric([model.name], model.queued)
            if model.running is not None:
                running.add_metric([model.name], model.running)
        yield queued
        yield running
        hits = CounterMetricFamily(
            "vlm_image_cache_hits",
            "Image-cache lookups that found the image's work done (preprocessing, features), by kind.",
            labels=["model", "kind"],
        )
        misses = CounterMetricFamily(
            "vlm_image_cache_misses", "Image-cache lookups that had to compute, by kind.", labels=["model", "kind"]
        )
        for model in snapshot.models:
            for kind, count in sorted((model.image_cache_hits or {}).items()):
                hits.add_metric([model.name, kind], count)
            for kind, count in sorted((model.image_cache_misses or {}).items()):
                misses.add_metric([model.name, kind], count)
        yield hits
        yield misses
        yield GaugeMetricFamily(
            "vlm_active_streams", "Open Caption, Query, Detect, Point and Watch streams.", value=snapshot.open_streams
        )


class ModelMetrics:
    """One model's instruments, label already bound (what a scheduler and its jobs record into)."""

    def __init__(self, metrics: Metrics, model: str):
        self.time_to_first_token = metrics.time_to_first_token.labels(model)
        self.inter_token_latency = metrics.inter_token_latency.labels(model)
        self.queue_time = metrics.queue_time.labels(model)
        self.queue_expired = metrics.queue_expired.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self.tokens = metrics.tokens.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.finish_reasons = {reason: metrics.finish_reasons.labels(model, reason.value) for reason in FinishReason}
        self.tokens_after_end = metrics.tokens_after_end.labels(model)
