"""Property tests: any interleaving of allocs, frees and quarantines keeps every request's bytes
intact and disjoint (docs/design.md, "Addressing"), and runs between two scrambled allocations are
exact and maximal.
"""

from __future__ import annotations

import itertools

import torch
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


def allocation_with_blocks(
    alloc: BlockAllocator, blocks: list[int], rid: str = "target"
) -> Allocation:
    """Drive a fresh allocator, through its public API only, into handing out exactly ``blocks``
    in this order (one-block allocations of everything, the wanted ones freed in reverse order,
    then one allocation of ``len(blocks)`` blocks). The other singles stay live."""
    assert alloc.num_free == alloc.num_blocks
    singles = [alloc.try_alloc(1, f"single-{i}") for i in range(alloc.num_blocks)]
    by_block = {s.blocks[0]: s for s in singles}  # type: ignore[union-attr]
    for b in reversed(blocks):
        alloc.free(by_block[b])
    target = alloc.try_alloc(len(blocks) * alloc.block_size, rid)
    assert target is not None and list(target.blocks) == blocks
    return target


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
        count = min(num_tokens, got.capacity_tokens)
        uid = self.next_uid
        self.next_uid += 1
        expected = pattern(uid, count)
        self.reg.write(got, expected, count=count)
        self.live[uid] = (got, expected)

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


AllocatorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase


# -- runs between two scrambled allocations ----------------------------------------------------
@st.composite
def scrambled_pair(draw: st.DrawFn) -> tuple[Allocation, Allocation, int, int, int]:
    """Two allocations from two allocators (one block size: it is a cluster-wide setting), each
    with an arbitrary block order, and a token range that fits both."""
    block_size = draw(st.integers(1, 5), label="block_size")
    sides = []
    for side in ("src", "dst"):
        pool = draw(st.integers(1, 10), label=f"{side} pool")
        order = draw(st.permutations(range(pool)), label=f"{side} order")
        k = draw(st.integers(1, pool), label=f"{side} blocks")
        sides.append(
            allocation_with_blocks(BlockAllocator(pool, block_size), list(order[:k]), rid=side)
        )
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
