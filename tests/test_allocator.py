"""BlockAllocator: explicit cases, run keeping (best fit, fewest runs, merging on free), and
regressions of the scrambled-free-list addressing bug.

The design note this project grew from addressed an allocation as the single region
``[min(blocks) * B, min(blocks) * B + n)``. With a fragmented pool that region covers blocks
owned by other requests and skips blocks the request owns. The tests at the end of this file
rebuild the two block lists of docs/design.md (as hand-made allocations in the note's exact order,
and through the public API as the same block sets in the allocator's own order) and prove that
per-block addressing (``Allocation.slot`` / ``segments`` / ``BufferRegistry.write``) keeps every
request's bytes intact, while the shortcut corrupts a neighbour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch
from helpers_runtime import runs_of

from emtransfer.allocator import Allocation, BlockAllocator
from emtransfer.buffers import BufferRegistry
from emtransfer.errors import (
    AllocatorError,
    CapacityError,
    ConfigError,
    TransferError,
    TransferTimeout,
)

B = 4  # block size used throughout: small, so that tests can reason about every slot
HIDDEN = 8
FIELDS = {
    "embeddings": ((HIDDEN,), torch.float32),
    "mrope_positions": ((3,), torch.int64),
}


# -- helpers ------------------------------------------------------------------------------------
def held_blocks(alloc: BlockAllocator) -> int:
    return sum(len(blocks) for blocks in alloc.leak_report().values())


def assert_accounting(alloc: BlockAllocator) -> None:
    """Every block is exactly one of: free, held (live or quarantined)."""
    assert alloc.num_free + held_blocks(alloc) == alloc.num_blocks


def assert_pool_full(alloc: BlockAllocator) -> None:
    assert alloc.num_free == alloc.num_blocks
    assert alloc.num_quarantined == 0
    assert alloc.num_waiters == 0
    assert alloc.leak_report() == {}


def allocation_with_blocks(
    alloc: BlockAllocator, blocks: list[int], rid: str = "target"
) -> tuple[Allocation, dict[int, Allocation]]:
    """Drive a fresh allocator, through its public API only, into handing out exactly the block
    *set* ``blocks`` (in the allocator's own order: its runs, longest first). Every block first
    gets its own one-block allocation; the singles of ``blocks`` are freed (they merge into
    runs), and one allocation takes them back. Returns the target allocation and the singles
    still live, by block."""
    assert_pool_full(alloc)
    singles = [alloc.try_alloc(1, f"single-{i}") for i in range(alloc.num_blocks)]
    by_block = {s.blocks[0]: s for s in singles}  # type: ignore[union-attr]
    for b in reversed(blocks):
        alloc.free(by_block.pop(b))
    assert alloc.free_runs() == runs_of(sorted(blocks))
    target = alloc.try_alloc(len(blocks) * alloc.block_size, rid)
    assert target is not None
    assert sorted(target.blocks) == sorted(blocks)
    # one piece per free run, longest first
    lengths = [n for _, n in runs_of(target.blocks)]
    assert sorted(lengths, reverse=True) == lengths
    assert len(lengths) == len(runs_of(sorted(blocks)))
    assert_accounting(alloc)
    return target, by_block


def design_note_allocation(blocks: list[int], rid: str = "x") -> Allocation:
    """An allocation with exactly these blocks in this order, made by hand: the run-keeping
    allocator never hands out a descending stretch, but addressing must not depend on that."""
    return Allocation(rid, tuple(blocks), B, serial=0)


def payload(num_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """A payload whose every value is distinct from other seeds' (and non-zero)."""
    base = (seed + 1) * 100_000
    return {
        "embeddings": (base + torch.arange(num_tokens * HIDDEN, dtype=torch.float32)).view(
            num_tokens, HIDDEN
        ),
        "mrope_positions": (base + torch.arange(num_tokens * 3, dtype=torch.int64)).view(
            num_tokens, 3
        ),
    }


def assert_payload_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


async def until(pred: Callable[[], bool], *, max_yields: int = 100) -> None:
    """Yield to the event loop (no timed sleep) until ``pred()`` holds."""
    for _ in range(max_yields):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


# -- construction -------------------------------------------------------------------------------
@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (-1, 4), (4, 0), (4, -2)])
def test_invalid_geometry_is_a_config_error(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ConfigError):
        BlockAllocator(num_blocks, block_size)


def test_fresh_allocator() -> None:
    a = BlockAllocator(10, B)
    assert a.capacity_tokens == 10 * B
    assert a.blocks_for(1) == 1
    assert a.blocks_for(B) == 1
    assert a.blocks_for(B + 1) == 2
    assert_pool_full(a)


# -- sync alloc/free ----------------------------------------------------------------------------
def test_alloc_and_free_basics() -> None:
    a = BlockAllocator(10, B)
    x = a.try_alloc(3 * B, "x")
    y = a.try_alloc(2 * B + 1, "y")  # rounds up to 3 blocks
    assert x is not None and y is not None
    assert len(x.blocks) == 3 and x.capacity_tokens == 3 * B
    assert len(y.blocks) == 3 and y.capacity_tokens == 3 * B
    assert x.rid == "x" and y.rid == "y" and x.block_size == B
    assert not set(x.blocks) & set(y.blocks)
    assert a.owns(x) and a.owns(y)
    assert a.num_free == 4
    assert a.leak_report() == {"x": list(x.blocks), "y": list(y.blocks)}
    a.free(x)
    assert not a.owns(x)
    assert a.num_free == 7
    assert a.leak_report() == {"y": list(y.blocks)}
    a.free(y)
    assert_pool_full(a)


def test_blocks_returned_in_any_order_are_reused() -> None:
    a = BlockAllocator(6, B)
    singles = [a.try_alloc(1, f"s{i}") for i in range(6)]
    assert a.num_free == 0
    for i in (4, 0, 5, 2, 1, 3):
        a.free(singles[i])  # type: ignore[arg-type]
        assert_accounting(a)
    assert_pool_full(a)
    assert a.free_runs() == [(0, 6)]  # freed in any order, merged back into one run
    everything = a.try_alloc(6 * B, "all")
    assert everything is not None
    assert everything.blocks == tuple(range(6))
    a.free(everything)
    assert_pool_full(a)


def test_try_alloc_returns_none_when_short() -> None:
    a = BlockAllocator(4, B)
    x = a.try_alloc(3 * B, "x")
    assert x is not None
    assert a.try_alloc(2 * B, "y") is None
    assert a.num_free == 1  # a refused request takes nothing
    assert a.leak_report() == {"x": list(x.blocks)}
    a.free(x)
    assert_pool_full(a)


def test_partial_grant_with_min_tokens() -> None:
    a = BlockAllocator(8, B)
    x = a.try_alloc(5 * B, "x")
    assert x is not None and a.num_free == 3
    # wants 6 blocks, accepts 2: gets the 3 that are free
    y = a.try_alloc(6 * B, "y", min_tokens=2 * B)
    assert y is not None and len(y.blocks) == 3
    assert a.num_free == 0
    # wants 2 blocks and needs at least 1: nothing free, so nothing
    assert a.try_alloc(2 * B, "z", min_tokens=1) is None
    a.free(x)
    # plenty free: the full request is granted, no more
    z = a.try_alloc(2 * B, "z", min_tokens=1)
    assert z is not None and len(z.blocks) == 2
    a.free(y)
    a.free(z)
    assert_pool_full(a)


def test_min_tokens_lets_a_request_larger_than_the_pool_take_the_whole_pool() -> None:
    a = BlockAllocator(4, B)
    x = a.try_alloc(100 * B, "x", min_tokens=B)
    assert x is not None and len(x.blocks) == 4
    a.free(x)
    assert_pool_full(a)


@pytest.mark.parametrize(
    ("num_tokens", "min_tokens"),
    [
        (4 * B + 1, None),  # one token more than the pool: can never fit
        (100 * B, None),
        (100 * B, 5 * B),  # min_tokens alone needs more than the pool
        (0, None),
        (-3, None),
        (2 * B, 3 * B),  # min_tokens > num_tokens
    ],
)
def test_capacity_error_at_once(num_tokens: int, min_tokens: int | None) -> None:
    a = BlockAllocator(4, B)
    with pytest.raises(CapacityError) as info:
        a.try_alloc(num_tokens, "x", min_tokens=min_tokens)
    assert isinstance(info.value, TransferError)
    assert_pool_full(a)


def test_capacity_error_rejects_non_integer_token_counts() -> None:
    a = BlockAllocator(4, B)
    with pytest.raises(CapacityError):
        a.try_alloc(1.5, "x")  # type: ignore[arg-type]
    assert_pool_full(a)


def test_capacity_error_message_names_the_sizes() -> None:
    a = BlockAllocator(4, B)
    with pytest.raises(CapacityError, match=r"need 5 blocks but the pool has only 4 blocks"):
        a.try_alloc(4 * B + 1, "x")


# -- misuse ---------------------------------------------------------------------------------
def test_double_free_raises_and_changes_nothing() -> None:
    a = BlockAllocator(6, B)
    x = a.try_alloc(2 * B, "x")
    y = a.try_alloc(B, "y")
    assert x is not None and y is not None
    a.free(x)
    before = (a.num_free, a.leak_report(), a.num_quarantined)
    with pytest.raises(AllocatorError, match="double free"):
        a.free(x)
    assert (a.num_free, a.leak_report(), a.num_quarantined) == before
    assert a.owns(y)
    # the blocks x had may be reused; freeing x again still must not touch the new owner
    z = a.try_alloc(2 * B, "z")
    assert z is not None and set(z.blocks) == set(x.blocks)
    with pytest.raises(AllocatorError):
        a.free(x)
    assert a.owns(z)
    a.free(y)
    a.free(z)
    assert_pool_full(a)


def test_freeing_an_allocation_of_another_allocator_raises() -> None:
    a = BlockAllocator(4, B)
    other = BlockAllocator(4, B)
    mine = a.try_alloc(B, "mine")
    foreign = other.try_alloc(B, "foreign")  # same serial and the same block as `mine`
    assert mine is not None and foreign is not None
    before = (a.num_free, a.leak_report())
    with pytest.raises(AllocatorError):
        a.free(foreign)
    assert (a.num_free, a.leak_report()) == before
    assert a.owns(mine)
    a.free(mine)
    other.free(foreign)
    assert_pool_full(a)
    assert_pool_full(other)


# BUG: BlockAllocator.quarantine() pops ``self._live[allocation.serial]`` *before* checking
# that the popped entry is ``allocation``. Serials start at 1 in every allocator, so a foreign
# allocation (or any stale object whose serial collides) removes this allocator's live
# allocation with that serial and does not put it back: its blocks are then neither free, nor
# live, nor quarantined -- owns() is False, free() raises, leak_report() no longer lists them,
# so they leak silently and free + held != num_blocks.
def test_quarantining_a_foreign_allocation_raises_and_changes_nothing() -> None:
    a = BlockAllocator(4, B)
    other = BlockAllocator(4, B)
    mine = a.try_alloc(B, "mine")
    foreign = other.try_alloc(B, "foreign")
    assert mine is not None and foreign is not None
    before = (a.num_free, a.leak_report(), a.num_quarantined)
    with pytest.raises(AllocatorError):
        a.quarantine(foreign)
    assert (a.num_free, a.leak_report(), a.num_quarantined) == before
    assert a.owns(mine)
    a.free(mine)
    assert_pool_full(a)


# BUG: BlockAllocator.release_quarantine() has the same flaw as quarantine(): it pops
# ``self._quarantined[allocation.serial]`` before the identity check, so releasing a foreign
# allocation whose serial collides with one of this allocator's quarantined allocations drops
# that quarantined allocation without returning its blocks: they leak, num_quarantined and
# leak_report() forget them, and release_quarantine(mine) then raises.
def test_releasing_a_foreign_allocation_from_quarantine_raises_and_changes_nothing() -> None:
    a = BlockAllocator(4, B)
    other = BlockAllocator(4, B)
    mine = a.try_alloc(B, "mine")
    foreign = other.try_alloc(B, "foreign")
    assert mine is not None and foreign is not None
    a.quarantine(mine)
    other.quarantine(foreign)
    before = (a.num_free, a.leak_report(), a.num_quarantined)
    with pytest.raises(AllocatorError):
        a.release_quarantine(foreign)
    assert (a.num_free, a.leak_report(), a.num_quarantined) == before
    a.release_quarantine(mine)
    assert_pool_full(a)


# -- quarantine ---------------------------------------------------------------------------------
def test_quarantine_keeps_blocks_out_of_circulation() -> None:
    a = BlockAllocator(4, B)
    x = a.try_alloc(3 * B, "x")
    assert x is not None
    a.quarantine(x)
    assert not a.owns(x)
    assert a.num_quarantined == 3
    assert a.num_free == 1
    assert a.leak_report() == {"x": list(x.blocks)}  # quarantined blocks still count as held
    assert_accounting(a)
    # not reusable while quarantined
    assert a.try_alloc(2 * B, "y") is None
    y = a.try_alloc(B, "y")
    assert y is not None and not set(y.blocks) & set(x.blocks)
    # a quarantined allocation can be neither freed nor quarantined again
    with pytest.raises(AllocatorError, match="quarantined"):
        a.free(x)
    with pytest.raises(AllocatorError):
        a.quarantine(x)
    assert a.num_quarantined == 3
    a.release_quarantine(x)
    assert a.num_quarantined == 0
    with pytest.raises(AllocatorError):
        a.release_quarantine(x)
    with pytest.raises(AllocatorError):
        a.free(x)
    a.free(y)
    assert_pool_full(a)


def test_release_quarantine_of_a_live_allocation_raises() -> None:
    a = BlockAllocator(4, B)
    x = a.try_alloc(B, "x")
    assert x is not None
    with pytest.raises(AllocatorError, match="not quarantined"):
        a.release_quarantine(x)
    assert a.owns(x)
    a.free(x)
    assert_pool_full(a)


# -- ownership and leak report ----------------------------------------------------------------
def test_check_owned() -> None:
    a = BlockAllocator(8, B)
    x = a.try_alloc(2 * B, "x")
    y = a.try_alloc(B, "y")
    assert x is not None and y is not None
    a.check_owned("x", list(x.blocks))
    a.check_owned("x", tuple(reversed(x.blocks)))
    a.check_owned("y", y.blocks)
    with pytest.raises(AllocatorError, match="outside the pool"):
        a.check_owned("x", [8])
    with pytest.raises(AllocatorError, match="outside the pool"):
        a.check_owned("x", [-1])
    with pytest.raises(AllocatorError, match="outside the pool"):
        a.check_owned("x", ["0"])  # type: ignore[list-item]
    free_block = next(b for b in range(8) if b not in x.blocks + y.blocks)
    with pytest.raises(AllocatorError, match="not held by rid='x'"):
        a.check_owned("x", [free_block])
    with pytest.raises(AllocatorError, match="not held by rid='x'"):
        a.check_owned("x", [*x.blocks, y.blocks[0]])  # owned by another rid
    a.quarantine(x)
    with pytest.raises(AllocatorError):
        a.check_owned("x", x.blocks)  # quarantined blocks are not "held" for writing
    a.release_quarantine(x)
    a.free(y)
    assert_pool_full(a)


def test_leak_report_groups_blocks_by_rid() -> None:
    a = BlockAllocator(10, B)
    r1 = a.try_alloc(2 * B, "r")
    r2 = a.try_alloc(B, "r")  # a second allocation of the same rid (a later round)
    s = a.try_alloc(3 * B, "s")
    q = a.try_alloc(B, "q")
    assert r1 and r2 and s and q
    a.quarantine(q)
    report = a.leak_report()
    assert set(report) == {"r", "s", "q"}
    assert sorted(report["r"]) == sorted(r1.blocks + r2.blocks)
    assert report["s"] == list(s.blocks)
    assert report["q"] == list(q.blocks)
    a.free(r1)
    assert a.leak_report()["r"] == list(r2.blocks)
    a.free(r2)
    a.free(s)
    a.release_quarantine(q)
    assert_pool_full(a)


# -- async alloc: backpressure, FIFO, deadlines, cancellation -----------------------------
@pytest.mark.asyncio
async def test_alloc_returns_at_once_when_free() -> None:
    a = BlockAllocator(4, B)
    x = await asyncio.wait_for(a.alloc(2 * B, "x", timeout=1.0), 1.0)
    assert len(x.blocks) == 2 and a.owns(x)
    a.free(x)
    assert_pool_full(a)


@pytest.mark.asyncio
@pytest.mark.parametrize(("num_tokens", "min_tokens"), [(5 * B, None), (0, None), (-1, None)])
async def test_alloc_capacity_error_at_once(num_tokens: int, min_tokens: int | None) -> None:
    a = BlockAllocator(4, B)
    with pytest.raises(CapacityError):
        await asyncio.wait_for(a.alloc(num_tokens, "x", timeout=None, min_tokens=min_tokens), 1.0)
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_alloc_waits_fifo_a_big_head_blocks_smaller_later_requests() -> None:
    a = BlockAllocator(8, B)
    h1 = a.try_alloc(2 * B, "h1")
    h2 = a.try_alloc(4 * B, "h2")
    assert h1 is not None and h2 is not None and a.num_free == 2
    served: list[str] = []

    def start(num_tokens: int, rid: str) -> asyncio.Task[Allocation]:
        task = asyncio.ensure_future(a.alloc(num_tokens, rid, timeout=5.0))
        task.add_done_callback(lambda _t: served.append(rid))
        return task

    big = start(4 * B, "big")
    await until(lambda: a.num_waiters == 1)
    small1 = start(B, "small1")  # would fit in the 2 free blocks, but queues behind `big`
    small2 = start(2 * B, "small2")
    await until(lambda: a.num_waiters == 3)
    assert a.try_alloc(B, "sneaky") is None  # try_alloc does not jump the queue either
    assert a.num_free == 2 and not served

    a.free(h1)  # 4 free: exactly what `big` needs, nothing left for the small ones
    got_big = await asyncio.wait_for(big, 1.0)
    assert len(got_big.blocks) == 4 and a.owns(got_big)
    assert a.num_waiters == 2 and a.num_free == 0
    assert served == ["big"]

    a.free(h2)  # now both small requests fit; they are served in arrival order
    got1, got2 = await asyncio.wait_for(asyncio.gather(small1, small2), 1.0)
    assert served == ["big", "small1", "small2"]
    assert len(got1.blocks) == 1 and len(got2.blocks) == 2
    assert a.num_waiters == 0
    for x in (got_big, got1, got2):
        a.free(x)
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_waiting_alloc_with_min_tokens_gets_a_partial_grant() -> None:
    a = BlockAllocator(4, B)
    held = [a.try_alloc(B, f"h{i}") for i in range(4)]
    task = asyncio.ensure_future(a.alloc(4 * B, "w", timeout=5.0, min_tokens=2 * B))
    await until(lambda: a.num_waiters == 1)
    a.free(held[0])  # 1 block: less than the minimum
    await asyncio.sleep(0)  # let anything that was (wrongly) granted run
    assert not task.done() and a.num_waiters == 1
    a.free(held[1])  # 2 blocks: the minimum, granted at once
    got = await asyncio.wait_for(task, 1.0)
    assert len(got.blocks) == 2
    for x in (got, held[2], held[3]):
        a.free(x)  # type: ignore[arg-type]
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_timeout_leaves_no_waiter_no_blocks_and_wakes_those_behind() -> None:
    a = BlockAllocator(4, B)
    held = a.try_alloc(3 * B, "held")
    assert held is not None and a.num_free == 1
    big = asyncio.ensure_future(a.alloc(4 * B, "big", timeout=0.05))
    await until(lambda: a.num_waiters == 1)
    small = asyncio.ensure_future(a.alloc(B, "small", timeout=5.0))  # blocked behind `big`
    await until(lambda: a.num_waiters == 2)
    with pytest.raises(TransferTimeout, match="rid='big'") as info:
        await asyncio.wait_for(big, 2.0)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, TransferError)
    # the expired waiter is gone and took nothing; the one behind it got the free block
    got = await asyncio.wait_for(small, 1.0)
    assert len(got.blocks) == 1
    assert a.num_waiters == 0
    assert set(a.leak_report()) == {"held", "small"}
    a.free(got)
    a.free(held)
    assert_pool_full(a)


@pytest.mark.asyncio
@pytest.mark.parametrize("skew", [-0.002, 0.0, 0.002])
async def test_grant_racing_the_deadline_never_leaks(skew: float) -> None:
    """Blocks come free at (about) the deadline: either outcome is fine, a leak is not."""
    a = BlockAllocator(4, B)
    held = a.try_alloc(4 * B, "held")
    assert held is not None
    timeout = 0.03
    released = asyncio.Event()

    def release() -> None:
        a.free(held)
        released.set()

    asyncio.get_running_loop().call_later(timeout + skew, release)
    try:
        got = await asyncio.wait_for(a.alloc(2 * B, "w", timeout=timeout), 2.0)
    except TransferTimeout:
        assert a.num_waiters == 0
        await asyncio.wait_for(released.wait(), 1.0)
        assert a.leak_report() == {}
    else:
        await asyncio.wait_for(released.wait(), 1.0)
        assert a.leak_report() == {"w": list(got.blocks)}
        a.free(got)
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_cancelling_a_waiting_alloc_leaves_no_waiter_and_no_leak() -> None:
    a = BlockAllocator(4, B)
    held = a.try_alloc(4 * B, "held")
    assert held is not None
    task = asyncio.ensure_future(a.alloc(2 * B, "w", timeout=5.0))
    await until(lambda: a.num_waiters == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    assert a.num_waiters == 0
    a.free(held)
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_cancelling_the_head_waiter_wakes_those_behind() -> None:
    a = BlockAllocator(4, B)
    held = a.try_alloc(3 * B, "held")
    assert held is not None
    big = asyncio.ensure_future(a.alloc(4 * B, "big", timeout=5.0))
    await until(lambda: a.num_waiters == 1)
    small = asyncio.ensure_future(a.alloc(B, "small", timeout=5.0))
    await until(lambda: a.num_waiters == 2)
    big.cancel()
    got = await asyncio.wait_for(small, 1.0)
    assert big.cancelled()
    assert a.num_waiters == 0
    a.free(got)
    a.free(held)
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_cancel_then_grant_in_the_same_tick_leaves_no_leak() -> None:
    a = BlockAllocator(4, B)
    held = a.try_alloc(4 * B, "held")
    assert held is not None
    task = asyncio.ensure_future(a.alloc(2 * B, "w", timeout=5.0))
    await until(lambda: a.num_waiters == 1)
    task.cancel()
    a.free(held)  # grants the (already cancelled) waiter before its task runs again
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    assert_pool_full(a)


# BUG: on Python < 3.12 (the project supports 3.10+; this machine runs 3.11) alloc() swallows
# a cancellation that arrives in the same tick as the grant. alloc() waits with
# ``asyncio.wait_for(asyncio.shield(fut), timeout)``; the grant's set_result() propagates through
# shield before the cancelled task resumes, and 3.10/3.11's wait_for then *returns the result*
# instead of raising CancelledError (CPython gh-86296, fixed only by 3.12's rewrite of wait_for).
# The cancelled task thus carries on holding blocks its canceller has given up on -- the
# cancellation (an abort, a TaskGroup tear-down, an outer asyncio.timeout) is lost and, unless
# the caller happens to free the result, the blocks leak. Fix: do not use wait_for/shield;
# ``await fut`` directly (cancelling the task then cancels fut, or, when fut is already done,
# Task.cancel sets _must_cancel so CancelledError is still raised at the await and the except
# clause frees the granted allocation), and implement the deadline with
# ``loop.call_later(timeout, expire)`` where expire() removes the waiter, sets TransferTimeout on
# fut if it is not done and calls _wake(); cancel the handle in a finally.
@pytest.mark.asyncio
async def test_grant_then_cancel_in_the_same_tick_raises_cancelled_and_leaves_no_leak() -> None:
    a = BlockAllocator(4, B)
    held = a.try_alloc(4 * B, "held")
    assert held is not None
    task = asyncio.ensure_future(a.alloc(2 * B, "w", timeout=5.0))
    await until(lambda: a.num_waiters == 1)
    a.free(held)  # grants the waiter ...
    task.cancel()  # ... and the caller gives up in the same tick
    try:
        result = await asyncio.wait_for(task, 1.0)
    except asyncio.CancelledError:
        result = None
    leaked = a.leak_report()
    if result is not None:
        a.free(result)  # tidy up so the failure below is the only symptom
    assert result is None, "cancelled alloc() returned an allocation instead of raising"
    assert leaked == {}
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_many_concurrent_allocs_all_served_and_pool_full_after() -> None:
    a = BlockAllocator(8, B)

    async def worker(i: int) -> int:
        got = await a.alloc((i % 5 + 1) * B, f"w{i}", timeout=5.0)
        assert_accounting(a)
        n = len(got.blocks)
        await asyncio.sleep(0)  # hold the blocks across a yield (not a timed wait)
        a.free(got)
        return n

    sizes = await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(40))), 2.0)
    assert sizes == [i % 5 + 1 for i in range(40)]
    assert_pool_full(a)


# -- the design note's scrambled free lists ---------------------------------------------------
SCRAMBLED = [
    # (pool blocks, target blocks): the two lists of docs/design.md (from the original design note)
    pytest.param(24, [15, 16, 17, 18, 19, 14, 13, 12, 11, 10, 4, 3, 2, 1, 0], id="15-blocks"),
    pytest.param(12, [9, 3, 4, 5, 0], id="9-3-4-5-0"),
]


@pytest.mark.parametrize(("num_blocks", "blocks"), SCRAMBLED)
def test_scrambled_allocation_round_trips_through_the_registry(
    num_blocks: int, blocks: list[int]
) -> None:
    torch.set_num_threads(1)
    a = BlockAllocator(num_blocks, B)
    reg = BufferRegistry(FIELDS, num_blocks=num_blocks, block_size=B)
    target, others = allocation_with_blocks(a, blocks)
    n = target.capacity_tokens
    # every other live single holds its own payload
    other_payloads = {b: payload(B, seed=1000 + b) for b in others}
    for b, single in others.items():
        reg.write(single, other_payloads[b], count=B)
    want = payload(n, seed=1)
    reg.write(target, want, count=n)
    assert_payload_equal(reg.read(target, count=n), want)
    for b, single in others.items():
        assert_payload_equal(reg.read(single, count=B), other_payloads[b])
    # the bytes sit exactly at the per-block slots
    emb = reg.pools["embeddings"]
    for t in range(n):
        assert torch.equal(emb[target.blocks[t // B] * B + t % B], want["embeddings"][t])


@pytest.mark.parametrize(("num_blocks", "blocks"), SCRAMBLED)
def test_design_note_order_round_trips_through_the_registry(
    num_blocks: int, blocks: list[int]
) -> None:
    """The note's exact block orders (forwards, then backwards), made by hand."""
    torch.set_num_threads(1)
    reg = BufferRegistry(FIELDS, num_blocks=num_blocks, block_size=B)
    target = design_note_allocation(blocks)
    others = {
        b: Allocation(f"o{b}", (b,), B, serial=0) for b in range(num_blocks) if b not in blocks
    }
    other_payloads = {b: payload(B, seed=1000 + b) for b in others}
    for b, single in others.items():
        reg.write(single, other_payloads[b], count=B)
    n = target.capacity_tokens
    want = payload(n, seed=1)
    reg.write(target, want, count=n)
    assert_payload_equal(reg.read(target, count=n), want)
    for b, single in others.items():
        assert_payload_equal(reg.read(single, count=B), other_payloads[b])
    emb = reg.pools["embeddings"]
    for t in range(n):
        assert torch.equal(emb[blocks[t // B] * B + t % B], want["embeddings"][t])


def test_slot_and_segments_give_per_block_addresses_9_3_4_5_0() -> None:
    x = design_note_allocation([9, 3, 4, 5, 0])
    assert [x.slot(t) for t in range(x.capacity_tokens)] == [
        *range(36, 40),  # block 9
        *range(12, 24),  # blocks 3, 4, 5
        *range(0, 4),  # block 0
    ]
    # blocks 3, 4, 5 are consecutive and coalesce into one segment
    assert list(x.segments(0, 20)) == [(0, 36, 4), (4, 12, 12), (16, 0, 4)]
    assert list(x.segments(2, 5)) == [(2, 38, 2), (4, 12, 3)]
    assert list(x.segments(17, 3)) == [(17, 1, 3)]
    assert list(x.segments(5, 0)) == []
    for bad in (-1, 20):
        with pytest.raises(IndexError):
            x.slot(bad)
    with pytest.raises(IndexError):
        list(x.segments(18, 3))
    with pytest.raises(IndexError):
        list(x.segments(-1, 2))


def test_slot_and_segments_give_per_block_addresses_15_blocks() -> None:
    blocks = [15, 16, 17, 18, 19, 14, 13, 12, 11, 10, 4, 3, 2, 1, 0]
    x = design_note_allocation(blocks)
    assert [x.slot(t) for t in range(x.capacity_tokens)] == [
        blocks[t // B] * B + t % B for t in range(len(blocks) * B)
    ]
    # 15..19 ascend and coalesce; the descending blocks after them cannot
    expected = [(0, 15 * B, 5 * B)] + [(i * B, b * B, B) for i, b in enumerate(blocks) if i >= 5]
    assert list(x.segments(0, x.capacity_tokens)) == expected


def shortcut_slots(allocation: Allocation, count: int) -> set[int]:
    """The slots the original design note's formula would touch: ``[min*B, min*B + count)``."""
    start = min(allocation.blocks) * allocation.block_size
    return set(range(start, start + count))


def per_block_slots(allocation: Allocation, count: int) -> set[int]:
    return {allocation.slot(t) for t in range(count)}


def scrambled_with_victim(
    num_blocks: int, blocks: list[int]
) -> tuple[BlockAllocator, Allocation, list[Allocation]]:
    """``blocks`` for request A; the blocks below ``max(blocks)`` that A does not own are handed
    to other live requests (docs/design.md: "free blocks 1 and 2 (owned by nobody yet, soon
    by another request)")."""
    a = BlockAllocator(num_blocks, B)
    target, singles = allocation_with_blocks(a, blocks, rid="A")
    gaps = [b for b in range(max(blocks)) if b not in blocks]
    for b in reversed(gaps):
        a.free(singles.pop(b))
    victim = a.try_alloc(len(gaps) * B, "victim")
    assert victim is not None and sorted(victim.blocks) == gaps
    return a, target, [victim, *singles.values()]


@pytest.mark.parametrize(("num_blocks", "blocks"), SCRAMBLED)
def test_min_block_shortcut_overlaps_other_requests_per_block_addressing_does_not(
    num_blocks: int, blocks: list[int]
) -> None:
    a, target, others = scrambled_with_victim(num_blocks, blocks)
    victim = others[0]
    n = target.capacity_tokens
    owned = per_block_slots(target, n)
    shortcut = shortcut_slots(target, n)
    victim_slots = per_block_slots(victim, victim.capacity_tokens)
    # the shortcut writes into the victim's slots and misses slots the request owns
    assert shortcut & victim_slots
    assert owned - shortcut, "the shortcut should skip an owned block"
    skipped_blocks = {s // B for s in owned - shortcut}
    assert skipped_blocks == {b for b in blocks if b * B >= n}
    # per-block addressing stays inside the request's own blocks, disjoint from everyone
    assert owned == {b * B + i for b in blocks for i in range(B)}
    for other in others:
        assert not owned & per_block_slots(other, other.capacity_tokens)
    a.check_owned("A", target.blocks)


@pytest.mark.parametrize(("num_blocks", "blocks"), SCRAMBLED)
def test_min_block_shortcut_corrupts_a_neighbour_registry_write_does_not(
    num_blocks: int, blocks: list[int]
) -> None:
    torch.set_num_threads(1)
    _, target, others = scrambled_with_victim(num_blocks, blocks)
    victim = others[0]
    reg = BufferRegistry(FIELDS, num_blocks=num_blocks, block_size=B)
    n = target.capacity_tokens
    data_a = payload(n, seed=1)
    data_v = payload(victim.capacity_tokens, seed=2)

    # the original note's write: one region starting at min(blocks) * B
    reg.write(victim, data_v, count=victim.capacity_tokens)
    start = min(target.blocks) * B
    for name, pool in reg.pools.items():
        pool[start : start + n].copy_(data_a[name])
    got_v = reg.read(victim, count=victim.capacity_tokens)
    assert not torch.equal(got_v["embeddings"], data_v["embeddings"]), "victim not overwritten"
    got_a = reg.read(target, count=n)
    assert not torch.equal(got_a["embeddings"], data_a["embeddings"]), "A read back intact"

    # per-block addressing: both requests keep their bytes
    for pool in reg.pools.values():
        pool.zero_()
    reg.write(victim, data_v, count=victim.capacity_tokens)
    reg.write(target, data_a, count=n)
    assert_payload_equal(reg.read(victim, count=victim.capacity_tokens), data_v)
    assert_payload_equal(reg.read(target, count=n), data_a)


def test_split_makes_two_live_allocations_freed_on_their_own() -> None:
    a = BlockAllocator(8, 4)
    whole = a.try_alloc(20, "r")  # 5 blocks
    assert whole is not None
    head, tail = a.split(whole, 2)
    assert head.blocks + tail.blocks == whole.blocks and head.rid == tail.rid == "r"
    assert a.owns(head) and a.owns(tail) and not a.owns(whole)
    a.check_owned("r", whole.blocks)
    with pytest.raises(AllocatorError):
        a.free(whole)  # the original is gone
    for bad in (0, 3):
        with pytest.raises(AllocatorError, match="out of range"):
            a.split(tail, bad)
    a.free(head)
    assert a.num_free == 5
    a.free(tail)
    assert a.num_free == 8 and not a.leak_report()


# -- run keeping: best fit, fewest runs, merging on free -------------------------------------
def hold_singles(a: BlockAllocator) -> dict[int, Allocation]:
    singles = {}
    for _ in range(a.num_blocks):
        s = a.try_alloc(B, "single")
        assert s is not None
        singles[s.blocks[0]] = s
    return singles


def free_blocks(a: BlockAllocator, singles: dict[int, Allocation], blocks: list[int]) -> None:
    for b in blocks:
        a.free(singles.pop(b))


def test_a_fresh_pool_is_one_run_and_allocations_are_consecutive() -> None:
    a = BlockAllocator(16, B)
    assert a.free_runs() == [(0, 16)]
    x = a.try_alloc(5 * B, "x")
    y = a.try_alloc(3 * B, "y")
    assert x is not None and y is not None
    assert runs_of(x.blocks) == [(x.blocks[0], 5)] and runs_of(y.blocks) == [(y.blocks[0], 3)]
    assert a.free_runs() == [(8, 8)]
    a.free(x)
    assert a.free_runs() == [(0, 5), (8, 8)]
    a.free(y)
    assert a.free_runs() == [(0, 16)]
    assert_pool_full(a)
    b = BlockAllocator(16, B)
    z = b.try_alloc_run(3 * B, "z")
    assert z is not None and z.blocks == (0, 1, 2) and b.low_water == 13
    assert b.free_runs() == [(3, 13)]
    b.free(z)
    assert b.free_runs() == [(0, 16)] and b.low_water == 13


def test_single_run_is_the_best_fit_not_the_first() -> None:
    a = BlockAllocator(16, B)
    singles = hold_singles(a)
    free_blocks(a, singles, [0, 1, 2, 3, 4, 6, 7, 9, 10, 11])  # runs 0-4, 6-7, 9-11
    assert a.free_runs() == [(0, 5), (6, 2), (9, 3)]
    two = a.try_alloc(2 * B, "two")
    assert two is not None and two.blocks == (6, 7)  # the exact fit, not the lowest run
    three = a.try_alloc(3 * B, "three")
    assert three is not None and three.blocks == (9, 10, 11)
    one = a.try_alloc(1, "one")
    assert one is not None and one.blocks == (0,)  # carved from the front of the only run
    assert a.free_runs() == [(1, 4)]
    for x in (two, three, one, *singles.values()):
        a.free(x)
    assert_pool_full(a)
    assert a.free_runs() == [(0, 16)]


def test_no_run_long_enough_takes_the_fewest_runs_longest_first() -> None:
    a = BlockAllocator(24, B)
    singles = hold_singles(a)
    # free runs of 1, 4, 2, 5 and 3 blocks
    free_blocks(a, singles, [0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18])
    assert a.free_runs() == [(0, 1), (2, 4), (7, 2), (10, 5), (16, 3)]
    # 11 blocks: 5 + 4 whole, then the 2 still missing from the shortest run that holds 2
    x = a.try_alloc(11 * B, "x")
    assert x is not None
    assert runs_of(x.blocks) == [(10, 5), (2, 4), (7, 2)]
    assert a.free_runs() == [(0, 1), (16, 3)]
    # a partial grant takes what is free, in the fewest runs
    y = a.try_alloc(10 * B, "y", min_tokens=1)
    assert y is not None and runs_of(y.blocks) == [(16, 3), (0, 1)]
    assert a.num_free == 0 and a.free_runs() == []
    a.free(x)
    assert a.free_runs() == [(2, 4), (7, 2), (10, 5)]
    a.free(y)
    for s in singles.values():
        a.free(s)
    assert a.free_runs() == [(0, 24)]
    assert_pool_full(a)


def test_the_remainder_of_a_multi_run_allocation_is_a_best_fit() -> None:
    a = BlockAllocator(24, B)
    singles = hold_singles(a)
    free_blocks(a, singles, [0, 1, 2, 3, 4, 6, 7, 8, 10, 12, 13])  # runs of 5, 3, 1, 2
    x = a.try_alloc(7 * B, "x")  # 5 whole, then 2 from the run of 2 (not from the run of 3)
    assert x is not None and runs_of(x.blocks) == [(0, 5), (12, 2)]
    assert a.free_runs() == [(6, 3), (10, 1)]
    for s in (x, *singles.values()):
        a.free(s)
    assert_pool_full(a)


@pytest.mark.parametrize(
    ("order", "runs_after"),
    [
        ([3, 5, 4], [[(3, 1)], [(3, 1), (5, 1)], [(3, 3)]]),  # fills a hole: merges both sides
        ([4, 3, 5], [[(4, 1)], [(3, 2)], [(3, 3)]]),  # merges left, then right
        ([5, 4, 3], [[(5, 1)], [(4, 2)], [(3, 3)]]),
    ],
)
def test_freed_blocks_merge_with_both_neighbours(
    order: list[int], runs_after: list[list[tuple[int, int]]]
) -> None:
    a = BlockAllocator(8, B)
    singles = hold_singles(a)
    for b, want in zip(order, runs_after, strict=True):
        free_blocks(a, singles, [b])
        assert a.free_runs() == want
        assert a.num_free == sum(n for _, n in want)


def test_split_parts_merge_back_when_freed() -> None:
    a = BlockAllocator(8, B)
    whole = a.try_alloc(6 * B, "r")
    assert whole is not None and whole.blocks == tuple(range(6))
    head, tail = a.split(whole, 2)
    a.free(tail)
    assert a.free_runs() == [(2, 6)]
    a.free(head)
    assert a.free_runs() == [(0, 8)]
    assert_pool_full(a)


def test_try_alloc_run_takes_the_lowest_run_while_try_alloc_takes_the_best_fit() -> None:
    a = BlockAllocator(12, B)
    singles = hold_singles(a)
    free_blocks(a, singles, [1, 2, 3, 5, 6, 8, 9, 10, 11])  # runs 1-3, 5-6, 8-11
    low = a.try_alloc_run(2 * B, "low")
    assert low is not None and low.blocks == (1, 2)  # the lowest run of >= 2 blocks
    assert a.free_runs() == [(3, 1), (5, 2), (8, 4)]
    best = a.try_alloc(2 * B, "best")
    assert best is not None and best.blocks == (5, 6)  # the shortest run of >= 2 blocks
    assert a.try_alloc_run(5 * B, "none") is None  # 5 free blocks, but no run of 5
    assert a.num_free == 5 and a.free_runs() == [(3, 1), (8, 4)]
    four = a.try_alloc_run(4 * B, "four")
    assert four is not None and four.blocks == (8, 9, 10, 11)
    assert a.num_free == 1 and a.free_runs() == [(3, 1)]
    for x in (low, best, four, *singles.values()):
        a.free(x)
    assert_pool_full(a)


@pytest.mark.asyncio
async def test_a_woken_waiter_gets_the_fewest_runs() -> None:
    a = BlockAllocator(8, B)
    singles = hold_singles(a)
    task = asyncio.ensure_future(a.alloc(3 * B, "w", timeout=5.0))
    await until(lambda: a.num_waiters == 1)
    free_blocks(a, singles, [6, 0])
    assert not task.done()
    free_blocks(a, singles, [7])  # runs 0 and 6-7: three blocks, two runs
    got = await asyncio.wait_for(task, 1.0)
    assert runs_of(got.blocks) == [(6, 2), (0, 1)]
    for x in (got, *singles.values()):
        a.free(x)
    assert_pool_full(a)
