"""Block allocator: O(1) per-block alloc and free over a free list, ownership by rid,
FIFO waiters for backpressure, quarantine, and a leak report.

Blocks come back in any order, so an allocation's blocks are generally *not* consecutive.
Token ``t`` of an allocation lives at slot ``blocks[t // B] * B + t % B``: see
:meth:`Allocation.slot` and :func:`runs_between`. Nothing here may ever compute a region
from ``min(blocks) * B``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import AllocatorError, CapacityError, ConfigError, TransferTimeout


@dataclass(frozen=True, eq=False)
class Allocation:
    """The blocks one request holds on one node, in the order the allocator returned them."""

    rid: str
    blocks: tuple[int, ...]
    block_size: int
    serial: int = field(repr=False)

    @property
    def capacity_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    def slot(self, token: int) -> int:
        """Pool slot of token ``token`` of this allocation."""
        if not 0 <= token < self.capacity_tokens:
            raise IndexError(f"token {token} outside allocation of {self.capacity_tokens} tokens")
        b = self.block_size
        return self.blocks[token // b] * b + token % b

    def segments(self, start: int, count: int) -> Iterator[tuple[int, int, int]]:
        """Maximal stretches ``(token, slot, length)`` of consecutive slots for tokens
        ``[start, start + count)``; adjacent blocks in order are coalesced."""
        if count < 0 or start < 0 or start + count > self.capacity_tokens:
            raise IndexError(
                f"tokens [{start}, {start + count}) outside allocation of "
                f"{self.capacity_tokens} tokens"
            )
        b = self.block_size
        t, end = start, start + count
        cur_tok = cur_slot = cur_len = -1
        while t < end:
            slot = self.blocks[t // b] * b + t % b
            n = min(b - t % b, end - t)
            if cur_len > 0 and cur_slot + cur_len == slot:
                cur_len += n
            else:
                if cur_len > 0:
                    yield cur_tok, cur_slot, cur_len
                cur_tok, cur_slot, cur_len = t, slot, n
            t += n
        if cur_len > 0:
            yield cur_tok, cur_slot, cur_len

    def runs_to(
        self, other: Allocation, count: int, *, src_start: int = 0, dst_start: int = 0
    ) -> list[Run]:
        """Runs moving ``count`` tokens from this allocation (from ``src_start``) into
        ``other`` (from ``dst_start``)."""
        return runs_between(
            list(self.segments(src_start, count)), list(other.segments(dst_start, count))
        )


@dataclass(frozen=True, slots=True)
class Run:
    """``length`` tokens whose slots are consecutive on both sides."""

    src_slot: int
    dst_slot: int
    length: int


def runs_between(
    src_segments: list[tuple[int, int, int]], dst_segments: list[tuple[int, int, int]]
) -> list[Run]:
    """Merge two segment lists covering the same number of tokens into runs.

    Each segment is ``(token, slot, length)`` as produced by :meth:`Allocation.segments`.
    A run ends wherever either side's slots stop being consecutive.
    """
    runs: list[Run] = []
    i = j = 0
    s_slot = s_left = d_slot = d_left = 0
    while True:
        if s_left == 0:
            if i == len(src_segments):
                break
            _, s_slot, s_left = src_segments[i]
            i += 1
        if d_left == 0:
            if j == len(dst_segments):
                break
            _, d_slot, d_left = dst_segments[j]
            j += 1
        n = min(s_left, d_left)
        runs.append(Run(s_slot, d_slot, n))
        s_slot += n
        d_slot += n
        s_left -= n
        d_left -= n
    if s_left or d_left or i != len(src_segments) or j != len(dst_segments):
        raise ValueError("source and destination segments cover different token counts")
    return runs


@dataclass(eq=False)
class _Waiter:
    min_blocks: int
    max_blocks: int
    rid: str
    future: asyncio.Future[Allocation]


class BlockAllocator:
    """Hands out blocks of a pool of ``num_blocks`` blocks of ``block_size`` token slots.

    Free list operations are O(1) per block. ``alloc`` waits FIFO: once a request waits, later
    requests queue behind it even if they would fit, so a large request is never starved.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ConfigError(f"invalid num_blocks={num_blocks}: must be > 0")
        if block_size <= 0:
            raise ConfigError(f"invalid block_size={block_size}: must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self._owner: list[int] = [0] * num_blocks  # serial of the owning allocation, 0 = free
        self._live: dict[int, Allocation] = {}
        self._quarantined: dict[int, Allocation] = {}
        self._waiters: deque[_Waiter] = deque()
        self._serials = itertools.count(1)
        #: fewest free blocks ever seen (the pool's high-water mark is num_blocks - low_water)
        self.low_water = num_blocks
        #: holders of speculative blocks, told to give them back as soon as anyone must wait
        self.reclaimers: set[Callable[[], None]] = set()

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_quarantined(self) -> int:
        return sum(len(a.blocks) for a in self._quarantined.values())

    @property
    def num_waiters(self) -> int:
        return len(self._waiters)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def owns(self, allocation: Allocation) -> bool:
        return self._live.get(allocation.serial) is allocation

    def leak_report(self) -> dict[str, list[int]]:
        """Blocks held now, by rid (live and quarantined allocations alike)."""
        report: dict[str, list[int]] = {}
        for a in itertools.chain(self._live.values(), self._quarantined.values()):
            report.setdefault(a.rid, []).extend(a.blocks)
        return report

    # -- alloc -------------------------------------------------------------------------------
    def _check_request(self, num_tokens: int, min_tokens: int | None) -> tuple[int, int]:
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
            raise CapacityError(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if min_tokens is not None and (not isinstance(min_tokens, int) or min_tokens <= 0):
            raise CapacityError(f"min_tokens must be a positive integer, got {min_tokens!r}")
        want = self.blocks_for(num_tokens)
        least = want if min_tokens is None else self.blocks_for(min_tokens)
        if least > want:
            raise CapacityError(f"min_tokens={min_tokens} exceeds num_tokens={num_tokens}")
        if least > self.num_blocks:
            raise CapacityError(
                f"{num_tokens} tokens need {least} blocks but the pool has only "
                f"{self.num_blocks} blocks of {self.block_size} tokens"
            )
        return least, min(want, self.num_blocks)

    def _take(self, n: int, rid: str) -> Allocation:
        serial = next(self._serials)
        free, owner = self._free, self._owner
        blocks = tuple(free.pop() for _ in range(n))
        if len(free) < self.low_water:
            self.low_water = len(free)
        for b in blocks:
            owner[b] = serial
        alloc = Allocation(rid, blocks, self.block_size, serial)
        self._live[serial] = alloc
        return alloc

    def try_alloc(
        self, num_tokens: int, rid: str, *, min_tokens: int | None = None
    ) -> Allocation | None:
        """Allocate now or return None. With ``min_tokens``, grant as many blocks as are free,
        between what ``min_tokens`` and ``num_tokens`` need (capped at the pool)."""
        least, most = self._check_request(num_tokens, min_tokens)
        if self._waiters or len(self._free) < least:
            return None
        return self._take(min(most, len(self._free)), rid)

    def try_alloc_run(self, num_tokens: int, rid: str) -> Allocation | None:
        """Allocate ``num_tokens`` as one run of consecutive blocks (the lowest such run that
        is free now), or return None: no such run, or others wait (FIFO). O(free blocks);
        for callers that need one contiguous region (zero-copy staging), not the hot path."""
        want, _ = self._check_request(num_tokens, None)
        if self._waiters or len(self._free) < want:
            return None
        free = sorted(self._free)
        start = None
        for i in range(len(free) - want + 1):
            if free[i + want - 1] - free[i] == want - 1:
                start = free[i]
                break
        if start is None:
            return None
        run = set(range(start, start + want))
        self._free = [b for b in self._free if b not in run]
        serial = next(self._serials)
        for b in run:
            self._owner[b] = serial
        self.low_water = min(self.low_water, len(self._free))
        alloc = Allocation(rid, tuple(range(start, start + want)), self.block_size, serial)
        self._live[serial] = alloc
        return alloc

    async def alloc(
        self,
        num_tokens: int,
        rid: str,
        *,
        timeout: float | None,
        min_tokens: int | None = None,
    ) -> Allocation:
        """Allocate, waiting FIFO for free blocks. Raises :class:`CapacityError` at once for a
        request that can never fit and :class:`TransferTimeout` at the deadline."""
        least, most = self._check_request(num_tokens, min_tokens)
        if not self._waiters and len(self._free) >= least:
            return self._take(min(most, len(self._free)), rid)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Allocation] = loop.create_future()
        waiter = _Waiter(least, most, rid, fut)
        self._waiters.append(waiter)
        for reclaim in list(self.reclaimers):  # speculation never makes anyone wait
            reclaim()

        def expire() -> None:
            if fut.done():
                return
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            fut.set_exception(
                TransferTimeout(
                    f"no {least} free blocks for rid={rid!r} within {timeout}s "
                    f"({self.num_free}/{self.num_blocks} free, {len(self._waiters)} waiting)"
                )
            )
            self._wake()  # the head may have been blocking smaller requests

        handle = loop.call_later(timeout, expire) if timeout is not None else None
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.free(fut.result())  # granted in the same tick the wait was cancelled
            elif not fut.done() or fut.cancelled():
                fut.cancel()
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                self._wake()
            raise
        finally:
            if handle is not None:
                handle.cancel()

    def _wake(self) -> None:
        while self._waiters:
            w = self._waiters[0]
            if w.future.done():
                self._waiters.popleft()
                continue
            if len(self._free) < w.min_blocks:
                return
            self._waiters.popleft()
            w.future.set_result(self._take(min(w.max_blocks, len(self._free)), w.rid))

    # -- free --------------------------------------------------------------------------------
    def free(self, allocation: Allocation) -> None:
        """Return an allocation's blocks. Freeing twice, or an allocation of another pool, raises."""
        live = self._live.pop(allocation.serial, None)
        if live is not allocation:
            if live is not None:
                self._live[allocation.serial] = live
            state = "quarantined" if allocation.serial in self._quarantined else "not live"
            raise AllocatorError(
                f"cannot free allocation of rid={allocation.rid!r} blocks={list(allocation.blocks)}: "
                f"it is {state} (double free or foreign allocation)"
            )
        self._release(allocation)

    def _release(self, allocation: Allocation) -> None:
        owner, serial = self._owner, allocation.serial
        for b in allocation.blocks:
            if owner[b] != serial:  # pragma: no cover - guarded by _live bookkeeping
                raise AllocatorError(f"block {b} is not owned by rid={allocation.rid!r}")
            owner[b] = 0
        self._free.extend(reversed(allocation.blocks))
        self._wake()

    def split(self, allocation: Allocation, blocks: int) -> tuple[Allocation, Allocation]:
        """Cut a live allocation after its first ``blocks`` blocks into two live allocations
        (new serials, same rid): the parts are freed on their own."""
        if self._live.get(allocation.serial) is not allocation:
            raise AllocatorError(f"cannot split allocation of rid={allocation.rid!r}: not live")
        if not 0 < blocks < len(allocation.blocks):
            raise AllocatorError(
                f"cannot split {len(allocation.blocks)} blocks after {blocks}: out of range"
            )
        del self._live[allocation.serial]
        parts = []
        for part in (allocation.blocks[:blocks], allocation.blocks[blocks:]):
            a = Allocation(allocation.rid, part, self.block_size, next(self._serials))
            for b in part:
                self._owner[b] = a.serial
            self._live[a.serial] = a
            parts.append(a)
        return parts[0], parts[1]

    def quarantine(self, allocation: Allocation) -> None:
        """Keep a live allocation's blocks out of circulation until :meth:`release_quarantine`:
        a write may still land in them."""
        if self._live.get(allocation.serial) is not allocation:
            raise AllocatorError(
                f"cannot quarantine allocation of rid={allocation.rid!r}: not live"
            )
        del self._live[allocation.serial]
        self._quarantined[allocation.serial] = allocation

    def release_quarantine(self, allocation: Allocation) -> None:
        if self._quarantined.get(allocation.serial) is not allocation:
            raise AllocatorError(
                f"allocation of rid={allocation.rid!r} is not quarantined; cannot release it"
            )
        del self._quarantined[allocation.serial]
        self._release(allocation)

    def check_owned(self, rid: str, blocks: list[int] | tuple[int, ...]) -> None:
        """Raise unless every block is inside the pool and held by a live allocation of rid."""
        for b in blocks:
            if not isinstance(b, int) or not 0 <= b < self.num_blocks:
                raise AllocatorError(f"block {b!r} is outside the pool of {self.num_blocks} blocks")
            a = self._live.get(self._owner[b])
            if a is None or a.rid != rid:
                raise AllocatorError(f"block {b} is not held by rid={rid!r}")
