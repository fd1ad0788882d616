"""Every protocol state on both sides, under a live fault, on the real transports (nixl, tcp,
mooncake) with the nodes in separate processes.

Each case brings one request into a pair of states (the sender's and the receiver's) with the
pause points of the harness (writes held before the engine, allocations held before the pool,
the pool taken, one side not started yet), then faults it one of three ways:

- ``stall_enc``: SIGSTOP the encode node (alive, sockets open, silent);
- ``stall_lang``: SIGSTOP the language node;
- ``cut``: blackhole the control connection in a proxy the test owns (no FIN, no RST) while
  the data path stays up.

Then: every survivor's request ends with a typed error within the deadline its state allows;
the blocks a late write could reach stay quarantined until a proof or the grant's expiry, and
the quarantine always ends; a canary request from a second encoder leases the very same
blocks and stays byte-correct while the stalled node wakes up and its held writes are let go;
both pools end full. The processes serve all the cases of one transport (a fresh proxy and a
fresh rid per case), so the matrix costs seconds per case, not a process start.

The matrix runs twice per transport: on one host (loopback; nixl over shared memory), and on
two hosts (network namespaces joined by a veth pair, the encoders on one, the language node
and the proxy on the other; nixl with UCX over TCP), where nothing can take a local shortcut.
mooncake runs a representative subset, to keep the suite's time: every scenario under two of
the three faults, one per placement (12 of the 36 cases; ``EMTRANSFER_FULL_FAULT_MATRIX=1``
runs them all).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import netns
import pytest
from fault_proxy import FaultProxy
from runtime_harness import NodeProc, RemoteError, transport_params

import emtransfer as et

pytestmark = pytest.mark.timeout(90)
#: transports that run only :func:`_in_subset` of the matrix unless this is set
SUBSET = () if os.environ.get("EMTRANSFER_FULL_FAULT_MATRIX") == "1" else ("mooncake",)

POOL = 64
FREE = 8  # language blocks left free: the victim's default allocation takes all of them
SMALL = 500  # tokens: one round of 4 blocks
LARGE = 1500  # tokens: a round of 8 blocks (1024), then a Resume for the rest
T = {
    "heartbeat_interval": 0.2,
    "heartbeat_timeout": 1.5,
    "chunk_timeout": 2.0,
    "write_timeout": 1.0,
    "abort_ack_timeout": 1.5,
    "init_timeout": 3.0,
    "data_timeout": 3.0,
    "alloc_timeout": 3.0,
    "resume_timeout": 3.0,
}
#: no request of either side may outlive the longest chain of deadlines: a state's own
#: deadline (or the peer-loss detection), then draining, then the margin of a loaded machine
BOUND = max(T["chunk_timeout"], T["init_timeout"]) + T["write_timeout"] + T["abort_ack_timeout"] + 3
#: a quarantine ends by the grant's expiry: its lifetime (chunk_timeout and the stamp's age),
#: the engine's bound on a posted write, and that margin
SETTLE = T["chunk_timeout"] + T["write_timeout"] + T["abort_ack_timeout"] + BOUND
FAULTS = ["stall_enc", "stall_lang", "cut"]
_rids = itertools.count()


@dataclass
class Nodes:
    transport: str
    enc: NodeProc
    enc2: NodeProc  # the canary's sender, never faulted
    lang: NodeProc
    hosts: netns.TwoHosts | None = None

    def proxy(self) -> FaultProxy:
        """A fresh proxy in front of the faulted encoder, on the language node's host."""
        if self.hosts is None:
            return FaultProxy(self.enc.address)
        return FaultProxy(self.enc.address, listen=self.hosts.addr_a, netns=self.hosts.a)


def _placements() -> list[object]:
    out: list[object] = []
    why_not = netns.unavailable()
    for p in transport_params("tcp", "nixl", "mooncake"):
        out.append(pytest.param((p.values[0], False), marks=p.marks, id=p.id))
        marks = [*p.marks, *([pytest.mark.skip(reason=why_not)] if why_not else [])]
        out.append(pytest.param((p.values[0], True), marks=marks, id=f"{p.id}-two-hosts"))
    return out


@pytest.fixture(scope="module", params=_placements())
def nodes(request: pytest.FixtureRequest) -> Iterator[Nodes]:
    transport, two = request.param
    hosts = netns.TwoHosts() if two else None
    made: list[NodeProc] = []
    try:
        for role in ("encode", "encode", "language"):
            if hosts is None:
                made.append(NodeProc(role, transport, **T))
                continue
            ns, addr = (hosts.b, hosts.addr_b) if role == "encode" else (hosts.a, hosts.addr_a)
            env = {"UCX_TLS": "tcp"} if transport == "nixl" else {}
            made.append(NodeProc(role, transport, env=env, netns=ns, host=addr, **T))
        yield Nodes(transport, *made, hosts=hosts)
    finally:
        for p in made:
            if p.proc.is_alive():
                p.resume()
            p.kill()
        if hosts is not None:
            hosts.close()


@dataclass
class Case:
    """One request in flight: the calls the test waits on, and the pause points it set."""

    rid: str
    n: int
    recv: int | None = None
    send: int | None = None


def _one_sided(transport: str) -> bool:
    """An engine that can stop neither a tag's writes nor a removed peer's (nixl, mooncake):
    a grant it gave stays quarantined until a proof or its expiry."""
    from emtransfer.transport import transport_class

    g = transport_class(transport).GUARANTEES
    return not (g.fences_tag or g.remove_stops_inbound)


def _typed(err: RemoteError) -> bool:
    cls = getattr(et, err.kind, None) or getattr(et.errors, err.kind, None)
    return isinstance(cls, type) and issubclass(cls, et.TransferError)


def _outcome(node: NodeProc, cid: int, timeout: float) -> tuple[str, Any, float]:
    """('ok' | 'error', value, seconds waited) of a started call."""
    t0 = time.monotonic()
    try:
        value = node.wait(cid, timeout=timeout)
        return "ok", value, time.monotonic() - t0
    except RemoteError as err:
        assert _typed(err), f"untyped failure: {err}"
        return "error", err, time.monotonic() - t0


def _settled(node: NodeProc, held: int = 0, timeout: float = SETTLE) -> None:
    h = node.call("pool_settled", timeout, timeout=timeout + 10)
    pool = h["pool"]
    assert pool["blocks_free"] + held == pool["blocks_total"], h
    assert pool["blocks_quarantined"] == 0, h
    assert not h["leaks"] or set(h["leaks"]) <= {"held-by-test"}, h


# ------------------------------------------------------------------ bringing states about


def _start(nodes: Nodes, proxy: FaultProxy, case: Case, *, recv: bool = True, send: bool = True):
    if recv:
        case.recv = nodes.lang.start("receive", case.rid, proxy.address, None, 1, case.n)
    if send:
        case.send = nodes.enc.start("send", case.rid, case.n, 1, None)


def _await_states(nodes: Nodes, case: Case, enc: list[str] | None, lang: list[str] | None) -> None:
    if enc:
        nodes.enc.call("state", case.rid, enc, 20.0, timeout=30)
    if lang:
        nodes.lang.call("state", case.rid, lang, 20.0, timeout=30)


def alloc_wait_init(nodes: Nodes, proxy: FaultProxy, case: Case) -> None:
    """receiver ALLOCATING (round 0: its pool is busy), sender WAIT_INIT."""
    nodes.lang.call("hold_allocs")
    _start(nodes, proxy, case)
    _await_states(nodes, case, ["WAIT_INIT"], ["ALLOCATING"])


def chunk_wait_data(nodes: Nodes, proxy: FaultProxy, case: Case) -> None:
    """receiver WAIT_CHUNK (its Init came first), sender WAIT_DATA (no payload yet)."""
    _start(nodes, proxy, case, send=False)
    _await_states(nodes, case, ["WAIT_DATA"], ["WAIT_CHUNK"])


def chunk_staging(nodes: Nodes, proxy: FaultProxy, case: Case) -> None:
    """receiver WAIT_CHUNK, sender STAGING (its own pool is busy)."""
    nodes.enc.call("hold_allocs")
    _start(nodes, proxy, case)
    _await_states(nodes, case, ["STAGING"], ["WAIT_CHUNK"])


def chunk_writing(nodes: Nodes, proxy: FaultProxy, case: Case) -> None:
    """receiver WAIT_CHUNK, sender WRITING (its write queued before the engine)."""
    nodes.enc.call("hold_writes")
    _start(nodes, proxy, case)
    assert nodes.enc.call("writes_held", 20) >= 1
    _await_states(nodes, case, ["WRITING"], ["WAIT_CHUNK"])


def resume_wait_resume(nodes: Nodes, proxy: FaultProxy, case: Case) -> None:
    """receiver ALLOCATING round 1, sender WAIT_RESUME (round 0 went through)."""
    nodes.enc.call("hold_writes")
    _start(nodes, proxy, case)
    assert nodes.enc.call("writes_held", 20) >= 1
    nodes.lang.call("hold_allocs")  # round 0 is granted: only round 1 will wait
    nodes.enc.call("release_writes")
    _await_states(nodes, case, ["WAIT_RESUME"], ["ALLOCATING"])


def quarantined_draining(nodes: Nodes, proxy: FaultProxy, case: Case) -> None:
    """receiver gave up (chunk_timeout) while the write is queued: QUARANTINED where the
    engine cannot fence (nixl, mooncake), already fenced where it can (tcp); sender DRAINING."""
    nodes.enc.call("hold_writes")
    _start(nodes, proxy, case)
    assert nodes.enc.call("writes_held", 20) >= 1
    _await_states(nodes, case, ["DRAINING"], None)
    if _one_sided(nodes.transport):
        _await_states(nodes, case, None, ["QUARANTINED", "EXPIRING"])


#: scenario -> (setup, tokens, whether the receiver holds a granted allocation at the fault)
SCENARIOS: dict[str, tuple[Callable[[Nodes, FaultProxy, Case], None], int, bool]] = {
    "alloc-wait_init": (alloc_wait_init, SMALL, False),
    "wait_chunk-wait_data": (chunk_wait_data, SMALL, True),
    "wait_chunk-staging": (chunk_staging, SMALL, True),
    "wait_chunk-writing": (chunk_writing, SMALL, True),
    "alloc_resume-wait_resume": (resume_wait_resume, LARGE, False),
    "quarantined-draining": (quarantined_draining, SMALL, True),
}


def _open_everything(node: NodeProc) -> None:
    node.call("release_writes")
    node.call("release_allocs")


# ------------------------------------------------------------------------------ the matrix


def _in_subset(nodes: Nodes, scenario: str, fault: str) -> bool:
    """Each scenario under one fault per placement, a different one on the other placement:
    every scenario and every fault are covered (each fault twice per placement)."""
    shift = 1 if nodes.hosts is not None else 0
    return FAULTS.index(fault) == (list(SCENARIOS).index(scenario) + shift) % len(FAULTS)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fault_in_every_state(nodes: Nodes, scenario: str, fault: str) -> None:
    if nodes.transport in SUBSET and not _in_subset(nodes, scenario, fault):
        pytest.skip(
            f"{nodes.transport} runs a representative subset of the matrix (time budget); "
            "EMTRANSFER_FULL_FAULT_MATRIX=1 runs every case"
        )
    setup, n, granted = SCENARIOS[scenario]
    enc, enc2, lang = nodes.enc, nodes.enc2, nodes.lang
    case = Case(f"{scenario}-{fault}-{next(_rids)}", n)
    proxy = nodes.proxy()
    stopped: NodeProc | None = None
    try:
        lang.call("hold", POOL - FREE)
        setup(nodes, proxy, case)
        t0 = time.monotonic()
        if fault == "stall_enc":
            enc.pause()
            stopped = enc
        elif fault == "stall_lang":
            lang.pause()
            stopped = lang
        else:
            proxy.blackhole()

        # 1. the survivors end their requests with a typed error within the deadline
        if fault != "stall_lang" and case.recv is not None:
            kind, got, _ = _outcome(lang, case.recv, BOUND + 10)
            took = time.monotonic() - t0
            assert kind == "error", f"receiver completed across the fault: {got}"
            assert took < BOUND, f"receiver took {took:.1f}s to fail ({got})"
            case.recv = None
            if granted and _one_sided(nodes.transport):
                # nothing proves that no write of the silent sender is on its way: the grant
                # stays quarantined (tcp fences it, and frees at once)
                h = lang.call("health")
                assert h["pool"]["blocks_quarantined"] == FREE, h
        if fault != "stall_enc":
            if case.send is not None:
                kind, got, _ = _outcome(enc, case.send, BOUND + 10)
                took = time.monotonic() - t0
                assert kind == "error", f"sender completed across the fault: {got}"
                assert took < BOUND, f"sender took {took:.1f}s to fail ({got})"
                case.send = None
            else:  # an Init-first session nobody sends into: it must end by itself
                enc.call("ended", case.rid, BOUND, timeout=BOUND + 10)

        # 2. wake the language node (the canary needs it); its own request ends typed
        if stopped is lang:
            lang.resume()
            stopped = None
            if case.recv is not None:
                kind, got, _ = _outcome(lang, case.recv, BOUND + 10)
                assert kind == "error" or got["ok"], got  # never a wrong payload as success
                case.recv = None
        lang.call("release_allocs")

        # 3. the quarantine ends (by proof or expiry) while the stalled encoder still holds
        # its queued writes, then the canary leases the very same blocks
        _settled(lang, held=POOL - FREE)
        canary = f"canary-{case.rid}"
        c = lang.start("lease_open", canary, enc2.address, SMALL, 2, SMALL)
        cs = enc2.start("send", canary, SMALL, 2, None)
        got = lang.wait(c, timeout=30)
        enc2.wait(cs, timeout=30)
        assert got["ok"] and got["zero_copy"], got

        # 4. the encoder wakes up and lets its held writes go: none may land in the canary
        if stopped is enc:
            enc.resume()
            stopped = None
        _open_everything(enc)
        if case.send is not None:
            kind, got, _ = _outcome(enc, case.send, BOUND + 10)
            assert kind == "error", f"a stalled sender completed into a dead grant: {got}"
        enc.call("ended", case.rid, BOUND, timeout=BOUND + 10)
        assert lang.call("lease_check", canary), "a stale write landed in the canary's blocks"
        lang.call("lease_close", canary)
    finally:
        for p in (enc, lang):
            if p.proc.is_alive():
                p.resume()
        proxy.close()
        # a failed case must not leave its pause points to the next one
        lang.call("release")
        _open_everything(lang)
        _open_everything(enc)
    _settled(lang)
    _settled(enc)
    _settled(enc2)
