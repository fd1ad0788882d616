"""Live faults between two processes on the real transports (nixl, tcp): a stalled sender
(a pause point in front of its engine, and SIGSTOP), a control connection blackholed by a
proxy the test owns while a data write is queued. After each fault the survivor fails with a
typed error within its deadline, the blocks a late write could reach stay quarantined until
a proof or the grant's expiry, and a canary -- a new request leasing the very same blocks,
kept open while the stale write is let go -- stays byte-correct. Both pools end full."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fault_proxy import FaultProxy
from runtime_harness import NodeProc, RemoteError, transport_params

pytestmark = pytest.mark.timeout(120)

N = 500  # tokens: 4 blocks; unknown length, the receiver's default allocation takes all 8
FREE = 8  # blocks of the language pool the test leaves free (the rest are held)
FAST = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.5,
    "chunk_timeout": 2.0,
    "write_timeout": 1.0,
    "abort_ack_timeout": 1.0,
}


@pytest.fixture(params=transport_params("tcp", "nixl"))
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def procs() -> Iterator[list[NodeProc]]:
    made: list[NodeProc] = []
    yield made
    for p in made:
        if p.proc.is_alive():
            p.resume()  # a stopped process would otherwise outlive the test
        p.kill()


def _settled(node: NodeProc, held_blocks: int = 0, timeout: float = 15) -> dict[str, Any]:
    h = node.call("pool_settled", timeout, timeout=timeout + 10)
    pool = h["pool"]
    assert pool["blocks_free"] + held_blocks == pool["blocks_total"], h
    assert pool["blocks_quarantined"] == 0, h
    return h


def test_control_blackholed_while_a_write_is_queued(transport: str, procs: list) -> None:
    """The language node declares the encoder lost (heartbeats stop through a blackholed
    proxy) while the encoder's write is still queued; the encoder, on a longer heartbeat
    timeout, still thinks the peer alive and lets the write go later. The new lease that got
    the same blocks must not see a byte of it."""
    enc = NodeProc("encode", transport, **{**FAST, "heartbeat_timeout": 60})
    procs.append(enc)
    lang = NodeProc("language", transport, **FAST)
    procs.append(lang)
    proxy = FaultProxy(enc.address)
    try:
        lang.call("hold", 64 - FREE)
        enc.call("hold_writes")
        r = lang.start("receive", "victim", proxy.address, None, 1, N)
        s = enc.start("send", "victim", N, 1, None)
        assert enc.call("writes_held", 10) == 1
        t0 = time.monotonic()
        proxy.blackhole()
        with pytest.raises(RemoteError) as err:
            lang.wait(r, timeout=20)
        assert err.value.kind == "PeerLost", err.value
        assert time.monotonic() - t0 < FAST["heartbeat_timeout"] + 3
        h = lang.call("health")
        if transport == "nixl":  # a one-sided engine: nothing proves the write will not land
            assert h["pool"]["blocks_quarantined"] == FREE, h
        else:  # tcp: remove_peer dropped the peer's data connections
            assert h["pool"]["blocks_quarantined"] == 0, h
        # the canary: same blocks, a fresh connection, kept open while the stale write goes
        c = lang.start("lease_open", "canary", enc.address, N, 2, N)
        cs = enc.start("send", "canary", N, 2, None)
        enc.call("release_writes")  # the canary's own write must pass the pause point too
        got = lang.wait(c, timeout=30)
        enc.wait(cs, timeout=30)
        assert got["ok"] and got["zero_copy"], got
        with pytest.raises(RemoteError) as late:  # the queued write is refused at posting
            enc.wait(s, timeout=30)
        assert late.value.kind in ("TransferError", "PeerLost", "TransferTimeout"), late.value
        assert lang.call("lease_check", "canary"), "a stale write landed in the canary's blocks"
        lang.call("lease_close", "canary")
        lang.call("release")
        _settled(lang)
        _settled(enc)
    finally:
        proxy.close()


def test_sender_stopped_mid_write_then_resumed(transport: str, procs: list) -> None:
    """SIGSTOP the encoder while its write waits at the pause point: the receiver times out
    (typed, within chunk_timeout), its blocks are released only on proof (tcp: the fence) or
    at the grant's expiry (nixl: no ack can come from a stopped process), a second encoder's
    payload leases the same blocks, and when the first one wakes up its stale write lands
    nowhere."""
    enc = NodeProc("encode", transport, **{**FAST, "heartbeat_timeout": 60})
    procs.append(enc)
    enc2 = NodeProc("encode", transport, **FAST)
    procs.append(enc2)
    lang = NodeProc("language", transport, **{**FAST, "heartbeat_timeout": 60})
    procs.append(lang)
    lang.call("hold", 64 - FREE)
    enc.call("hold_writes")
    r = lang.start("receive", "victim", enc.address, None, 1, N)
    s = enc.start("send", "victim", N, 1, None)
    assert enc.call("writes_held", 10) == 1
    enc.pause()
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        lang.wait(r, timeout=20)
    took = time.monotonic() - t0
    assert err.value.kind == "TransferTimeout", err.value
    assert took < FAST["chunk_timeout"] + 2, took
    # quarantine always ends: tcp at once (fence), nixl by the grant's expiry
    bound = FAST["chunk_timeout"] + FAST["write_timeout"] + FAST["abort_ack_timeout"] + 3
    _settled(lang, held_blocks=64 - FREE, timeout=bound)
    c = lang.start("lease_open", "canary", enc2.address, N, 2, N)
    cs = enc2.start("send", "canary", N, 2, None)
    got = lang.wait(c, timeout=30)
    enc2.wait(cs, timeout=30)
    assert got["ok"] and got["zero_copy"], got
    enc.resume()
    enc.call("release_writes")
    with pytest.raises(RemoteError):
        enc.wait(s, timeout=30)
    assert lang.call("lease_check", "canary"), "a stale write landed in the canary's blocks"
    lang.call("lease_close", "canary")
    lang.call("release")
    _settled(lang)
    _settled(enc)
    _settled(enc2)


@pytest.mark.parametrize("fault", ["stall", "blackhole"])
@pytest.mark.parametrize("engine", transport_params("nixl"))
def test_a_posted_write_in_flight_lands_only_in_quarantined_blocks(
    engine: str, fault: str, procs: list
) -> None:
    """Finding 1 at its root, on the engine that cannot fence (nixl): the write passed every
    check of the sender and is posted, still in flight, when the receiver loses the sender.
    Only the quarantine stands between it and the next lease: the canary asks for the same
    blocks at once and waits for the grant's expiry, the write lands meanwhile (within the
    engine's bound on a posted write) in quarantined blocks, and the canary stays correct."""
    slow = {**FAST, "chunk_timeout": 6.0, "alloc_timeout": 30.0}
    enc = NodeProc("encode", engine, **{**slow, "heartbeat_timeout": 60})
    procs.append(enc)
    enc2 = NodeProc("encode", engine, **slow)
    procs.append(enc2)
    lang = NodeProc("language", engine, **slow)
    procs.append(lang)
    proxy = FaultProxy(enc.address)
    try:
        lang.call("hold", 64 - FREE)
        enc.call("hold_posts")
        r = lang.start("receive", "victim", proxy.address, None, 1, N)
        s = enc.start("send", "victim", N, 1, None)
        assert enc.call("posts_held", 10)
        if fault == "stall":
            enc.pause()
        else:
            proxy.blackhole()
        with pytest.raises(RemoteError) as err:
            lang.wait(r, timeout=20)
        assert err.value.kind == "PeerLost", err.value
        h = lang.call("health")
        assert h["pool"]["blocks_quarantined"] == FREE, h
        c = lang.start("lease_open", "canary", enc2.address, N, 2, N)
        cs = enc2.start("send", "canary", N, 2, None)
        lang.call("state", "canary", ["ALLOCATING"], 10.0)  # the blocks are not to be had
        if fault == "stall":
            enc.resume()
        enc.call("release_posts")  # the posted write completes: into the quarantined blocks
        with pytest.raises(RemoteError):  # the sender gave the request up meanwhile
            enc.wait(s, timeout=30)
        enc.call("ended", "victim", 10.0)  # ... and the abandoned write has ended
        got = lang.wait(c, timeout=30)  # the quarantine ended at the grant's expiry
        enc2.wait(cs, timeout=30)
        assert got["ok"] and got["zero_copy"], got
        assert lang.call("lease_check", "canary"), "the late write landed in the canary's blocks"
        lang.call("lease_close", "canary")
        lang.call("release")
        _settled(lang)
        _settled(enc)
        _settled(enc2)
    finally:
        proxy.close()
