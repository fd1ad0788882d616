"""Block allocator: alloc and free over maximal free runs of consecutive blocks (best fit, then
the fewest runs), ownership by rid, FIFO waiters for backpressure, quarantine, and a leak report.

Blocks come back in any order; when no free run is long enough, an allocation spans several
runs, so an allocation's blocks are *not* consecutive in general.
Token ``t`` of an allocation lives at slot ``blocks[t // B] * B + t % B``: see
:meth:`Allocation.slot` and :func:`runs_between`. Nothing here may ever compute a region
from ``min(blocks) * B``.
"""

from __future__ import annotations

import asyncio
import itertools
from bisect import bisect_left, insort
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
    """Hands out blocks of a pool of ``num_blocks`` blocks of ``block_size`` token slots, keeping
    allocations in as few runs of consecutive blocks as the free space allows.

    ``alloc`` waits FIFO: once a request waits, later requests queue behind it even if they
    would fit, so a large request is never starved.

    **Free space** is a set of maximal free runs ``[start, start + length)``: ``_runs`` maps
    start -> length, ``_ends`` maps the exclusive end -> start (so a freed stretch finds both
    neighbours in O(1) and merges with them), ``_by_len`` buckets run starts by length, and
    ``_lens`` is the sorted list of lengths that have a bucket (a bisect finds the shortest run
    of at least ``n`` blocks). Two free runs are never adjacent: they would have merged.

    **Placement** of ``n`` blocks (:meth:`_take`):

    * when some free run has ``>= n`` blocks, the allocation is one run carved from the front
      of the *shortest* such run (best fit). Best fit rather than address-ordered first fit:
      first fit cuts the lowest run that fits even when it is the pool's longest, so the runs
      a later large request (a long transfer, :meth:`try_alloc_run`) needs are worn down;
      best fit uses up the small gaps first and leaves long runs whole. Measured with the
      churn of ``bench/bench_allocator.py`` (4096 blocks, allocations of 1..32 blocks) at 90%
      fill: 58 free runs and 1.96 runs per 64-block allocation with best fit, 72 free runs and
      3.22 runs with first fit (at 50-80% fill both give one run for every size). Ties between
      runs of the same length go to any of them (O(1));
    * otherwise it takes the longest free runs whole, longest first, until what is still
      missing fits in one run, and takes that remainder from the shortest run that holds it
      (best fit again). The number of runs is then the fewest free runs that cover ``n``
      blocks: no placement can do with fewer. Blocks are listed run by run in that order
      (longest first), so a transfer of a prefix of the allocation crosses as few runs as
      possible.

    An allocation's blocks are ascending within each of its runs, but its runs are in no
    particular address order; always address token ``t`` by :meth:`Allocation.slot`.
    Alloc and free cost O(blocks) plus, per run taken or given back, a few dict and set
    operations and a bisect into ``_lens`` (distinct lengths sum to at most ``num_free``, so
    there are fewer than ``sqrt(2 * num_blocks)`` of them: 362 for 65536 blocks).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ConfigError(f"invalid num_blocks={num_blocks}: must be > 0")
        if block_size <= 0:
            raise ConfigError(f"invalid block_size={block_size}: must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._runs: dict[int, int] = {}  # free run start -> length
        self._ends: dict[int, int] = {}  # free run end (exclusive) -> start
        self._by_len: dict[int, set[int]] = {}  # length -> starts of the free runs that long
        self._lens: list[int] = []  # sorted keys of _by_len
        self._add_run(0, num_blocks)
        self._num_free = num_blocks
        self._owner: list[int] = [0] * num_blocks  # serial of the owning allocation, 0 = free
        self._live: dict[int, Allocation] = {}
        self._quarantined: dict[int, Allocation] = {}
        self._waiters: deque[_Waiter] = deque()
        self._serials = itertools.count(1)
        #: fewest free blocks ever seen (the pool's high-water mark is num_blocks - low_water)
        self.low_water = num_blocks
        #: holders of speculative blocks, told to give them back as soon as anyone must wait
        self.reclaimers: set[Callable[[], None]] = set()

    # -- free runs ---------------------------------------------------------------------------
    def _add_run(self, start: int, length: int) -> None:
        self._runs[start] = length
        self._ends[start + length] = start
        bucket = self._by_len.get(length)
        if bucket is None:
            self._by_len[length] = {start}
            insort(self._lens, length)
        else:
            bucket.add(start)

    def _del_run(self, start: int, length: int) -> None:
        del self._runs[start]
        del self._ends[start + length]
        bucket = self._by_len[length]
        bucket.discard(start)
        if not bucket:
            del self._by_len[length]
            lens = self._lens
            del lens[bisect_left(lens, length)]

    def _carve(self, length: int, n: int) -> int:
        """Take the first ``n`` blocks of a free run of ``length`` blocks; return its start."""
        bucket = self._by_len[length]
        start = bucket.pop()
        if not bucket:
            del self._by_len[length]
            lens = self._lens
            del lens[bisect_left(lens, length)]
        del self._runs[start]
        del self._ends[start + length]
        if n < length:  # the rest stays free
            self._add_run(start + n, length - n)
        return start

    def _give_back(self, start: int, length: int) -> None:
        """Make ``[start, start + length)`` free again, merged with the free runs around it."""
        left = self._ends.get(start)
        if left is not None:
            self._del_run(left, start - left)
            length += start - left
            start = left
        end = start + length
        right = self._runs.get(end)
        if right is not None:
            self._del_run(end, right)
            length += right
        self._add_run(start, length)

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs ``(start, length)``, by address: maximal, so never adjacent."""
        return sorted(self._runs.items())

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._num_free

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
        """Allocate ``n <= num_free`` blocks in the fewest runs (see the class docstring)."""
        lens = self._lens
        i = bisect_left(lens, n)
        if i < len(lens):  # one run: the shortest that holds n blocks
            pieces = [(self._carve(lens[i], n), n)]
        else:  # the longest runs whole, then the remainder from the shortest run that holds it
            pieces = []
            need = n
            while lens[-1] < need:
                length = lens[-1]
                pieces.append((self._carve(length, length), length))
                need -= length
            pieces.append((self._carve(lens[bisect_left(lens, need)], need), need))
        self._num_free -= n
        if self._num_free < self.low_water:
            self.low_water = self._num_free
        serial = next(self._serials)
        owner = self._owner
        if len(pieces) == 1:
            start = pieces[0][0]
            blocks = tuple(range(start, start + n))
            owner[start : start + n] = [serial] * n
        else:
            blocks = ()
            for start, length in pieces:
                blocks += tuple(range(start, start + length))
                owner[start : start + length] = [serial] * length
        alloc = Allocation(rid, blocks, self.block_size, serial)
        self._live[serial] = alloc
        return alloc

    def try_alloc(
        self, num_tokens: int, rid: str, *, min_tokens: int | None = None
    ) -> Allocation | None:
        """Allocate now or return None. With ``min_tokens``, grant as many blocks as are free,
        between what ``min_tokens`` and ``num_tokens`` need (capped at the pool)."""
        least, most = self._check_request(num_tokens, min_tokens)
        if self._waiters or self._num_free < least:
            return None
        return self._take(min(most, self._num_free), rid)

    def try_alloc_run(self, num_tokens: int, rid: str) -> Allocation | None:
        """Allocate ``num_tokens`` as one run of consecutive blocks (the lowest such run that
        is free now), or return None: no such run, or others wait (FIFO). For callers that need
        one contiguous region (zero-copy staging). O(free runs of at least that length)."""
        want, _ = self._check_request(num_tokens, None)
        if self._waiters or self._num_free < want:
            return None
        lens = self._lens
        i = bisect_left(lens, want)
        if i == len(lens):
            return None
        start = min(min(self._by_len[length]) for length in lens[i:])
        length = self._runs[start]
        self._del_run(start, length)
        if length > want:
            self._add_run(start + want, length - want)
        self._num_free -= want
        self.low_water = min(self.low_water, self._num_free)
        serial = next(self._serials)
        self._owner[start : start + want] = [serial] * want
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
        if not self._waiters and self._num_free >= least:
            return self._take(min(most, self._num_free), rid)
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
            if self._num_free < w.min_blocks:
                return
            self._waiters.popleft()
            w.future.set_result(self._take(min(w.max_blocks, self._num_free), w.rid))

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
        owner, serial, blocks = self._owner, allocation.serial, allocation.blocks
        first, n = blocks[0], len(blocks)
        if blocks[-1] - first == n - 1 and blocks == tuple(range(first, first + n)):
            pieces = [(first, n)]  # one run (the common case)
        else:  # the allocation's runs: consecutive blocks coalesced
            pieces = []
            start = prev = -2
            for b in blocks:
                if b != prev + 1:
                    if prev >= 0:
                        pieces.append((start, prev + 1 - start))
                    start = b
                prev = b
            pieces.append((start, prev + 1 - start))
        for start, length in pieces:
            if owner[start : start + length].count(serial) != length:  # pragma: no cover
                raise AllocatorError(f"blocks of rid={allocation.rid!r} are not all its own")
        for start, length in pieces:
            owner[start : start + length] = [0] * length
            self._give_back(start, length)
        self._num_free += n
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
