"""What the scheduler-side connector tells the workers each step, what they report back, and
the stats vLLM logs. Plain dataclasses: vLLM pickles them between its processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorMetadata,
    ECConnectorWorkerMetadata,
)
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorStats


@dataclass(frozen=True)
class LoadSpec:
    """One item for the worker to receive: from the encode node at ``peer``, as ``rid``,
    of exactly ``num_tokens`` rows (vLLM knows the count: one exact allocation)."""

    mm_hash: str
    rid: str
    peer: str
    num_tokens: int


@dataclass
class EmtransferECMetadata(ECConnectorMetadata):
    """Scheduler -> workers, once per step (``build_connector_meta``)."""

    loads: list[LoadSpec] = field(default_factory=list)
    #: items nobody waits for any more: abort the receive, or drop what the worker put in
    #: the encoder cache for them (vLLM never allocated those, so it would never free them)
    cancels: list[str] = field(default_factory=list)
    #: items vLLM's encoder cache now owns (allocated): the worker forgets it put them there
    adopted: list[str] = field(default_factory=list)
    #: producer: items the scheduled requests need; the worker serves those already cached
    #: (an encoder-cache hit is not re-encoded, so save_caches never fires for it)
    publish: list[str] = field(default_factory=list)


@dataclass
class EmtransferECWorkerMetadata(ECConnectorWorkerMetadata):
    """Workers -> scheduler, once per step (``build_connector_worker_meta``)."""

    loaded: set[str] = field(default_factory=set)  # now in the worker's encoder cache
    failed: dict[str, str] = field(default_factory=dict)  # mm_hash -> why
    address: str | None = None  # producer: where its encode node listens

    def aggregate(self, other: ECConnectorWorkerMetadata) -> EmtransferECWorkerMetadata:
        assert isinstance(other, EmtransferECWorkerMetadata)
        failed = {**self.failed, **other.failed}
        return EmtransferECWorkerMetadata(
            loaded=(self.loaded | other.loaded) - set(failed),
            failed=failed,
            address=self.address or other.address,
        )


#: the counters of EmtransferECStats (all sums over the interval)
STAT_KEYS = (
    "loads_ok",
    "loads_failed",
    "load_tokens",
    "load_bytes",
    "load_seconds",
    "load_rounds",
    "sends_ok",
    "sends_failed",
    "send_bytes",
)


@dataclass
class EmtransferECStats(ECConnectorStats):
    """Transfer counters of one interval, summed over workers; vLLM's stats logger prints
    ``reduce()`` ("EC Transfer metrics: loads_ok=..., load_GBps_per_load=...")."""

    def __post_init__(self) -> None:
        for key in STAT_KEYS:
            self.data.setdefault(key, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(STAT_KEYS, 0)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.data[key] = self.data.get(key, 0) + value

    def aggregate(self, other: ECConnectorStats) -> EmtransferECStats:
        out = EmtransferECStats(data=dict(self.data))
        out.add(**{k: v for k, v in other.data.items() if isinstance(v, int | float)})
        return out

    def reduce(self) -> dict[str, int | float]:
        d: dict[str, Any] = self.data
        out: dict[str, int | float] = {k: d.get(k, 0) for k in STAT_KEYS}
        if d.get("loads_ok"):
            out["load_ms_mean"] = round(1000 * d["load_seconds"] / d["loads_ok"], 3)
        if d.get("load_seconds"):
            out["load_GBps_per_load"] = round(d["load_bytes"] / d["load_seconds"] / 1e9, 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in STAT_KEYS)


__all__ = [
    "STAT_KEYS",
    "EmtransferECMetadata",
    "EmtransferECStats",
    "EmtransferECWorkerMetadata",
    "LoadSpec",
]
