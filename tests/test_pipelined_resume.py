"""Pipelined resume across two OS processes, on every transport that runs here: round 1 is
granted while round 0 is on the wire and written straight after it; the sequential path when
pipelining is off; and the faults that strike while two grants are out (a killed sender, a
stalled one whose late writes come after the receiver gave both allocations up).

Round 0's write is held at the encode node's pause point (before the engine's own checks and
post, as a write queued behind a busy executor), so "round 0 on the wire" is a fact, not a
race: the test sees the receiver's prefetched grant and the sender holding it before it lets
the write go."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from runtime_harness import NodeProc, RemoteError, transport_params
from test_conformance import _pair, _settled

TRANSPORTS = transport_params("tcp", "nixl", "torch", "mooncake")
N = 2000  # tokens: round 0 takes the default 1024, round 1 the other 976
WAIT_S = 30.0


@pytest.fixture
def procs() -> Iterator[list[NodeProc]]:
    started: list[NodeProc] = []
    yield started
    for p in started:
        if p.proc.is_alive():
            try:
                p.resume()
                p.stop()
            except Exception:
                p.kill()


def _start(enc: NodeProc, lang: NodeProc, rid: str, seed: int) -> tuple[int, int]:
    r = lang.start("receive", rid, enc.address, None, seed, N)
    s = enc.start("send", rid, N, seed, {"rid": rid})
    return r, s


def _two_grants_out(enc: NodeProc, lang: NodeProc, rid: str) -> None:
    """Round 0's write sits at the pause point; round 1's grant is out and the sender has it."""
    assert enc.call("writes_held", WAIT_S) >= 1
    assert lang.call("ahead", rid, WAIT_S)
    assert enc.call("ahead", rid, WAIT_S)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_round_1_is_granted_and_written_while_round_0_is_on_the_wire(
    transport: str, procs: list[NodeProc]
) -> None:
    enc, lang = _pair(transport)
    procs += [lang, enc]
    enc.call("hold_writes")
    r, s = _start(enc, lang, "pipe", 7)
    _two_grants_out(enc, lang, "pipe")
    enc.call("release_writes")
    got, sent = lang.wait(r, timeout=WAIT_S), enc.wait(s, timeout=WAIT_S)
    assert got["ok"] and got["rounds"] == 2 and got["prefetched"] == 1, got
    assert sent["rounds"] == 2 and sent["resume_waits"] == 0, sent  # never waited for a Resume
    # three times the whole pool (64 blocks of 128): rounds granted beside the one on the wire
    big = 3 * 64 * 128 + 5
    r = lang.start("receive", "pipe-big", enc.address, None, 8, big)
    s = enc.start("send", "pipe-big", big, 8, {"rid": "pipe-big"})
    got, sent = lang.wait(r, timeout=WAIT_S), enc.wait(s, timeout=WAIT_S)
    assert got["ok"] and got["rounds"] >= 4 and got["prefetched"] >= 1, got
    _settled(enc, lang)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", transport_params("tcp", "nixl"))
def test_pipelining_off_waits_for_each_resume(transport: str, procs: list[NodeProc]) -> None:
    enc, lang = _pair(transport, lang_kw={"pipeline_resume": False})
    procs += [lang, enc]
    r, s = _start(enc, lang, "seq", 9)
    got, sent = lang.wait(r, timeout=WAIT_S), enc.wait(s, timeout=WAIT_S)
    assert got["ok"] and got["rounds"] == 2 and got["prefetched"] == 0, got
    assert sent["resume_waits"] == 1, sent
    _settled(enc, lang)


#: the receiver gives up sooner here; its quarantine then lasts at most the prefetched grant's
#: ttl (two chunk timeouts: round 0's wait, then round 1's) plus write_timeout
SHORT = {"chunk_timeout": 2.0, "write_timeout": 2.0}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", transport_params("tcp", "nixl", "mooncake"))
def test_a_sender_killed_with_two_grants_out_leaves_the_pool_full(
    transport: str, procs: list[NodeProc]
) -> None:
    enc, lang = _pair(transport, lang_kw=SHORT)
    procs += [lang, enc]
    enc.call("hold_writes")
    r, _ = _start(enc, lang, "kill2", 10)
    _two_grants_out(enc, lang, "kill2")
    enc.kill()
    with pytest.raises(RemoteError) as info:
        lang.wait(r, timeout=WAIT_S)
    assert info.value.kind == "PeerLost", info.value
    _settled(lang)  # both allocations back: at once (tcp) or at the last grant's expiry


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", transport_params("tcp", "nixl", "mooncake"))
def test_late_writes_of_a_stalled_sender_never_land_in_given_back_blocks(
    transport: str, procs: list[NodeProc]
) -> None:
    """The sender stalls (SIGSTOP) with round 0 held and round 1 granted; the receiver times
    out, quarantines both allocations and gets them back (fence, teardown or expiry). A new
    payload is leased into those blocks; then the sender wakes and its held writes go: they
    must not land (their grants' deadlines are past, or the peer was torn down), so the
    lease still reads exactly its own payload."""
    enc, lang = _pair(transport, lang_kw={**SHORT, "abort_ack_timeout": 1.0})
    procs += [lang, enc]
    enc.call("hold_writes")
    r, _ = _start(enc, lang, "stall", 11)
    _two_grants_out(enc, lang, "stall")
    enc.pause()
    with pytest.raises(RemoteError) as info:
        lang.wait(r, timeout=WAIT_S)
    assert info.value.kind in ("TransferTimeout", "PeerLost"), info.value
    _settled(lang)
    # a fresh encode node serves the lease that reuses the blocks
    enc2 = NodeProc("encode", transport)
    procs.append(enc2)
    lang.call("connect", enc2.address)
    s2 = enc2.start("send", "fresh", N, 12, {"rid": "fresh"})
    lease = lang.call("lease_open", "fresh", enc2.address, N, 12, N, timeout=WAIT_S)
    assert lease["ok"], lease
    enc2.wait(s2, timeout=WAIT_S)
    enc.resume()
    enc.call("release_writes", timeout=WAIT_S)
    assert enc.call("ended", "stall", WAIT_S, timeout=WAIT_S + 10)
    assert lang.call("lease_check", "fresh"), "a late write landed in the lease's blocks"
    lang.call("lease_close", "fresh")
    _settled(lang, enc, enc2)
