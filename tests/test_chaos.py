"""Seeded chaos between two processes, over nixl and over tcp: 500 requests in concurrent
batches while stalls (SIGSTOP), control-connection cuts and blackholes (a proxy the test
owns), callers giving up (receives and sends cancelled mid-flight), and kills with a restart
of the encoder are injected at random moments. Invariants at
the end: no payload was ever delivered wrong as a success, every request ended -- success or
a typed error -- within its deadline, and both pools are full with nothing quarantined."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from fault_proxy import FaultProxy
from runtime_harness import NodeProc, RemoteError, transport_params

pytestmark = pytest.mark.timeout(300)

REQUESTS = 500
BATCH = 25
SETTINGS: dict[str, Any] = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.0,
    "init_timeout": 4.0,
    "data_timeout": 4.0,
    "chunk_timeout": 3.0,
    "resume_timeout": 3.0,
    "alloc_timeout": 3.0,
    "write_timeout": 1.0,
    "abort_ack_timeout": 1.0,
}
#: every request ends by then: the longest chain of state deadlines, with slack
DEADLINE_S = 30.0
TYPED = {
    "PeerLost",
    "TransferTimeout",
    "TransferAborted",
    "AllocationTimeout",
    "CapacityError",
    "TransferError",
    "ProtocolError",
}
POOL_TOKENS = 64 * 128


class _Encoder:
    """The encode process and the proxy in front of it; restartable."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.proc = NodeProc("encode", transport, **SETTINGS)
        self.proxy = FaultProxy(self.proc.address)

    def restart(self) -> None:
        self.proxy.close()
        self.proc.kill()
        self.proc = NodeProc("encode", self.transport, **SETTINGS)
        self.proxy = FaultProxy(self.proc.address)

    def close(self) -> None:
        self.proxy.close()
        self.proc.resume()
        self.proc.kill()


@pytest.mark.parametrize("transport", transport_params("tcp", "nixl"))
def test_chaos(transport: str) -> None:
    rng = random.Random(20261201)
    enc = _Encoder(transport)
    lang = NodeProc("language", transport, **SETTINGS)
    outcomes: dict[str, int] = {"ok": 0}
    faults: dict[str, int] = {}
    wrong: list[str] = []
    calm_ok = 0  # successes in batches without a fault
    try:
        for b in range(REQUESTS // BATCH):
            kinds = ["none", "cut", "blackhole", "stall", "abort", "kill"]
            fault = rng.choices(kinds, [45, 10, 10, 10, 17, 8])[0]
            faults[fault] = faults.get(fault, 0) + 1
            recvs, sends = [], []
            for i in range(BATCH):
                rid = f"b{b}-{i}"
                n = rng.choice([rng.randint(1, 1500), rng.randint(1, 4000), POOL_TOKENS + 300])
                expected = n if rng.random() < 0.5 else None
                seed = rng.randrange(1 << 16)
                recvs.append(
                    (rid, lang.start("receive", rid, enc.proxy.address, expected, seed, n))
                )
                sends.append(enc.proc.start("send", rid, n, seed, None))
            time.sleep(rng.uniform(0, 0.05))  # the fault's random moment, not a sync point
            proc = enc.proc
            if fault == "cut":
                enc.proxy.cut()
            elif fault == "blackhole":
                enc.proxy.blackhole()
            elif fault == "stall":
                proc.pause()
            elif fault == "kill":
                proc.kill()
            cancelled = set()
            if fault == "abort":  # callers give up: some receives, some sends
                for _rid, cid in rng.sample(recvs, BATCH // 2):
                    lang.start("cancel", cid)
                    cancelled.add(cid)
                for cid in rng.sample(sends, BATCH // 4):
                    enc.proc.start("cancel", cid)
                    cancelled.add(cid)
            t0 = time.monotonic()
            for rid, cid in recvs:  # the survivor's deadlines end each one, fault or not
                left = DEADLINE_S - (time.monotonic() - t0)
                try:
                    got = lang.wait(cid, timeout=max(left, 0.1))
                except RemoteError as exc:
                    ok = exc.kind in TYPED or (exc.kind == "CancelledError" and cid in cancelled)
                    assert ok, f"{rid}: untyped {exc}"
                    outcomes[exc.kind] = outcomes.get(exc.kind, 0) + 1
                    continue
                except TimeoutError:
                    raise AssertionError(f"{rid} did not end within {DEADLINE_S}s") from None
                if not got["ok"]:
                    wrong.append(rid)
                outcomes["ok"] += 1
                calm_ok += fault == "none"
            if fault == "blackhole":
                enc.proxy.heal()
            elif fault == "stall":
                proc.resume()
            if fault == "kill":
                enc.restart()
            else:
                for cid in sends:
                    try:
                        enc.proc.wait(cid, timeout=DEADLINE_S)
                    except RemoteError as exc:
                        ok = exc.kind in TYPED or (
                            exc.kind == "CancelledError" and cid in cancelled
                        )
                        assert ok, f"send: untyped {exc}"
        assert not wrong, f"payloads delivered wrong as a success: {wrong}"
        assert sum(outcomes.values()) == REQUESTS, outcomes
        # the faults of one batch do not spill into the next: a calm batch goes through
        assert calm_ok >= 0.9 * BATCH * faults.get("none", 0), (calm_ok, outcomes, faults)
        for node in (lang, enc.proc):
            h = node.call("pool_settled", 30, timeout=40)
            assert h["pool"]["blocks_free"] == h["pool"]["blocks_total"], h
            assert h["pool"]["blocks_quarantined"] == 0, h
        print(f"chaos {transport}: outcomes {outcomes}, faults {faults}, calm ok {calm_ok}")
    finally:
        enc.close()
        lang.kill()
