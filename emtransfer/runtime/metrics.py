"""Prometheus metrics of one node (a registry per node, so several nodes share a process).

Names follow the Prometheus conventions (``_total`` counters, ``_seconds``, ``_bytes``); no
``_created`` series is exported; every label set a node can produce exists from the start (a
rate over a series that appears with its first event reads wrong); the pool's states sum to
its capacity; one counter of requests ended, by outcome, covers the failures too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from ..allocator import BlockAllocator
from ..errors import (
    AllocationTimeout,
    CapacityError,
    EncoderFailed,
    InvalidRequest,
    JobRefused,
    PeerLost,
    ProtocolError,
    TransferAborted,
    TransferTimeout,
    Unavailable,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ..settings import Settings

#: the base buckets of every duration histogram; the configured timeouts are added to them
_DURATIONS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: how a request ends: ``ok`` or the kind of failure (the label values of transfers_total)
OUTCOMES = (
    "ok",
    "timeout",
    "peer_lost",
    "unavailable",
    "aborted",
    "refused",
    "encoder_failed",
    "no_capacity",
    "invalid",
    "protocol_error",
    "failed",
)
#: most specific class first (AllocationTimeout is both a capacity error and a timeout)
_OUTCOME_OF: tuple[tuple[type[BaseException], str], ...] = (
    (AllocationTimeout, "no_capacity"),
    (TransferTimeout, "timeout"),
    (PeerLost, "peer_lost"),
    (Unavailable, "unavailable"),
    (JobRefused, "refused"),
    (EncoderFailed, "encoder_failed"),
    (TransferAborted, "aborted"),
    (CapacityError, "no_capacity"),
    (InvalidRequest, "invalid"),
    (ProtocolError, "protocol_error"),
)


def outcome_of(error: BaseException) -> str:
    """The ``outcome`` label of a request that ended with ``error``."""
    for cls, outcome in _OUTCOME_OF:
        if isinstance(error, cls):
            return outcome
    return "failed"


def duration_buckets(settings: Settings | None) -> tuple[float, ...]:
    """The base buckets plus every configured timeout (and twice the longest), so a request
    that ran into any deadline lands in a bucket of its own, not in ``+Inf``."""
    if settings is None:
        return _DURATIONS
    timeouts = [
        settings.bootstrap_timeout,
        settings.init_timeout,
        settings.data_timeout,
        settings.chunk_timeout,
        settings.resume_timeout,
        settings.alloc_timeout,
        settings.write_timeout,
    ]
    return tuple(sorted({*_DURATIONS, *timeouts, 2 * max(timeouts)}))


class Count:
    """One counter series that the node's loop adds to: a plain number, read when scraped.
    prometheus_client's own counter takes a lock and checks its labels on every ``inc``; a
    request moves about a dozen of them, on the loop that runs every request."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Durations:
    """One histogram that the node's loop observes into: a count per bucket and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with le >= value
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class _LoopSeries:
    """Exports the loop's counters and histograms as Prometheus families at scrape time
    (every label set present from the start, no ``_created`` samples)."""

    def __init__(self) -> None:
        self.counters: list[tuple[str, str, str, dict[str, Count]]] = []
        self.histograms: list[tuple[str, str, Durations]] = []

    def counter(self, name: str, doc: str) -> Count:
        return self.labelled(name, doc, "", ("",))[""]

    def labelled(self, name: str, doc: str, label: str, values: Iterable[str]) -> dict[str, Count]:
        """One series per label value, every one of them from the start."""
        children = {v: Count() for v in values}
        self.counters.append((name, doc, label, children))
        return children

    def histogram(self, name: str, doc: str, bounds: Iterable[float]) -> Durations:
        hist = Durations(bounds)
        self.histograms.append((name, doc, hist))
        return hist

    def collect(self) -> Iterable[Metric]:
        for name, doc, label, children in self.counters:
            family = CounterMetricFamily(name, doc, labels=[label] if label else None)
            for value, count in children.items():
                family.add_metric([value] if label else [], count.value)
            yield family
        for name, doc, hist in self.histograms:
            yield HistogramMetricFamily(name, doc, buckets=hist.buckets(), sum_value=hist.sum)


class _NoCreated:
    """The registry's families without their ``_created`` samples (a per-registry choice: the
    process-wide switch of prometheus_client would change the host application's metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    def __init__(
        self,
        role: str,
        allocator: BlockAllocator,
        settings: Settings | None = None,
        *,
        transport: str = "",
        inflight: Callable[[], int] | None = None,
        peers: Callable[[], int] | None = None,
    ) -> None:
        from .. import __version__

        self.registry = CollectorRegistry()
        r = self.registry
        buckets = duration_buckets(settings)
        info = Gauge(
            "emtransfer_node_info",
            "The node: emtransfer's version, role, transport, payload shape (value 1)",
            ["version", "role", "transport", "hidden_size", "dtype"],
            registry=r,
        )
        info.labels(
            __version__,
            role,
            transport,
            str(settings.hidden_size) if settings else "",
            settings.dtype if settings else "",
        ).set(1)
        series = _LoopSeries()
        self._ended = series.labelled(
            "emtransfer_transfers", "Requests ended, by outcome", "outcome", OUTCOMES
        )
        self._bytes = series.labelled(
            "emtransfer_payload_bytes", "Payload bytes moved", "direction", ("in", "out")
        )
        self._tokens = series.labelled(
            "emtransfer_payload_tokens", "Payload tokens delivered", "direction", ("in", "out")
        )
        self.rounds = series.counter("emtransfer_rounds", "Protocol rounds completed")
        self.resumes = series.counter("emtransfer_resumes", "Rounds after the first")
        self.prefetched = series.counter(
            "emtransfer_resumes_pipelined",
            "Resume rounds granted while the round before was still on the wire",
        )
        self.quarantines = series.counter(
            "emtransfer_quarantines",
            "Allocations quarantined because a write might still land in them",
        )
        self.duration = series.histogram(
            "emtransfer_transfer_duration_seconds", "Duration of requests that completed", buckets
        )
        self.alloc_wait = series.histogram(
            "emtransfer_alloc_wait_seconds", "Time waiting for blocks", buckets
        )
        r.register(series)
        gauge = Gauge("emtransfer_inflight_requests", "Requests in flight", registry=r)
        gauge.set_function(inflight or (lambda: 0))
        gauge = Gauge("emtransfer_peers", "Connected peers", registry=r)
        gauge.set_function(peers or (lambda: 0))
        Gauge("emtransfer_pool_capacity_blocks", "Blocks in the pool", registry=r).set_function(
            lambda: allocator.num_blocks
        )
        pool = Gauge(
            "emtransfer_pool_blocks",
            "Pool blocks by state (free + used + quarantined = capacity)",
            ["state"],
            registry=r,
        )
        pool.labels("free").set_function(lambda: allocator.num_free)
        pool.labels("quarantined").set_function(lambda: allocator.num_quarantined)
        pool.labels("used").set_function(
            lambda: allocator.num_blocks - allocator.num_free - allocator.num_quarantined
        )
        ProcessCollector(registry=r)  # process_cpu_seconds_total, memory, open fds
        # every label set exists from the start; children bound once, no lookup per request
        self.bytes_in, self.bytes_out = self._bytes["in"], self._bytes["out"]
        self.tokens_in, self.tokens_out = self._tokens["in"], self._tokens["out"]
        self.transfers_ok = self._ended["ok"]
        self._collector = _NoCreated(r)

    def totals(self) -> dict[str, float]:
        """Running totals: requests ended by outcome (``ok``, ``timeout``, ...), ``rounds``,
        ``resumes``, ``bytes_in``, ``bytes_out`` (what a periodic summary subtracts)."""
        out = {outcome: count.value for outcome, count in self._ended.items()}
        out["rounds"], out["resumes"] = self.rounds.value, self.resumes.value
        out["bytes_in"], out["bytes_out"] = self.bytes_in.value, self.bytes_out.value
        return out

    def failed(self, error: BaseException) -> None:
        """A request ended with ``error``."""
        self._ended[outcome_of(error)].inc()

    def render(self) -> bytes:
        return generate_latest(self._collector)
