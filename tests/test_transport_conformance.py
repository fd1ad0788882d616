"""One conformance suite for every data-plane transport that can run here, each driven
between two OS processes (``transport_harness``): contiguous, scattered and partial-block
descriptor lists, concurrent writes, the whole pool at once, refusals, and the receiver-side
fence (``discard``): a write under a discarded tag lands nowhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import netns
import pytest
from transport_harness import BLOCK_SIZE, enforce, fill_random, link, recv, run_pair

from emtransfer.allocator import Allocation
from emtransfer.buffers import WriteOp


def available_transports() -> list[Any]:
    params: list[Any] = []
    for name in ("tcp", "nixl", "torch", "mooncake"):
        reason = _unavailable(name)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


TWO_HOSTS = "two-hosts"


def placed_transports() -> list[Any]:
    """Every transport in one host (loopback), and the network ones (tcp, nixl with UCX over
    TCP, mooncake over TCP) also between two hosts: network namespaces joined by a veth pair."""
    params = [pytest.param(p.values[0], "", marks=p.marks, id=p.id) for p in available_transports()]
    for name in ("tcp", "nixl", "mooncake"):
        reason = _unavailable(name) or netns.unavailable()
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, TWO_HOSTS, marks=marks, id=f"{name}-{TWO_HOSTS}"))
    return params


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[netns.TwoHosts]:
    hosts = netns.TwoHosts()
    yield hosts
    hosts.close()


def _hosts(request: pytest.FixtureRequest, where: str) -> netns.TwoHosts | None:
    return request.getfixturevalue("two_hosts") if where == TWO_HOSTS else None


def _unavailable(name: str) -> str | None:
    from emtransfer.transport import transport_unavailable

    return transport_unavailable(name)


def _alloc(blocks: list[int]) -> Allocation:
    return Allocation("r", tuple(blocks), BLOCK_SIZE, 0)


def _cases(registry: Any) -> list[list[WriteOp]]:
    """Descriptor lists as the runtime builds them: runs between two allocations."""
    cases = []
    # contiguous on both sides
    cases.append(_alloc(list(range(0, 16))).runs_to(_alloc(list(range(32, 48))), 256))
    # the design note's scrambled lists, both directions
    scrambled = [15, 16, 17, 18, 19, 14, 13, 12, 11, 10, 4, 3, 2, 1, 0]
    cases.append(_alloc(list(range(20, 35))).runs_to(_alloc(scrambled), 15 * BLOCK_SIZE))
    cases.append(_alloc([9, 3, 4, 5, 0]).runs_to(_alloc([40, 41, 50, 7, 8]), 5 * BLOCK_SIZE - 3))
    # a partial block at an offset inside the destination allocation
    cases.append(_alloc([60, 61]).runs_to(_alloc([1, 63]), 21, dst_start=5))
    # the whole pool, reversed block order on the destination
    n = registry.num_blocks
    cases.append(_alloc(list(range(n))).runs_to(_alloc(list(reversed(range(n)))), n * BLOCK_SIZE))
    return [registry.write_ops(runs) for runs in cases]


def _expected(registry: Any, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in registry.layouts:
        n = registry.byte_view(name).numel()
        out[name] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return out


def _nbytes(ops: list[WriteOp]) -> int:
    return sum(op.nbytes for op in ops)


def _raw(ops: list[WriteOp]) -> list[tuple[str, int, int, int]]:
    return [(o.field, o.src_offset, o.dst_offset, o.nbytes) for o in ops]


def _fences(transport: Any) -> bool:
    """Whether the transport declares that ``discard`` fences a tag (then it is checked)."""
    return bool(transport.GUARANTEES.fences_tag)


NOT_DECLARED = "not declared"


async def scenario_writes(role: str, transport: Any, registry: Any, conn: Any) -> None:
    from emtransfer.transport import GrantExpired, TransportError

    await link(transport, conn)
    cases = _cases(registry)
    if role == "sender":
        for i, ops in enumerate(cases):
            fill_random(registry, seed=i)
            await transport.write("peer", ops, tag=f"case{i}")
            conn.send(("check", i, f"case{i}", _raw(ops)))
            assert (await recv(conn))[0] == "checked"
        # 16 concurrent writes to disjoint destinations, one tag each
        fill_random(registry, seed=99)
        batches = [_alloc([k]).runs_to(_alloc([63 - k]), BLOCK_SIZE) for k in range(16)]
        ops_list = [registry.write_ops(r) for r in batches]
        await asyncio.gather(
            *(transport.write("peer", ops, tag=f"many{k}") for k, ops in enumerate(ops_list))
        )
        for k, ops in enumerate(ops_list):
            conn.send(("check", 99, f"many{k}", _raw(ops)))
            assert (await recv(conn))[0] == "checked"
        # the fence: a write under a tag the receiver discarded first, then one under a fresh tag
        if _fences(transport):
            fill_random(registry, seed=77)
            dropped = registry.write_ops(_alloc([1, 2, 3]).runs_to(_alloc([10, 11, 12]), 48))
            fresh = registry.write_ops(_alloc([4, 5]).runs_to(_alloc([20, 21]), 32))
            conn.send(("discard", "dropped"))
            assert (await recv(conn))[0] == "discarded"
            await transport.write("peer", dropped, tag="dropped")
            await transport.write("peer", fresh, tag="fresh")
            conn.send(("check-discard", 77, _raw(dropped), _raw(fresh)))
            assert (await recv(conn))[0] == "checked"
        errors: list[str] = []
        # a grant past its deadline: never posted, on every transport
        try:
            await transport.write("peer", cases[0], tag="late", deadline=time.monotonic() - 1)
            errors.append("a write past its grant's deadline was posted")
        except GrantExpired:
            pass
        # remote completion: once write() returned, the bytes are in the peer's pool
        if transport.GUARANTEES.remote_completion:
            fill_random(registry, seed=55)
            now = registry.write_ops(_alloc([30]).runs_to(_alloc([40]), BLOCK_SIZE))
            await transport.write("peer", now, tag="now")
            conn.send(("check-now", 55, _raw(now)))
            assert (await recv(conn))[0] == "checked"
        # refusals: past the end of the peer's pool, an unknown peer, a removed peer
        pool_bytes = registry.byte_view("embeddings").numel()
        bad = [WriteOp("embeddings", 0, pool_bytes - 8, 16)]
        for peer, ops in (("peer", bad), ("nobody", cases[0])):
            try:
                await transport.write(peer, ops, tag="bad")
                errors.append(f"no error for {peer}")
            except TransportError:
                pass
        # the receiver removes us: with remove_stops_inbound, nothing we write lands any more
        if transport.GUARANTEES.remove_stops_inbound:
            conn.send(("remove-me",))
            assert (await recv(conn))[0] == "removed"
            fill_random(registry, seed=66)
            gone = registry.write_ops(_alloc([50]).runs_to(_alloc([51]), BLOCK_SIZE))
            try:
                await asyncio.wait_for(transport.write("peer", gone, tag="gone"), 30)
            except (TransportError, TimeoutError):
                pass
            conn.send(("check-removed", _raw(gone)))
            assert (await recv(conn))[0] == "checked"
        conn.send(("done-writing",))
        await recv(conn)  # receiver confirms it is still healthy
        await transport.remove_peer("peer")
        try:
            await transport.write("peer", cases[0], tag="after-remove")
            errors.append("write after remove_peer succeeded")
        except TransportError:
            pass
        await transport.close()
        conn.send(("ok", errors))
    else:
        checked, fence = 0, "not run" if _fences(transport) else NOT_DECLARED
        g = transport.GUARANTEES
        remote = "not run" if g.remote_completion else NOT_DECLARED
        removal = "not run" if g.remove_stops_inbound else NOT_DECLARED
        snapshot: dict[str, Any] = {}
        while True:
            msg = await recv(conn)
            if msg[0] == "done-writing":
                break
            if msg[0] == "discard":
                await transport.discard("peer", msg[1])
                snapshot = {n: registry.byte_view(n).clone() for n in registry.layouts}
                conn.send(("discarded",))
                continue
            if msg[0] == "check-discard":
                fence = await _check_discard(transport, registry, snapshot, *msg[1:])
                conn.send(("checked",))
                continue
            if msg[0] == "check-now":  # no wait_landed: the write's completion is the proof
                want = _expected(registry, msg[1])
                remote = "ok"
                for o in [WriteOp(*r) for r in msg[2]]:
                    got = registry.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes]
                    if not bool(
                        (got == want[o.field][o.src_offset : o.src_offset + o.nbytes]).all()
                    ):
                        remote = f"a completed write is not in the pool yet: {o}"
                conn.send(("checked",))
                continue
            if msg[0] == "remove-me":
                await transport.remove_peer("peer")
                snapshot = {n: registry.byte_view(n).clone() for n in registry.layouts}
                conn.send(("removed",))
                continue
            if msg[0] == "check-removed":
                removal = "ok"
                for o in [WriteOp(*r) for r in msg[1]]:
                    got = registry.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes]
                    was = snapshot[o.field][o.dst_offset : o.dst_offset + o.nbytes]
                    if not bool((got == was).all()):
                        removal = f"a removed peer's write landed: {o}"
                conn.send(("checked",))
                continue
            _, seed, tag, raw = msg
            ops = [WriteOp(*o) for o in raw]
            await asyncio.wait_for(transport.wait_landed("peer", tag, _nbytes(ops)), 30)
            want = _expected(registry, seed)
            for op in ops:
                got = registry.byte_view(op.field)[op.dst_offset : op.dst_offset + op.nbytes]
                exp = want[op.field][op.src_offset : op.src_offset + op.nbytes]
                assert bool((got == exp).all()), f"{tag}: bytes differ for {op}"
            checked += 1
            conn.send(("checked",))
        conn.send(("alive",))
        await transport.close()
        conn.send(("ok", (checked, fence, remote, removal)))


async def _check_discard(
    transport: Any, registry: Any, snapshot: dict[str, Any], seed: int, dropped: Any, fresh: Any
) -> str:
    """``fresh`` was written after ``dropped``: once it landed, ``dropped`` was handled too. Its
    destination must be as it was when ``discard`` returned; ``fresh`` must have landed."""
    fresh_ops = [WriteOp(*o) for o in fresh]
    await asyncio.wait_for(transport.wait_landed("peer", "fresh", _nbytes(fresh_ops)), 30)
    want = _expected(registry, seed)
    for o in [WriteOp(*r) for r in dropped]:
        got = registry.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes]
        if not bool((got == snapshot[o.field][o.dst_offset : o.dst_offset + o.nbytes]).all()):
            return f"bytes of the discarded tag landed: {o}"
    for o in fresh_ops:
        got = registry.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes]
        if not bool((got == want[o.field][o.src_offset : o.src_offset + o.nbytes]).all()):
            return f"the write after the discarded one did not land: {o}"
    return "ok"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "where"), placed_transports())
def test_transport_conformance(request: pytest.FixtureRequest, name: str, where: str) -> None:
    from emtransfer.transport import transport_class

    hosts = _hosts(request, where)
    sender, (checked, fence, remote, removal) = run_pair(
        name, scenario_writes, timeout=100, hosts=hosts
    )
    assert sender == [], sender
    assert checked == 5 + 16
    g = transport_class(name).GUARANTEES  # every declared guarantee was checked, and held
    assert fence == ("ok" if g.fences_tag else NOT_DECLARED), fence
    assert remote == ("ok" if g.remote_completion else NOT_DECLARED), remote
    assert removal == ("ok" if g.remove_stops_inbound else NOT_DECLARED), removal


async def scenario_authorization(role: str, transport: Any, registry: Any, conn: Any) -> None:
    """The receiver grants block 40 under "ok"; the sender writes one write of two ops under
    "ok", the first into block 40, the second into block 41. Where ``authorizes_writes`` is
    declared, nothing lands in block 41 (the engine refuses the op, or the whole write, and the
    tag's waiter fails, which is the barrier); a write under a tag never granted lands nowhere."""
    from emtransfer.transport import TransportError

    enforce(transport)
    await link(transport, conn)
    inside = registry.write_ops(_alloc([40]).runs_to(_alloc([40]), BLOCK_SIZE))
    ops = inside + registry.write_ops(_alloc([41]).runs_to(_alloc([41]), BLOCK_SIZE))
    if role == "sender":
        assert (await recv(conn))[0] == "granted"
        for seed, tag in ((5, "ok"), (6, "never")):
            fill_random(registry, seed=seed)
            try:
                await asyncio.wait_for(transport.write("peer", ops, tag=tag), 30)
            except (TransportError, TimeoutError):
                pass  # refused at the source, or the connection was dropped
            conn.send(("written",))
            assert (await recv(conn))[0] == "checked"
        await transport.close()
        conn.send(("ok", None))
        return
    transport.grant("peer", "ok", [40])
    conn.send(("granted",))
    outside: list[str] = []
    for tag in ("ok", "never"):
        before = {n: registry.byte_view(n).clone() for n in registry.layouts}
        assert (await recv(conn))[0] == "written"
        try:  # lands whole where nothing is enforced; the waiter fails where it is
            await asyncio.wait_for(transport.wait_landed("peer", tag, _nbytes(ops)), 4)
        except (TransportError, TimeoutError):
            pass
        for o in ops:
            if tag == "ok" and o in inside:
                continue  # granted: it may land
            got = registry.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes]
            if not bool((got == before[o.field][o.dst_offset : o.dst_offset + o.nbytes]).all()):
                outside.append(f"{tag}: {o}")
        conn.send(("checked",))
    await transport.close()
    conn.send(("ok", outside))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "where"), placed_transports())
def test_writes_outside_grants_land_nowhere_where_declared(
    request: pytest.FixtureRequest, name: str, where: str
) -> None:
    from emtransfer.transport import transport_class

    _, outside = run_pair(name, scenario_authorization, timeout=100, hosts=_hosts(request, where))
    if transport_class(name).GUARANTEES.authorizes_writes:
        assert outside == [], f"bytes outside the receiver's grants landed: {outside}"
    else:  # the engine declares it cannot stop them (nixl, mooncake: one-sided): and they land
        assert outside, "an engine that declares no authorization refused the writes"
