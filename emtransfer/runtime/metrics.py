"""Prometheus metrics of one node (a registry per node, so several nodes share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..allocator import BlockAllocator

_DURATIONS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, role: str, allocator: BlockAllocator) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes = Counter("emtransfer_bytes", "Payload bytes moved", ["direction"], registry=r)
        self.transfers = Counter(
            "emtransfer_transfers", "Requests ended, by outcome", ["outcome"], registry=r
        )
        self.rounds = Counter("emtransfer_rounds", "Protocol rounds completed", registry=r)
        self.resumes = Counter("emtransfer_resumes", "Rounds after the first", registry=r)
        self.failures = Counter(
            "emtransfer_failures", "Failed requests by reason", ["reason"], registry=r
        )
        self.duration = Histogram(
            "emtransfer_transfer_seconds", "Request duration", buckets=_DURATIONS, registry=r
        )
        self.alloc_wait = Histogram(
            "emtransfer_alloc_wait_seconds",
            "Time waiting for blocks",
            buckets=_DURATIONS,
            registry=r,
        )
        self.quarantines = Counter(
            "emtransfer_quarantines",
            "Allocations quarantined because a write might still land in them",
            registry=r,
        )
        self.inflight = Gauge("emtransfer_inflight_requests", "Requests in flight", registry=r)
        self.peers = Gauge("emtransfer_peers", "Connected peers", registry=r)
        pool = Gauge("emtransfer_pool_blocks", "Pool blocks by state", ["state"], registry=r)
        pool.labels("total").set(allocator.num_blocks)
        pool.labels("free").set_function(lambda: allocator.num_free)
        pool.labels("quarantined").set_function(lambda: allocator.num_quarantined)
        Gauge("emtransfer_info", "Node role", ["role"], registry=r).labels(role).set(1)
        # children bound once: no label lookup per request
        self.bytes_in, self.bytes_out = self.bytes.labels("in"), self.bytes.labels("out")
        self.transfers_ok = self.transfers.labels("ok")

    def render(self) -> bytes:
        return generate_latest(self.registry)
