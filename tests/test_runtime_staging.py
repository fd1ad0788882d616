"""Zero copy at the sender: ``EncodeNode.stage`` lends pool-backed tensors that an encoder writes
into, and ``send`` writes from them without a copy-in; where the pool has no run of
consecutive blocks long enough the caller gets plain tensors and one copy, and gets the same
bytes across. Blocks always come back: after the send, at exit without one, after a failure."""

from __future__ import annotations

import asyncio

import pytest
from helpers_runtime import (
    BLOCK,
    assert_same_payload,
    connected,
    make_payload,
    make_settings,
    wait_until,
)
from runtime_harness import transport_params

import emtransfer as et
from emtransfer.allocator import BlockAllocator

pytestmark = pytest.mark.timeout(60)
ENGINES = transport_params("local", "tcp", "nixl")


def _in_pool(enc: et.EncodeNode, t: object) -> bool:
    import torch

    assert isinstance(t, torch.Tensor)
    pool = enc.registry.pools["embeddings"]
    start, end = pool.data_ptr(), pool.data_ptr() + pool.numel() * pool.element_size()
    return start <= t.data_ptr() < end


def _fill(tensors: dict, want: dict) -> None:
    for name, t in want.items():
        tensors[name].copy_(t)


@pytest.mark.parametrize("transport", ENGINES)
@pytest.mark.parametrize("tokens", [40, 300])  # one round; resumed past the default allocation
async def test_a_staged_payload_goes_without_a_copy_in(transport: str, tokens: int) -> None:
    s = make_settings(transport=transport)
    async with connected(s) as (enc, lang, peer):
        want = make_payload(tokens, seed=tokens)
        async with enc.stage("z", tokens) as staged:
            assert staged.zero_copy and _in_pool(enc, staged.tensors["embeddings"])
            _fill(staged.tensors, want)  # "the encoder writes its output"
            recv = asyncio.create_task(lang.receive("z", peer))
            stats = await enc.send("z", staged)
            got = await recv
        assert_same_payload(got.tensors, want)
        assert stats.num_tokens == tokens and got.rounds == (1 if tokens <= 64 else 2)
        assert enc.allocator.num_free == enc.allocator.num_blocks  # given back at the end


@pytest.mark.parametrize("transport", ENGINES)
async def test_a_fragmented_pool_gives_plain_tensors_and_one_copy(transport: str) -> None:
    s = make_settings(transport=transport, num_blocks=16)
    async with connected(s) as (enc, lang, peer):
        singles = [enc.allocator.try_alloc(BLOCK, "frag") for _ in range(16)]
        for a in singles[::2]:  # every other block free: no two consecutive
            assert a is not None
            enc.allocator.free(a)
        want = make_payload(3 * BLOCK, seed=7)
        async with enc.stage("f", 3 * BLOCK) as staged:
            assert not staged.zero_copy and not _in_pool(enc, staged.tensors["embeddings"])
            _fill(staged.tensors, want)
            recv = asyncio.create_task(lang.receive("f", peer))
            await enc.send("f", staged)
            assert_same_payload((await recv).tensors, want)
        for a in singles[1::2]:
            assert a is not None
            enc.allocator.free(a)


async def test_staged_blocks_come_back_without_a_send_and_after_a_failure() -> None:
    s = make_settings(init_timeout=0.5)
    async with connected(s) as (enc, lang, peer):
        async with enc.stage("never", 100) as staged:
            assert enc.allocator.num_free < enc.allocator.num_blocks
            assert staged.allocation is not None
        assert enc.allocator.num_free == enc.allocator.num_blocks
        async with enc.stage("late", 100) as staged:  # nobody asks for it: Init timeout
            with pytest.raises(et.TransferTimeout):
                await enc.send("late", staged)
        assert enc.allocator.num_free == enc.allocator.num_blocks
    # refused by the receiver after round 0 (past its max_tokens): freed too
    async with connected(s, make_settings(max_tokens=80)) as (enc, lang, peer):
        want = make_payload(100, seed=3)
        async with enc.stage("cut", 100) as staged:
            _fill(staged.tensors, want)
            recv = asyncio.create_task(lang.receive("cut", peer))
            with pytest.raises(et.TransferError):
                await enc.send("cut", staged)
            with pytest.raises(et.TransferError, match="max_tokens"):
                await recv


async def test_bad_staging_is_refused_clearly_and_costs_nothing() -> None:
    s = make_settings()
    async with connected(s) as (enc, _lang, _peer):
        with pytest.raises(et.CapacityError, match="pool holds"):
            async with enc.stage("big", s.capacity_tokens + 1):
                pass
        for bad in (0, -3, 2.5, True):
            with pytest.raises(et.InvalidRequest, match="num_tokens"):
                async with enc.stage("bad", bad):  # type: ignore[arg-type]
                    pass
        async with enc.stage("a", 10) as staged:
            with pytest.raises(et.InvalidRequest, match="for rid 'a'"):
                await enc.send("b", staged)
            assert staged.allocation is not None  # still the caller's
        assert enc.allocator.num_free == enc.allocator.num_blocks


async def test_a_staged_payload_cannot_be_sent_twice() -> None:
    s = make_settings()
    async with connected(s) as (enc, lang, peer):
        want = make_payload(20, seed=1)
        async with enc.stage("once", 20) as staged:
            _fill(staged.tensors, want)
            recv = asyncio.create_task(lang.receive("once", peer))
            await enc.send("once", staged)
            await recv
            with pytest.raises(et.InvalidRequest, match="sent already"):
                await enc.send("once", staged)


def test_try_alloc_run_takes_the_lowest_consecutive_run_or_nothing() -> None:
    a = BlockAllocator(8, 4)
    held = [a.try_alloc(4, f"h{i}") for i in range(8)]
    for i in (1, 2, 4, 5, 6):
        h = held[i]
        assert h is not None
        a.free(h)
    run = a.try_alloc_run(12, "r")  # three blocks: 4, 5, 6 (1-2 is too short)
    assert run is not None and run.blocks == (4, 5, 6)
    assert a.try_alloc_run(12, "x") is None  # only 1, 2 left
    two = a.try_alloc_run(5, "y")
    assert two is not None and two.blocks == (1, 2)
    assert a.num_free == 0
    for h in [run, two, *[held[i] for i in (0, 3, 7)]]:
        assert h is not None
        a.free(h)
    assert a.num_free == 8 and not a.leak_report()


async def test_speculative_staging_takes_at_most_half_the_pool() -> None:
    """Pre-staging at send() (before any Init) is capped: the rest of the pool serves rounds
    under way, so a burst of sends cannot take it all and thrash."""
    s = make_settings(num_blocks=16, default_blocks=2)
    async with connected(s) as (enc, lang, peer):
        pays = {f"p{i}": make_payload(2 * BLOCK, seed=i) for i in range(8)}
        sends = [asyncio.create_task(enc.send(r, p)) for r, p in pays.items()]
        # each send() stages (or not) before it first waits: once all are offered, look
        await wait_until(lambda: len(enc._offers) == 8, what="every send waiting for its Init")
        assert enc.speculative_blocks <= 8
        assert enc.allocator.num_free >= 8
        for r, p in pays.items():
            assert_same_payload((await lang.receive(r, peer)).tensors, p)
        await asyncio.gather(*sends)
        assert enc.speculative_blocks == 0
