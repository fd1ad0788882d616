"""Prometheus metrics of one node (a registry per node, so several nodes share a process).

Names follow the Prometheus conventions (``_total`` counters, ``_seconds``, ``_bytes``); no
``_created`` series is exported; every label set a node can produce exists from the start (a
rate over a series that appears with its first event reads wrong); the pool's states sum to
its capacity; one counter of requests ended, by outcome, covers the failures too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

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
        self.transfers = Counter(
            "emtransfer_transfers", "Requests ended, by outcome", ["outcome"], registry=r
        )
        self.bytes = Counter(
            "emtransfer_payload_bytes", "Payload bytes moved", ["direction"], registry=r
        )
        self.tokens = Counter(
            "emtransfer_payload_tokens", "Payload tokens delivered", ["direction"], registry=r
        )
        self.rounds = Counter("emtransfer_rounds", "Protocol rounds completed", registry=r)
        self.resumes = Counter("emtransfer_resumes", "Rounds after the first", registry=r)
        self.prefetched = Counter(
            "emtransfer_resumes_pipelined",
            "Resume rounds granted while the round before was still on the wire",
            registry=r,
        )
        self.duration = Histogram(
            "emtransfer_transfer_duration_seconds",
            "Duration of requests that completed",
            buckets=buckets,
            registry=r,
        )
        self.alloc_wait = Histogram(
            "emtransfer_alloc_wait_seconds", "Time waiting for blocks", buckets=buckets, registry=r
        )
        self.quarantines = Counter(
            "emtransfer_quarantines",
            "Allocations quarantined because a write might still land in them",
            registry=r,
        )
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
        self._ended = {o: self.transfers.labels(o) for o in OUTCOMES}
        self.bytes_in, self.bytes_out = self.bytes.labels("in"), self.bytes.labels("out")
        self.tokens_in, self.tokens_out = self.tokens.labels("in"), self.tokens.labels("out")
        self.transfers_ok = self._ended["ok"]
        self._collector = _NoCreated(r)

    def totals(self) -> dict[str, float]:
        """Running totals: requests ended by outcome (``ok``, ``timeout``, ...), ``rounds``,
        ``resumes``, ``bytes_in``, ``bytes_out`` (what a periodic summary subtracts)."""
        out: dict[str, float] = {}
        for counter, label in ((self.transfers, "outcome"), (self.bytes, "direction")):
            for family in counter.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        key = sample.labels[label]
                        out[key if label == "outcome" else f"bytes_{key}"] = sample.value
        for name, counter in (("rounds", self.rounds), ("resumes", self.resumes)):
            out[name] = sum(
                x.value for f in counter.collect() for x in f.samples if x.name.endswith("_total")
            )
        return out

    def failed(self, error: BaseException) -> None:
        """A request ended with ``error``."""
        self._ended[outcome_of(error)].inc()

    def render(self) -> bytes:
        return generate_latest(self._collector)
