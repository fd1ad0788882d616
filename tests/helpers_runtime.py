"""Shared helpers of the runtime tests (end to end, failures, bad input).

No sleeps as synchronisation: conditions are polled with :func:`wait_until`, which yields to
the loop (``asyncio.sleep(0)``) until the condition holds or a deadline passes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch

import emtransfer as et
from emtransfer.allocator import Allocation, BlockAllocator
from emtransfer.guarantees import Guarantees
from emtransfer.transport import LocalTransport

HIDDEN = 32
BLOCK = 16
MROPE = {"mrope_positions": {"shape": [3], "dtype": "int64"}}


def make_settings(**overrides: Any) -> et.Settings:
    """Small, fast settings: float32 embeddings of HIDDEN plus an int64 [3] side field."""
    base: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "dtype": "float32",
        "num_blocks": 64,
        "block_size": BLOCK,
        "default_blocks": 4,
        "fields": MROPE,
        "transport": "local",
        "abort_ack_timeout": 2.0,
    }
    base.update(overrides)
    return et.Settings(**base)


def make_payload(
    n: int, *, hidden: int = HIDDEN, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A payload whose every token is distinct (so a misplaced block is always noticed)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, hidden, generator=g).to(dtype)
    # make the first column the token index, offset by the seed: unique across requests
    emb[:, 0] = torch.arange(n, dtype=torch.float32).to(dtype) + seed * 100_000
    pos = torch.randint(-(2**40), 2**40, (n, 3), generator=g, dtype=torch.int64)
    return {"embeddings": emb, "mrope_positions": pos}


def assert_same_payload(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, t in want.items():
        g = got[name]
        assert g.shape == t.shape, (name, g.shape, t.shape)
        assert g.dtype == t.dtype, (name, g.dtype, t.dtype)
        assert torch.equal(g, t), f"field {name!r} differs"


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Yield to the loop until ``cond()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await asyncio.sleep(0)


def pool_clean(node: et.EncodeNode | et.LanguageNode) -> bool:
    a = node.allocator
    return (
        a.num_free == a.num_blocks
        and a.num_quarantined == 0
        and a.num_waiters == 0
        and not a.leak_report()
    )


def describe_pool(node: et.EncodeNode | et.LanguageNode) -> str:
    a = node.allocator
    return (
        f"{node.role}: free={a.num_free}/{a.num_blocks} quarantined={a.num_quarantined} "
        f"waiters={a.num_waiters} leaks={a.leak_report()}"
    )


def assert_pools_clean(*nodes: et.EncodeNode | et.LanguageNode) -> None:
    for node in nodes:
        assert pool_clean(node), describe_pool(node)


async def wait_pools_clean(*nodes: et.EncodeNode | et.LanguageNode, timeout: float = 5.0) -> None:
    """Quarantines are released by a round trip (AbortAck): wait for it, bounded."""
    try:
        await wait_until(lambda: all(pool_clean(n) for n in nodes), timeout, "pools to be full")
    except AssertionError:
        raise AssertionError("; ".join(describe_pool(n) for n in nodes)) from None


@asynccontextmanager
async def connected(
    enc_settings: et.Settings, lang_settings: et.Settings | None = None, *, check: bool = True
) -> AsyncIterator[tuple[et.EncodeNode, et.LanguageNode, et.Peer]]:
    """An encode and a language node, connected; both pools checked full at the end."""
    async with (
        et.EncodeNode(enc_settings) as enc,
        et.LanguageNode(lang_settings or enc_settings) as lang,
    ):
        peer = await lang.connect(enc.address)
        yield enc, lang, peer
        if check:
            await wait_pools_clean(enc, lang)
    if check:
        assert_pools_clean(enc, lang)


def scramble(allocator: BlockAllocator, order: Sequence[int] | None = None, seed: int = 0) -> None:
    """Make ``allocator`` hand out blocks in ``order`` (default: a random permutation), one
    block at a time, and take freed blocks back on top, as a plain LIFO free list would --
    a test hook: the real allocator keeps runs together, so a scrambled, non-contiguous
    allocation only comes from a fragmented pool. The hook replaces the instance's
    ``_take`` (placement) and wraps ``_give_back``, keeping the allocator's free runs exact."""
    n = allocator.num_blocks
    assert allocator.num_free == n, "scramble needs a full pool"
    if order is None:
        order = list(range(n))
        random.Random(seed).shuffle(order)
    assert sorted(order) == list(range(n))
    a: Any = allocator
    stack = list(reversed(order))  # pop() hands out order[0] first
    a._scripted = stack
    real_give_back = a._give_back

    def give_back(start: int, length: int) -> None:
        real_give_back(start, length)
        stack.extend(reversed(range(start, start + length)))

    def carve_block(b: int) -> None:
        start, length = next((s, k) for s, k in a._runs.items() if s <= b < s + k)
        a._del_run(start, length)
        if b > start:
            a._add_run(start, b - start)
        if b + 1 < start + length:
            a._add_run(b + 1, start + length - b - 1)

    def take(k: int, rid: str) -> Allocation:
        picked = [stack.pop() for _ in range(k)]
        for b in picked:
            carve_block(b)
        a._num_free -= k
        a.low_water = min(a.low_water, a._num_free)
        serial = next(a._serials)
        for b in picked:
            a._owner[b] = serial
        got = Allocation(rid, tuple(picked), a.block_size, serial)
        a._live[serial] = got
        return got

    a._take, a._give_back = take, give_back


def runs_of(blocks: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """``(start, length)`` of each stretch of consecutive ascending blocks, in list order."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def next_blocks(allocator: BlockAllocator, k: int) -> list[int]:
    """The next ``k`` blocks a scrambled allocator will hand out (without taking them)."""
    stack = getattr(allocator, "_scripted", None)
    assert stack is not None, "next_blocks needs a scrambled allocator"
    return list(reversed(stack))[:k]


def hold_all(allocator: BlockAllocator, rid: str = "hog") -> Allocation:
    """Take every free block (to exhaust the pool)."""
    a = allocator.try_alloc(allocator.num_free * allocator.block_size, rid)
    assert a is not None
    return a


def receiver_session(peer: et.Peer, rid: str) -> Any:
    return peer.sessions.get(rid)


def sender_session(enc: et.EncodeNode, rid: str) -> Any:
    return enc.senders.get(rid)


def state_of(session: Any) -> str | None:
    return None if session is None else session.machine.state.name


def states_seen(session: Any) -> set[str]:
    """Every state the session's machine has been in (from its history)."""
    seen = {session.machine.state.name}
    for frm, _, to in session.machine.history:
        seen.add(frm.name)
        seen.add(to.name)
    return seen


async def wait_receive_ready(enc: et.EncodeNode, peer: et.Peer, rid: str) -> None:
    """A receive started first: wait until its receiver waits for a chunk and the encode node
    has taken its Init (sender in WAIT_DATA), so a send() now takes the Init-first path."""
    await wait_until(lambda: state_of(receiver_session(peer, rid)) == "WAIT_CHUNK", 5, rid)
    await wait_until(lambda: state_of(sender_session(enc, rid)) == "WAIT_DATA", 5, rid)


class raises_typed:
    """Like ``pytest.raises``, but a wrong or missing exception fails with a one-line message
    (type and text) rather than a traceback through the runtime."""

    def __init__(self, expected: type[BaseException], match: str | None = None) -> None:
        self.expected = expected
        self.match = match
        self.value: BaseException | None = None

    def __enter__(self) -> raises_typed:
        return self

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> bool:
        import re

        import pytest

        want = self.expected.__name__
        if exc is None:
            pytest.fail(f"DID NOT RAISE {want}", pytrace=False)
        if not isinstance(exc, self.expected):
            pytest.fail(f"expected {want}, got {type(exc).__name__}: {exc}", pytrace=False)
        if self.match is not None and not re.search(self.match, str(exc)):
            pytest.fail(f"{want} raised but {self.match!r} not in: {exc}", pytrace=False)
        self.value = exc
        return True


def grant(ttl_s: float = 30.0) -> dict[str, int]:
    """The grant fields of a hand-made Init or Resume: stamped now (both nodes of a test share
    this process's clock) and living ``ttl_s``."""
    from emtransfer.runtime.node import now_stamp

    return {"stamp": now_stamp(), "ttl_ms": int(ttl_s * 1000)}


#: what NIXL declares: a completed write is in the receiver's pool (so an AbortAck is proof),
#: but neither a fence nor removing the peer stops a write that is already posted
NIXL_GUARANTEES = Guarantees(remote_completion=True, fences_tag=False, remove_stops_inbound=False)


class NixlLikeTransport(LocalTransport):
    """The in-process engine, declaring only what NIXL declares: a receiver on it can release
    abandoned blocks on an AbortAck or at the grant's expiry, never on a fence or a teardown."""

    GUARANTEES = NIXL_GUARANTEES


def language_node(
    settings: et.Settings, transport: type[LocalTransport] = NixlLikeTransport
) -> et.LanguageNode:
    """A language node on ``transport`` (a LocalTransport declaring other guarantees), built on
    the node's own pool registry and set before the node starts. Not ``LanguageNode(transport=
    ...)``: the node builds a registry of its own and ignores the transport's, so the bytes the
    encode node writes would land in a pool the receiver never reads."""
    node = et.LanguageNode(settings)
    node.transport = transport.from_settings(settings, node.registry)
    assert node.transport.guarantees.post_bound == settings.write_timeout
    return node
