"""The torch.distributed transport between two processes (gloo, CPU pools): a lying sender is
refused without a byte outside (or inside) the pool, concurrent writes in both directions never
interleave, close() stays bounded when the peer closed first, desynced or never linked up, a
removed peer can be linked again, and discard() fences a tag: before its write arrives, while its
receive into the pool is posted (discard waits), and when that receive never ends (it raises).

Every scenario builds its own :class:`TorchTransport` (short grace) on the harness's registry;
the harness provides the processes, the torchrun environment and the pipe."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from transport_harness import recv, run_pair, trust_all

from emtransfer.allocator import Run
from emtransfer.buffers import WriteOp
from emtransfer.transport import transport_unavailable

_why = transport_unavailable("torch")
pytestmark = pytest.mark.skipif(_why is not None, reason=f"torch transport unavailable: {_why}")
GRACE = 2.0


def _transport(registry: Any) -> Any:
    from emtransfer.transport.torch import TorchTransport

    return trust_all(TorchTransport(registry, grace=GRACE, write_timeout=20.0, init_timeout=30.0))


async def _link(transport: Any, conn: Any, *, add: bool = True, lie: bool = False) -> Any:
    """start, swap metadata, add the peer (``lie``: claim its pools are 1 MiB larger); return
    the peer's metadata."""
    await transport.start()
    conn.send(("meta", transport.metadata()))
    _, meta = await recv(conn)
    if lie:
        doc = json.loads(meta)
        doc["pools"] = {k: v + (1 << 20) for k, v in doc["pools"].items()}
        meta = json.dumps(doc).encode()
    if add:
        await transport.add_peer("peer", meta)
    return json.loads(meta)


def _pattern(registry: Any, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in registry.layouts:
        view = registry.byte_view(name)
        out[name] = torch.randint(0, 256, (view.numel(),), dtype=torch.uint8, generator=g)
        view.copy_(out[name])
    return out


def _link_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("emtransfer-torch")]


def _scratch_registry() -> Any:
    from transport_harness import make_registry

    return make_registry()


def _unchanged(registry: Any, want: dict[str, Any]) -> bool:
    return all(bool((registry.byte_view(n) == t).all()) for n, t in want.items())


# -- a sender whose idea of our pool is wrong ---------------------------------------------------
async def scenario_lying_sender(role: str, _: Any, registry: Any, conn: Any) -> Any:
    from emtransfer.transport import TransportError

    transport = _transport(registry)
    want = _pattern(registry, seed=7)  # before linking: nothing can have landed yet
    await _link(transport, conn, lie=role == "sender")
    pool = registry.byte_view("embeddings").numel()
    if role == "sender":
        # passes the sender's check (it believes the pool is larger), runs 8 bytes past the end
        await transport.write("peer", [WriteOp("embeddings", 0, pool - 8, 16)], tag="evil")
        # a valid write afterwards: the link is broken, so it is drained, not landed
        await transport.write("peer", [WriteOp("embeddings", 0, 0, 4096)], tag="after")
        conn.send(("sent",))
        await recv(conn)
        await transport.close()
        conn.send(("ok", "sender done"))  # not None: the harness reads None as "no result yet"
        return
    refused = False
    try:
        await asyncio.wait_for(transport.wait_landed("peer", "evil", 16), 20)
    except TransportError:
        refused = True
    await recv(conn)  # both writes completed on the sender: both were drained by now
    intact = _unchanged(registry, want)
    try:
        await transport.wait_landed("peer", "after", 4096)
        landed_after = True
    except TransportError:
        landed_after = False
    conn.send(("checked",))
    await transport.close()
    conn.send(("ok", (refused, intact, landed_after)))


@pytest.mark.timeout(90)
def test_write_outside_the_pool_is_refused() -> None:
    _, receiver = run_pair("torch", scenario_lying_sender, timeout=80)
    refused, intact, landed_after = receiver
    assert refused, "the write past the pool was not refused"
    assert intact, "the receiver's pools changed"
    assert not landed_after, "a write from a broken peer landed"


# -- a garbage header, and close() afterwards ---------------------------------------------------
async def scenario_garbage(role: str, _: Any, registry: Any, conn: Any) -> Any:
    import torch
    import torch.distributed as dist

    from emtransfer.transport import TransportError

    transport = _transport(registry)
    peer = await _link(transport, conn)
    if role == "sender":  # a header announcing 2**40 ops, straight onto the peer's header tag
        junk = torch.tensor([0x454D54, 1, 1 << 40, 0], dtype=torch.int64)
        work = dist.isend(junk, dst=1, tag=peer["tag"])
        assert work is not None
        work.wait()
    else:
        try:
            await asyncio.wait_for(transport.wait_landed("peer", "x", 1), 20)
            conn.send(("error", "a garbage header did not break the link"))
            return
        except TransportError:
            pass
    relink = "not tried"
    if role == "receiver":  # its header receives are still posted: they would take the next
        await transport.remove_peer("peer")  # link's first messages, so it cannot be relinked
        try:
            await transport.add_peer("again", json.dumps(peer).encode())
            relink = "linked again"
        except TransportError as exc:
            relink = str(exc)
    t0 = time.monotonic()
    await transport.close()  # the receiver stopped following the sender: its STOP goes nowhere
    conn.send(("ok", (time.monotonic() - t0, relink)))


@pytest.mark.timeout(90)
def test_garbage_header_breaks_the_link_and_close_is_bounded() -> None:
    (took_s, _), (took_r, relink) = run_pair("torch", scenario_garbage, timeout=80)
    assert took_s < GRACE + 5, took_s
    assert took_r < GRACE + 5, took_r
    assert "cannot be linked again" in relink, relink


# -- many concurrent writes, both directions ----------------------------------------------------
def _writes(registry: Any, rank: int) -> list[list[WriteOp]]:
    """64 writes from ``rank``: each 2 runs of 4 tokens, from scattered slots of the lower half
    of its pool into scattered, disjoint slots of the upper half of the peer's pool."""
    import torch

    half = registry.num_slots // 2
    g = torch.Generator().manual_seed(rank)
    src, dst = (torch.randperm(half // 4, generator=g).tolist() for _ in range(2))
    return [
        registry.write_ops([Run(src[i] * 4, half + dst[i] * 4, 4) for i in (2 * k, 2 * k + 1)])
        for k in range(half // 8)
    ]


async def scenario_concurrent(
    role: str, _: Any, registry: Any, conn: Any, *, nowait: bool = False
) -> Any:
    me, other = (0, 1) if role == "sender" else (1, 0)
    _pattern(registry, seed=100 + me)  # before linking: the peer writes once it linked
    transport = _transport(registry)
    await _link(transport, conn)
    expect = {n: registry.byte_view(n).clone() for n in registry.layouts}
    theirs = _pattern(_scratch_registry(), seed=100 + other)
    incoming = _writes(registry, other)
    for ops in incoming:
        for o in ops:
            src = theirs[o.field][o.src_offset : o.src_offset + o.nbytes]
            expect[o.field][o.dst_offset : o.dst_offset + o.nbytes] = src
    mine = _writes(registry, me)
    at_once = 0
    if nowait:  # every write posted on this turn, far more than the peer keeps receives for
        pending = [transport.write_nowait("peer", ops, tag=f"w{i}") for i, ops in enumerate(mine)]
        at_once = sum(p is None for p in pending)
        writes = [p for p in pending if p is not None]
    else:
        writes = [transport.write("peer", ops, tag=f"w{i}") for i, ops in enumerate(mine)]
    await asyncio.gather(
        *writes,
        *(
            asyncio.wait_for(transport.wait_landed("peer", f"w{i}", sum(o.nbytes for o in ops)), 30)
            for i, ops in enumerate(incoming)
        ),
    )
    bad = sum(int((registry.byte_view(n) != expect[n]).sum()) for n in registry.layouts)
    conn.send(("done",))
    await recv(conn)  # the peer checked too: no more writes in flight either way
    await transport.close()
    conn.send(("ok", (len(incoming), bad, _link_threads(), at_once)))


async def scenario_concurrent_write(role: str, _: Any, registry: Any, conn: Any) -> Any:
    await scenario_concurrent(role, _, registry, conn, nowait=False)


async def scenario_concurrent_nowait(role: str, _: Any, registry: Any, conn: Any) -> Any:
    await scenario_concurrent(role, _, registry, conn, nowait=True)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "scenario", [scenario_concurrent_write, scenario_concurrent_nowait], ids=["write", "nowait"]
)
def test_concurrent_writes_both_ways_do_not_interleave(scenario: Any) -> None:
    for count, bad, threads, at_once in run_pair("torch", scenario, timeout=80):
        assert count == 64, count
        assert bad == 0, f"{bad} bytes differ"
        assert not threads, threads
        if scenario is scenario_concurrent_nowait:
            assert at_once == 64, f"{at_once} of 64 small writes posted at once"


# -- a write posted at once whose send never ends --------------------------------------------
async def scenario_nowait_stuck(role: str, _: Any, registry: Any, conn: Any) -> Any:
    """The receiver never adds the sender, so nothing receives: the sender's write posted at
    once (done for its caller) never ends, and the link breaks write_timeout after its post."""
    from emtransfer.transport import TransportError
    from emtransfer.transport.torch import TorchTransport

    transport = trust_all(TorchTransport(registry, grace=GRACE, write_timeout=2.0))
    await _link(transport, conn, add=role == "sender")
    result: Any = None
    if role == "sender":
        t0 = time.monotonic()
        posted = transport.write_nowait("peer", [WriteOp("embeddings", 0, 0, 4096)], tag="w")
        try:  # a wait of ours fails as soon as the link breaks
            await asyncio.wait_for(transport.wait_landed("peer", "never", 1), 20)
            broke = None
        except TransportError:
            broke = time.monotonic() - t0
        try:
            transport.write_nowait("peer", [WriteOp("embeddings", 0, 0, 64)], tag="after")
            refused = False
        except TransportError:
            refused = True
        result = (posted is None, broke, refused)
    conn.send(("done",))
    await recv(conn)
    await transport.close()
    conn.send(("ok", result))


@pytest.mark.timeout(90)
def test_a_write_posted_at_once_that_never_ends_breaks_the_link() -> None:
    (posted, broke, refused), _ = run_pair("torch", scenario_nowait_stuck, timeout=80)
    assert posted, "the small write was not posted at once"
    assert broke is not None and 2.0 <= broke < 2.0 + 5, broke
    assert refused, "a write after the link broke was posted"


# -- close() with a waiter pending, and with a peer that never linked ---------------------------
async def scenario_close_pending(role: str, _: Any, registry: Any, conn: Any) -> Any:
    """The sender closes while the receiver waits for data: the waiter fails at once, and the
    STOP exchange ends the sender's threads before the receiver closes at all."""
    from emtransfer.transport import TransportError

    transport = _transport(registry)
    await _link(transport, conn)
    if role == "sender":
        await recv(conn)
        t0 = time.monotonic()
        await transport.close()
        result = (time.monotonic() - t0, _link_threads())
        conn.send(("closed",))
        conn.send(("ok", result))
        return
    waiter = asyncio.ensure_future(transport.wait_landed("peer", "never", 1))
    conn.send(("waiting",))
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(waiter, 20)
        conn.send(("error", "wait_landed returned without data"))
        return
    except TransportError:
        took = time.monotonic() - t0
    await recv(conn)
    await transport.close()
    conn.send(("ok", (took, _link_threads())))


async def scenario_close_unlinked(role: str, _: Any, registry: Any, conn: Any) -> Any:
    transport = _transport(registry)
    await _link(transport, conn, add=role == "sender")  # the receiver never adds the sender
    t0 = time.monotonic()
    await transport.close()
    conn.send(("ok", (time.monotonic() - t0, None)))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scenario", [scenario_close_pending, scenario_close_unlinked])
def test_close_does_not_hang(scenario: Any) -> None:
    for took, threads in run_pair("torch", scenario, timeout=80):
        assert took < GRACE + 5, took
        assert not threads, f"link threads left after a clean close: {threads}"


# -- remove_peer, then link the same ranks again -------------------------------------------------
async def scenario_relink(role: str, _: Any, registry: Any, conn: Any) -> Any:
    from emtransfer.transport import TransportError

    transport = _transport(registry)
    meta = json.dumps(await _link(transport, conn)).encode()
    await transport.remove_peer("peer")
    try:
        await transport.write("peer", [WriteOp("embeddings", 0, 0, 64)], tag="gone")
        conn.send(("error", "write to a removed peer succeeded"))
        return
    except TransportError:
        pass
    _pattern(registry, seed=5 if role == "sender" else 6)
    before = registry.byte_view("embeddings").clone()
    conn.send(("removed",))
    await recv(conn)  # both ends removed: both links are torn down
    await transport.add_peer("peer2", meta)
    op = WriteOp("embeddings", 0, 4096, 8192)
    if role == "sender":
        await transport.write("peer2", [op], tag="again")
        ok = True
    else:
        await asyncio.wait_for(transport.wait_landed("peer2", "again", op.nbytes), 20)
        before[4096 : 4096 + 8192] = _pattern(_scratch_registry(), seed=5)["embeddings"][:8192]
        ok = bool((registry.byte_view("embeddings") == before).all())
    conn.send(("checked",))
    await recv(conn)
    await transport.close()
    conn.send(("ok", (ok, _link_threads())))


@pytest.mark.timeout(90)
def test_relink_after_remove_peer() -> None:
    for ok, threads in run_pair("torch", scenario_relink, timeout=80):
        assert ok, "the write after re-linking did not land intact"
        assert not threads, threads


# -- framing: one message per small write; frame 2 and frame 1 for older peers -----------------
#: (ops, the sender's view of the receiver's header receive): WRITE_ALL (everything in one
#: message), WRITE_HEAD (a header that fits, the payload after it), a header too long for the
#: receive (split into two writes under the tag; frame 1 for a frame-2 peer)
FRAMED = [
    ([WriteOp("embeddings", 0, 0, 8192), WriteOp("embeddings", 1 << 17, 1 << 18, 100)], None),
    ([WriteOp("embeddings", 8192, 16384, 4096)], 64),
    (
        [
            WriteOp("embeddings", 1 << 15, 1 << 16, 512),
            WriteOp("embeddings", 1 << 16, 1 << 17, 256),
        ],
        64,
    ),
]
#: per framing the peer speaks: the parts of each FRAMED write, as (messages, headers, packed)
KINDS = {
    3: [[(3, 1, True)], [(2, 1, False)], [(2, 1, False), (2, 1, False)]],
    2: [[(3, 1, True)], [(2, 1, False)], [(4, 2, False)]],
    1: [[(2 + len(ops), 2, False)] for ops, _ in FRAMED],
}


async def _framing(role: str, peer_frame: int, registry: Any, conn: Any) -> Any:
    """Each framing lands intact. ``peer_frame`` < 3: both ends read the other's metadata as
    a node of an older version publishes it (frame 2: no ``ring``; frame 1: no frame fields
    at all) and use that framing, both ways."""
    from emtransfer.transport import torch as tt

    # the pattern goes in before the link exists: the sender may write as soon as it added us
    _pattern(registry, seed=40 if role == "sender" else 41)
    expect = registry.byte_view("embeddings").clone()
    transport = _transport(registry)
    await transport.start()
    conn.send(("meta", transport.metadata()))
    _, meta = await recv(conn)
    doc = json.loads(meta)
    if peer_frame < 3:
        doc.pop("ring")
        doc["frame"] = peer_frame
    if peer_frame < 2:
        doc.pop("frame"), doc.pop("recv_max")
    await transport.add_peer("peer", json.dumps(doc).encode())
    link = transport._peers["peer"]
    framing = (link.frame, link.recv_max, link.ring)
    if role == "sender":
        kinds = []
        for i, (ops, recv_max) in enumerate(FRAMED):
            if recv_max is not None and peer_frame > 1:
                link.recv_max = recv_max
            parts = transport._frames(link, ops, f"f{i}")
            kinds.append([(len(msgs), nhead, packed) for msgs, nhead, packed in parts])
            await transport.write("peer", ops, tag=f"f{i}")
        ok = kinds == KINDS[peer_frame]
    else:
        theirs = _pattern(_scratch_registry(), seed=40)["embeddings"]
        for i, (ops, _) in enumerate(FRAMED):
            await asyncio.wait_for(
                transport.wait_landed("peer", f"f{i}", sum(o.nbytes for o in ops)), 20
            )
            for o in ops:
                expect[o.dst_offset : o.dst_offset + o.nbytes] = theirs[
                    o.src_offset : o.src_offset + o.nbytes
                ]
        ok = torch_equal(registry.byte_view("embeddings"), expect)
    conn.send(("checked",))
    await recv(conn)
    await transport.close()
    want = {3: (3, tt._RECV_MAX, tt._RING), 2: (2, tt._RECV_MAX, 1), 1: (1, 0, 1)}
    conn.send(("ok", (ok, framing == want[peer_frame])))


async def scenario_framing(role: str, _: Any, registry: Any, conn: Any) -> Any:
    await _framing(role, 3, registry, conn)


async def scenario_framing_frame2(role: str, _: Any, registry: Any, conn: Any) -> Any:
    await _framing(role, 2, registry, conn)


async def scenario_framing_old_peer(role: str, _: Any, registry: Any, conn: Any) -> Any:
    await _framing(role, 1, registry, conn)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "scenario",
    [scenario_framing, scenario_framing_frame2, scenario_framing_old_peer],
    ids=["frame3", "frame2-peer", "frame1-peer"],
)
def test_framings_land_intact(scenario: Any) -> None:
    for ok, negotiated in run_pair("torch", scenario, timeout=80):
        assert negotiated, "the wrong framing was negotiated"
        assert ok, "a write did not land intact (or not in the framing expected)"


# -- discard: the receiver-side fence of an abandoned round --------------------------------------
SLOW = [WriteOp("embeddings", 0, 8192, 1 << 16)]  # the write under the tag that gets discarded
NEXT = [WriteOp("embeddings", 1 << 17, 1 << 18, 4096)]  # a later write under another tag


def _receiving(transport: Any, tag: str, timeout: float) -> bool:
    """Block until the link's receiver thread is receiving ``tag`` into the pool."""
    link = transport._peers["peer"]
    with transport._mu:
        return bool(transport._mu.wait_for(lambda: link.busy and link.current == tag, timeout))


async def _send_raw(transport: Any, peer: dict[str, Any], tag: str, *, payload: bool) -> None:
    """Send the header of a write of ``SLOW`` under ``tag`` (``payload``: its payload instead),
    straight onto the peer's tags: the transport's own encoding (a header with the payload
    after it), sent in two steps."""
    import torch.distributed as dist

    link = transport._peers["peer"]
    head, *srcs = transport._part(link, *transport._check(link, SLOW, tag), pack=False)[0]
    msgs, tg = (srcs, peer["tag"] + 1) if payload else ([head], peer["tag"])

    def send() -> None:
        for t in msgs:
            work = dist.isend(t, dst=peer["rank"], tag=tg)
            assert work is not None
            work.wait()

    await asyncio.to_thread(send)


def _region(registry: Any, op: WriteOp) -> Any:
    return registry.byte_view(op.field)[op.dst_offset : op.dst_offset + op.nbytes]


def _src(seed: int, op: WriteOp) -> Any:
    return _pattern(_scratch_registry(), seed)[op.field][op.src_offset : op.src_offset + op.nbytes]


async def _landed_next(transport: Any, registry: Any, before: Any, seed: int) -> bool:
    """``NEXT`` lands (so everything queued before it on the link was handled), and the pools
    equal ``before`` everywhere else."""
    from emtransfer.transport import TransportError

    await asyncio.wait_for(transport.wait_landed("peer", "next", NEXT[0].nbytes), 20)
    for name, snapshot in before.items():
        want = snapshot.clone()
        for op in NEXT:
            if op.field == name:
                want[op.dst_offset : op.dst_offset + op.nbytes] = _src(seed, op)
        if not torch_equal(registry.byte_view(name), want):
            return False
    try:  # a discarded tag never completes
        await transport.wait_landed("peer", "slow", 1)
        return False
    except TransportError:
        return True


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


async def scenario_discard_first(role: str, _: Any, registry: Any, conn: Any) -> Any:
    """The receiver discards a tag before any byte of it arrived: its write lands nowhere."""
    transport = _transport(registry)
    _pattern(registry, seed=20 if role == "sender" else 21)
    await _link(transport, conn)
    if role == "sender":
        await recv(conn)  # discarded
        await transport.write("peer", SLOW, tag="slow")
        await transport.write("peer", NEXT, tag="next")
        conn.send(("sent",))
        await recv(conn)
        await transport.close()
        conn.send(("ok", True))
        return
    await transport.discard("peer", "slow")
    before = {n: registry.byte_view(n).clone() for n in registry.layouts}
    conn.send(("discarded",))
    await recv(conn)  # sent
    ok = await _landed_next(transport, registry, before, seed=20)
    conn.send(("checked",))
    await transport.close()
    conn.send(("ok", ok))


async def scenario_discard_during_receive(role: str, _: Any, registry: Any, conn: Any) -> Any:
    """discard() while the receive of that tag is posted into the pool: it returns only once
    that receive ended; later writes of the tag are drained, writes of other tags land."""
    transport = _transport(registry)
    _pattern(registry, seed=30 if role == "sender" else 31)
    peer = await _link(transport, conn)
    if role == "sender":
        await _send_raw(transport, peer, "slow", payload=False)
        conn.send(("header-sent",))
        await recv(conn)  # go: the receiver's discard is waiting
        await _send_raw(transport, peer, "slow", payload=True)
        await transport.write("peer", SLOW, tag="slow")  # after discard: drained
        await transport.write("peer", NEXT, tag="next")
        conn.send(("sent",))
        await recv(conn)
        await transport.close()
        conn.send(("ok", (True, True, True)))
        return
    await recv(conn)  # header-sent
    receiving = await asyncio.to_thread(_receiving, transport, "slow", 20)
    task = asyncio.ensure_future(transport.discard("peer", "slow"))
    await asyncio.sleep(0)  # one step: discard registers its fence, then awaits it
    waited = receiving and not task.done() and len(transport._peers["peer"].fences) == 1
    conn.send(("go",))
    await asyncio.wait_for(task, 20)
    # the receive posted before discard() could not be cancelled: it completed before the return
    completed = torch_equal(_region(registry, SLOW[0]), _src(30, SLOW[0]))
    before = {n: registry.byte_view(n).clone() for n in registry.layouts}
    await recv(conn)  # sent
    ok = await _landed_next(transport, registry, before, seed=30)
    conn.send(("checked",))
    await transport.close()
    conn.send(("ok", (waited, completed, ok)))


async def scenario_discard_expires(role: str, _: Any, registry: Any, conn: Any) -> Any:
    """A receive of the discarded tag that does not end within the grace period: discard()
    raises after it (the bytes may still land) and the link is broken."""
    from emtransfer.transport import TransportError

    transport = _transport(registry)
    peer = await _link(transport, conn)
    if role == "sender":
        await _send_raw(transport, peer, "slow", payload=False)
        conn.send(("header-sent",))
        await recv(conn)  # expired
        await _send_raw(transport, peer, "slow", payload=True)  # lets the receiving thread go
        t0 = time.monotonic()
        await transport.close()
        conn.send(("ok", (True, True, time.monotonic() - t0)))
        return
    await recv(conn)  # header-sent
    receiving = await asyncio.to_thread(_receiving, transport, "slow", 20)
    t0 = time.monotonic()
    try:
        await transport.discard("peer", "slow")
        raised = False
    except TransportError:
        raised = 0.9 * GRACE <= time.monotonic() - t0 < GRACE + 5
    try:
        await transport.write("peer", NEXT, tag="next")
        broken = False
    except TransportError:
        broken = True
    conn.send(("expired",))
    t0 = time.monotonic()
    await transport.close()
    conn.send(("ok", (receiving and raised, broken, time.monotonic() - t0)))


@pytest.mark.timeout(90)
def test_write_of_a_discarded_tag_lands_nowhere() -> None:
    _, ok = run_pair("torch", scenario_discard_first, timeout=80)
    assert ok, "a discarded write landed, or the next write did not"


@pytest.mark.timeout(90)
def test_discard_waits_for_the_receive_in_progress() -> None:
    _, (waited, completed, ok) = run_pair("torch", scenario_discard_during_receive, timeout=80)
    assert waited, "discard() did not wait for the receive posted into the pool"
    assert completed, "discard() returned before the posted receive completed"
    assert ok, "bytes of the discarded tag landed after discard(), or the next write did not"


@pytest.mark.timeout(90)
def test_discard_that_cannot_fence_raises_and_breaks_the_link() -> None:
    for raised, broken, took in run_pair("torch", scenario_discard_expires, timeout=80):
        assert raised, "discard() did not raise after the grace period"
        assert broken, "the link still accepts writes"
        assert took < GRACE + 5, took
