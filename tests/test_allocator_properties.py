"""Property tests: any interleaving of allocs, frees and quarantines keeps every request's bytes
intact and disjoint (docs/design.md, "Addressing"), keeps the free space as maximal runs and hands
out allocations in the fewest runs the free space allows, and runs between two scrambled
allocations are exact and maximal.

Run-keeping properties, checked after every step (``check_runs``) and at every allocation
(``check_placement``), against a model built from the public API only (free = the pool minus the
blocks ``leak_report`` lists):

1. the free runs, the live blocks and the quarantined blocks partition the pool exactly;
2. the free runs are maximal: two of them are never adjacent;
3. when a free run of ``>= n`` blocks exists, an allocation of ``n`` blocks is one run, carved
   from the front of the shortest such run (best fit);
4. an allocation of ``n`` blocks has exactly as many runs as the fewest free runs whose lengths
   sum to ``>= n`` had just before it (no placement can have fewer), listed longest first.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers_runtime import runs_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from emtransfer.allocator import Allocation, BlockAllocator
from emtransfer.buffers import BufferRegistry
from emtransfer.errors import AllocatorError, CapacityError

HIDDEN = 4
FIELDS = {
    "embeddings": ((HIDDEN,), torch.float32),
    "mrope_positions": ((3,), torch.int64),
}
RIDS = ["r0", "r1", "r2", "r3"]


def pattern(uid: int, num_tokens: int) -> dict[str, torch.Tensor]:
    """A payload no other uid produces (every value is unique and non-zero)."""
    base = (uid + 1) * 10_000
    return {
        "embeddings": (base + torch.arange(num_tokens * HIDDEN, dtype=torch.float32)).view(
            num_tokens, HIDDEN
        ),
        "mrope_positions": -(base + torch.arange(num_tokens * 3, dtype=torch.int64)).view(
            num_tokens, 3
        ),
    }


# -- the run-keeping model -------------------------------------------------------------------
def model_free_runs(alloc: BlockAllocator) -> list[tuple[int, int]]:
    """The maximal free runs, from the public API: the pool minus every held block."""
    held = {b for blocks in alloc.leak_report().values() for b in blocks}
    return runs_of([b for b in range(alloc.num_blocks) if b not in held])


def fewest_runs_covering(runs: list[tuple[int, int]], n: int) -> int:
    """The fewest of these runs whose lengths sum to at least ``n`` (the longest ones)."""
    total = 0
    for k, length in enumerate(sorted((length for _, length in runs), reverse=True), 1):
        total += length
        if total >= n:
            return k
    raise AssertionError(f"{n} blocks do not fit in {runs}")


def check_runs(
    alloc: BlockAllocator, live: list[Allocation], quarantined: list[Allocation]
) -> None:
    """Properties 1 and 2."""
    runs = alloc.free_runs()
    free = [b for start, length in runs for b in range(start, start + length)]
    held = [b for a in [*live, *quarantined] for b in a.blocks]
    assert sorted(free + held) == list(range(alloc.num_blocks)), "not a partition of the pool"
    assert alloc.num_free == len(free)
    assert all(length > 0 for _, length in runs)
    for (s1, n1), (s2, _) in itertools.pairwise(runs):
        assert s1 + n1 < s2, f"free runs {runs} not maximal (or overlapping)"
    assert runs == model_free_runs(alloc)


def check_placement(before: list[tuple[int, int]], got: Allocation) -> None:
    """Properties 3 and 4: ``before`` are the free runs just before ``got`` was allocated."""
    n = len(got.blocks)
    pieces = runs_of(got.blocks)
    fits = [length for _, length in before if length >= n]
    if fits:
        assert len(pieces) == 1, f"{n} blocks in {len(pieces)} runs although {before} has a fit"
        assert (pieces[0][0], min(fits)) in before, "not carved from the front of a best fit"
    assert len(pieces) == fewest_runs_covering(before, n), (before, got.blocks)
    lengths = [length for _, length in pieces]
    assert lengths == sorted(lengths, reverse=True)
    for start, length in pieces:  # every piece lies inside one free run of before
        assert any(s <= start and start + length <= s + m for s, m in before)
    if len(pieces) > 1:  # whole runs, then the rest from the front of a best fit among the others
        assert all(p in before for p in pieces[:-1])
        others = [r for r in before if r not in pieces[:-1]]
        start, rest = pieces[-1]
        assert (start, min(m for _, m in others if m >= rest)) in others


# -- stateful: allocs, frees, quarantines, data integrity ------------------------------------
class AllocatorMachine(RuleBasedStateMachine):
    """Model: every allocation (live or quarantined) holds a unique pattern in a registry."""

    @initialize(
        num_blocks=st.integers(1, 12),
        block_size=st.sampled_from([1, 2, 3, 4]),
    )
    def setup(self, num_blocks: int, block_size: int) -> None:
        torch.set_num_threads(1)
        self.alloc = BlockAllocator(num_blocks, block_size)
        self.reg = BufferRegistry(FIELDS, num_blocks=num_blocks, block_size=block_size)
        self.n = num_blocks
        self.b = block_size
        # uid -> (allocation, expected contents of its first `count` tokens)
        self.live: dict[int, tuple[Allocation, dict[str, torch.Tensor]]] = {}
        self.quarantined: dict[int, tuple[Allocation, dict[str, torch.Tensor]]] = {}
        self.freed: list[Allocation] = []
        self.next_uid = 0

    # -- model helpers ------------------------------------------------------------------------
    def held(self) -> int:
        return sum(len(a.blocks) for a, _ in [*self.live.values(), *self.quarantined.values()])

    def counts(self) -> tuple[int, int, dict[str, list[int]]]:
        return self.alloc.num_free, self.alloc.num_quarantined, self.alloc.leak_report()

    # -- rules ----------------------------------------------------------------------------------
    @rule(
        data=st.data(),
        rid=st.sampled_from(RIDS),
        with_min=st.booleans(),
    )
    def alloc_(self, data: st.DataObject, rid: str, with_min: bool) -> None:
        pool_tokens = self.n * self.b
        num_tokens = data.draw(st.integers(1, pool_tokens + 2 * self.b), label="num_tokens")
        min_tokens = data.draw(st.integers(1, num_tokens), label="min_tokens") if with_min else None
        want = -(-num_tokens // self.b)
        least = want if min_tokens is None else -(-min_tokens // self.b)
        free_before = self.alloc.num_free
        runs_before = self.alloc.free_runs()
        if least > self.n:
            try:
                self.alloc.try_alloc(num_tokens, rid, min_tokens=min_tokens)
            except CapacityError:
                assert self.alloc.num_free == free_before
                return
            raise AssertionError("a request that can never fit must raise CapacityError")
        got = self.alloc.try_alloc(num_tokens, rid, min_tokens=min_tokens)
        if free_before < least:
            assert got is None
            assert self.alloc.num_free == free_before
            return
        assert got is not None
        assert got.rid == rid
        assert len(got.blocks) == min(want, self.n, free_before)
        assert len(got.blocks) >= least
        assert self.alloc.num_free == free_before - len(got.blocks)
        check_placement(runs_before, got)
        self.keep(got, min(num_tokens, got.capacity_tokens))

    def keep(self, got: Allocation, count: int) -> None:
        uid = self.next_uid
        self.next_uid += 1
        expected = pattern(uid, count)
        self.reg.write(got, expected, count=count)
        self.live[uid] = (got, expected)

    @precondition(lambda self: self.alloc.num_free > 0)
    @rule(data=st.data())
    def alloc_singles(self, data: st.DataObject) -> None:
        """Several one-block allocations: freeing some of them later fragments the pool."""
        for _ in range(data.draw(st.integers(1, self.alloc.num_free), label="singles")):
            before = self.alloc.free_runs()
            got = self.alloc.try_alloc(1, "single")
            assert got is not None
            check_placement(before, got)
            self.keep(got, 1)

    @rule(data=st.data(), rid=st.sampled_from(RIDS))
    def alloc_run(self, data: st.DataObject, rid: str) -> None:
        """``try_alloc_run``: the lowest free run that holds the request, or None."""
        num_tokens = data.draw(st.integers(1, self.n * self.b), label="run tokens")
        want = -(-num_tokens // self.b)
        runs_before = self.alloc.free_runs()
        got = self.alloc.try_alloc_run(num_tokens, rid)
        fits = [start for start, length in runs_before if length >= want]
        if not fits:
            assert got is None
            assert self.alloc.free_runs() == runs_before
            return
        assert got is not None and got.rid == rid
        assert got.blocks == tuple(range(fits[0], fits[0] + want))
        self.keep(got, min(num_tokens, got.capacity_tokens))

    @precondition(
        lambda self: any(
            len(a.blocks) >= 2 and e["embeddings"].shape[0] > a.block_size
            for a, e in self.live.values()
        )
    )
    @rule(data=st.data())
    def split(self, data: st.DataObject) -> None:
        """Cut a live allocation in two (each part keeps at least one written token)."""
        uids = sorted(
            uid
            for uid, (a, e) in self.live.items()
            if len(a.blocks) >= 2 and e["embeddings"].shape[0] > a.block_size
        )
        uid = data.draw(st.sampled_from(uids), label="split uid")
        allocation, expected = self.live.pop(uid)
        count = expected["embeddings"].shape[0]
        k = data.draw(
            st.integers(1, min(len(allocation.blocks) - 1, (count - 1) // self.b)), label="k"
        )
        head, tail = self.alloc.split(allocation, k)
        assert head.blocks + tail.blocks == allocation.blocks
        cut = k * self.b
        for part, sl in ((head, slice(0, cut)), (tail, slice(cut, count))):
            self.live[self.next_uid] = (part, {name: t[sl].clone() for name, t in expected.items()})
            self.next_uid += 1
        self.freed.append(allocation)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.live)), label="free uid")
        allocation, _ = self.live.pop(uid)
        self.alloc.free(allocation)
        self.freed.append(allocation)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def quarantine(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.live)), label="quarantine uid")
        self.alloc.quarantine(self.live[uid][0])
        self.quarantined[uid] = self.live.pop(uid)

    @precondition(lambda self: self.quarantined)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        uid = data.draw(st.sampled_from(sorted(self.quarantined)), label="release uid")
        allocation, _ = self.quarantined.pop(uid)
        self.alloc.release_quarantine(allocation)
        self.freed.append(allocation)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def rewrite_part(self, data: st.DataObject) -> None:
        """Overwrite a sub-range of a live allocation (partial writes at any offset)."""
        uid = data.draw(st.sampled_from(sorted(self.live)), label="rewrite uid")
        allocation, expected = self.live[uid]
        count = expected["embeddings"].shape[0]
        start = data.draw(st.integers(0, count - 1), label="start")
        n = data.draw(st.integers(1, count - start), label="n")
        fresh_uid = self.next_uid
        self.next_uid += 1
        fresh = pattern(fresh_uid, n)
        self.reg.write(allocation, fresh, count=n, dst_start=start)
        for name in expected:
            expected[name][start : start + n] = fresh[name]

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def misuse_freed(self, data: st.DataObject) -> None:
        """Double free / quarantine / release of a dead allocation raise and change nothing."""
        allocation = data.draw(st.sampled_from(self.freed), label="dead allocation")
        before = self.counts()
        for op in (self.alloc.free, self.alloc.quarantine, self.alloc.release_quarantine):
            try:
                op(allocation)
            except AllocatorError:
                pass
            else:
                raise AssertionError(f"{op.__name__} of a freed allocation did not raise")
            assert self.counts() == before

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def free_runs_partition_the_pool_and_are_maximal(self) -> None:
        if not hasattr(self, "alloc"):
            return
        check_runs(
            self.alloc,
            [a for a, _ in self.live.values()],
            [a for a, _ in self.quarantined.values()],
        )

    @invariant()
    def blocks_disjoint_and_accounted(self) -> None:
        if not hasattr(self, "alloc"):
            return
        held = [b for a, _ in [*self.live.values(), *self.quarantined.values()] for b in a.blocks]
        assert len(held) == len(set(held)), "a block is in two allocations"
        assert all(0 <= b < self.n for b in held)
        q = sum(len(a.blocks) for a, _ in self.quarantined.values())
        assert self.alloc.num_quarantined == q
        assert self.alloc.num_free + (self.held() - q) + self.alloc.num_quarantined == self.n
        report: dict[str, list[int]] = {}
        for a, _ in [*self.live.values(), *self.quarantined.values()]:
            report.setdefault(a.rid, []).extend(a.blocks)
        got = self.alloc.leak_report()
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in report.items()}
        for a, _ in self.live.values():
            assert self.alloc.owns(a)
            self.alloc.check_owned(a.rid, a.blocks)

    @invariant()
    def data_intact(self) -> None:
        if not hasattr(self, "alloc"):
            return
        slots: set[int] = set()
        for a, expected in [*self.live.values(), *self.quarantined.values()]:
            count = expected["embeddings"].shape[0]
            mine = {a.slot(t) for t in range(count)}
            assert not slots & mine, "two allocations share a slot"
            slots |= mine
            got = self.reg.read(a, count=count)
            for name in expected:
                assert torch.equal(got[name], expected[name]), (a, name)

    def teardown(self) -> None:
        if not hasattr(self, "alloc"):
            return
        for a, _ in self.live.values():
            self.alloc.free(a)
        for a, _ in self.quarantined.values():
            self.alloc.release_quarantine(a)
        assert self.alloc.num_free == self.n
        assert self.alloc.num_quarantined == 0
        assert self.alloc.num_waiters == 0
        assert self.alloc.leak_report() == {}
        assert self.alloc.free_runs() == [(0, self.n)]  # everything merged back


AllocatorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase


# -- run keeping under churn, on larger pools (block level, no payloads) ------------------------
KINDS = ["alloc", "alloc", "alloc", "alloc_run", "free", "free", "quarantine", "release", "split"]


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None)
@given(
    num_blocks=st.integers(1, 64),
    held=st.lists(st.booleans(), min_size=64, max_size=64),
    ops=st.lists(
        st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
        min_size=1,
        max_size=120,
    ),
)
def test_free_runs_stay_maximal_and_allocations_take_the_fewest_runs(
    num_blocks: int, held: list[bool], ops: list[tuple[str, int, int]]
) -> None:
    b = 2
    alloc = BlockAllocator(num_blocks, b)
    live: list[Allocation] = []
    quarantined: list[Allocation] = []
    # start from an arbitrary fragmented pool: one-block allocations, those not held freed
    singles = [alloc.try_alloc(b, "single") for _ in range(num_blocks)]
    for i, single in enumerate(singles):
        assert single is not None and single.blocks == (i,)
        if held[i]:
            live.append(single)
        else:
            alloc.free(single)
    check_runs(alloc, live, quarantined)
    for kind, x, y in ops:
        if kind == "alloc":  # up to the pool, all the free blocks, or up to the free blocks
            if y % 4 == 0:
                want = 1 + x % num_blocks
            elif y % 4 == 1:
                want = max(1, alloc.num_free)
            else:
                want = 1 + x % max(1, alloc.num_free)
            least = want if y % 3 == 0 else 1 + y % want
            before, free_before = alloc.free_runs(), alloc.num_free
            got = alloc.try_alloc(want * b, "r", min_tokens=None if least == want else least * b)
            if free_before < least:
                assert got is None and alloc.free_runs() == before
            else:
                assert got is not None and len(got.blocks) == min(want, free_before)
                check_placement(before, got)
                live.append(got)
        elif kind == "alloc_run":
            want = 1 + x % num_blocks
            before = alloc.free_runs()
            got = alloc.try_alloc_run(want * b, "r")
            fits = [start for start, length in before if length >= want]
            if not fits:
                assert got is None and alloc.free_runs() == before
            else:
                assert got is not None and got.blocks == tuple(range(fits[0], fits[0] + want))
                live.append(got)
        elif kind == "free" and live:
            alloc.free(live.pop(x % len(live)))
        elif kind == "quarantine" and live:
            a = live.pop(x % len(live))
            alloc.quarantine(a)
            quarantined.append(a)
        elif kind == "release" and quarantined:
            alloc.release_quarantine(quarantined.pop(x % len(quarantined)))
        elif kind == "split" and any(len(a.blocks) >= 2 for a in live):
            big = [a for a in live if len(a.blocks) >= 2]
            a = big[x % len(big)]
            live.remove(a)
            live.extend(alloc.split(a, 1 + y % (len(a.blocks) - 1)))
        check_runs(alloc, live, quarantined)
    for a in live:
        alloc.free(a)
    for a in quarantined:
        alloc.release_quarantine(a)
    assert alloc.free_runs() == [(0, num_blocks)]
    assert alloc.num_free == num_blocks and not alloc.leak_report()


# -- runs between two scrambled allocations ----------------------------------------------------
@st.composite
def scrambled_pair(draw: st.DrawFn) -> tuple[Allocation, Allocation, int, int, int]:
    """Two allocations from two allocators (one block size: it is a cluster-wide setting), each
    with an arbitrary block order, and a token range that fits both."""
    block_size = draw(st.integers(1, 5), label="block_size")
    sides = []
    for side in ("src", "dst"):  # made by hand: the allocator would keep them in runs
        pool = draw(st.integers(1, 10), label=f"{side} pool")
        order = draw(st.permutations(range(pool)), label=f"{side} order")
        k = draw(st.integers(1, pool), label=f"{side} blocks")
        sides.append(Allocation(side, tuple(order[:k]), block_size, serial=0))
    src, dst = sides
    src_start = draw(st.integers(0, src.capacity_tokens), label="src_start")
    dst_start = draw(st.integers(0, dst.capacity_tokens), label="dst_start")
    room = min(src.capacity_tokens - src_start, dst.capacity_tokens - dst_start)
    count = draw(st.integers(0, room), label="count")
    return src, dst, src_start, dst_start, count


@settings(max_examples=200, deadline=None)
@given(scrambled_pair())
def test_runs_to_is_exact_and_maximal(case: tuple[Allocation, Allocation, int, int, int]) -> None:
    src, dst, src_start, dst_start, count = case
    runs = src.runs_to(dst, count, src_start=src_start, dst_start=dst_start)
    assert sum(r.length for r in runs) == count
    assert all(r.length > 0 for r in runs)
    t = 0
    for r in runs:
        for i in range(r.length):  # consecutive on both sides, matching the per-token mapping
            assert src.slot(src_start + t + i) == r.src_slot + i
            assert dst.slot(dst_start + t + i) == r.dst_slot + i
        t += r.length
    for r1, r2 in itertools.pairwise(runs):  # maximal: no two adjacent runs could merge
        assert not (
            r1.src_slot + r1.length == r2.src_slot and r1.dst_slot + r1.length == r2.dst_slot
        ), (r1, r2)


@settings(max_examples=100, deadline=None)
@given(scrambled_pair())
def test_write_ops_move_exactly_the_runs_bytes(
    case: tuple[Allocation, Allocation, int, int, int],
) -> None:
    torch.set_num_threads(1)
    src, dst, src_start, dst_start, count = case
    block_size = src.block_size
    src_reg = BufferRegistry(FIELDS, num_blocks=max(src.blocks) + 1, block_size=block_size)
    dst_reg = BufferRegistry(FIELDS, num_blocks=max(dst.blocks) + 1, block_size=block_size)
    runs = src.runs_to(dst, count, src_start=src_start, dst_start=dst_start)
    ops = dst_reg.write_ops(runs)

    # one op per run and field, offsets = slot * token_nbytes of that field
    assert len(ops) == len(runs) * len(FIELDS)
    for name, lay in dst_reg.layouts.items():
        field_ops = [op for op in ops if op.field == name]
        assert [(op.src_offset, op.dst_offset, op.nbytes) for op in field_ops] == [
            (
                r.src_slot * lay.token_nbytes,
                r.dst_slot * lay.token_nbytes,
                r.length * lay.token_nbytes,
            )
            for r in runs
        ]

    # executing the ops byte for byte moves the payload, and touches no other slot
    data = pattern(7, count)
    if count:
        src_reg.write(src, data, count=count, dst_start=src_start)
    for op in ops:
        d = dst_reg.byte_view(op.field)
        s = src_reg.byte_view(op.field)
        d[op.dst_offset : op.dst_offset + op.nbytes] = s[op.src_offset : op.src_offset + op.nbytes]
    got = dst_reg.read(dst, count=count, start=dst_start)
    for name in FIELDS:
        assert torch.equal(got[name], data[name])
    written = {dst.slot(dst_start + t) for t in range(count)}
    nonzero = {
        int(s) for s in dst_reg.pools["mrope_positions"].ne(0).any(dim=1).nonzero().flatten()
    }
    assert nonzero == written
