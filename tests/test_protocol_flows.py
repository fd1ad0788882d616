"""A SenderMachine and a ReceiverMachine connected through a tiny synchronous driver.

The driver plays both runtimes: it turns Send* actions into the peer's *Received events (one
FIFO per direction, like the control connection), grants Alloc actions from a fake block pool
per side (scrambled free lists, optionally partial grants), runs Write actions by copying
token ids into the receiver allocation the write names, and answers them with WriteDone.
It checks every action against what the runtime would need: Deliver ranges read exactly the
tokens that were written, every write lands in an allocation the receiver still owns, nothing
is held across an Alloc (no hold-and-wait), and every grant is given back exactly once.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emtransfer.errors import TransferError
from emtransfer.protocol import events as ev
from emtransfer.protocol.receiver import ReceiverMachine, ReceiverState
from emtransfer.protocol.sender import SenderMachine, SenderState

S, R = SenderState, ReceiverState
RID = "req-flow"
META = {"mrope_position_delta": 7}
DIGEST = "sha256:0123"


class Corruption(AssertionError):
    """A write landed, or could land, in blocks the receiver no longer owns."""


# ---------------------------------------------------------------------------- fake pool


@dataclass(eq=False)
class Allocation:
    blocks: tuple[int, ...]
    capacity: int
    round: int = -1  # receiver: the round it serves
    content: dict[int, int] = field(default_factory=dict)  # slot offset -> payload token
    status: str = "live"  # live | quarantined | freed


class Pool:
    """Blocks handed out from a scrambled free list; every grant must come back once."""

    def __init__(self, num_blocks: int, block_size: int, rng: random.Random) -> None:
        self.num_blocks, self.block_size, self.rng = num_blocks, block_size, rng
        self.free = list(range(num_blocks))
        rng.shuffle(self.free)
        self.grants = 0
        self.returns = 0

    @property
    def free_tokens(self) -> int:
        return len(self.free) * self.block_size

    def grant(self, tokens: int, round_up: bool) -> Allocation:
        n = -(-tokens // self.block_size)
        assert 0 < n <= len(self.free)
        blocks = tuple(self.free.pop(self.rng.randrange(len(self.free))) for _ in range(n))
        self.grants += 1
        return Allocation(blocks, n * self.block_size if round_up else tokens)

    def give_back(self, alloc: Allocation) -> None:
        assert alloc.status != "freed", "double free"
        assert not set(alloc.blocks) & set(self.free), "freeing blocks that are free"
        self.free.extend(alloc.blocks)
        alloc.status = "freed"
        self.returns += 1

    @property
    def idle(self) -> bool:
        return sorted(self.free) == list(range(self.num_blocks))


# ------------------------------------------------------------------------------ driver


class Link:
    """One request between a sender and a receiver, driven step by step."""

    def __init__(
        self,
        total: int,
        *,
        block_size: int = 128,
        default_tokens: int = 1024,
        recv_blocks: int = 64,
        send_blocks: int = 64,
        expected: int | None = None,
        whole: bool = False,
        order: str = "data_first",  # data_first | init_first | any
        partial: bool = False,
        round_up: bool = False,
        seed: int = 0,
    ) -> None:
        self.rng = random.Random(seed)
        self.total, self.order, self.partial, self.round_up = total, order, partial, round_up
        self.expected, self.whole = expected, whole
        self.sender = SenderMachine(RID, block_size=block_size, remote_num_blocks=recv_blocks)
        self.receiver = ReceiverMachine(RID, block_size=block_size, default_tokens=default_tokens)
        self.spool = Pool(send_blocks, block_size, self.rng)
        self.rpool = Pool(recv_blocks, block_size, self.rng)
        self.to_sender: deque[ev.Event] = deque()
        self.to_receiver: deque[ev.Event] = deque()
        self.link_up = True
        # sender side
        self.s_alloc: ev.Alloc | None = None
        self.staging: Allocation | None = None
        self.write: tuple[ev.Write, Allocation] | None = None
        self.write_fate = "done"  # done | fail | torn (teardown: fails, never lands)
        self.data_given = False
        # receiver side
        self.r_alloc: ev.Alloc | None = None
        self.r_round = -1
        self.current: Allocation | None = None
        self.by_round: dict[int, Allocation] = {}
        self.quarantined: list[Allocation] = []
        self.delivered = 0
        # observations
        self.sent: list[Any] = []  # every message, in order: (side, action)
        self.writes: list[ev.Write] = []
        self.deliveries: list[ev.Deliver] = []
        self.outcomes: dict[str, list[ev.Action]] = {"sender": [], "receiver": []}
        self.lost_pending: list[str] = []
        self.steps = 0

    # -- feeding events ----------------------------------------------------------------------
    def to(self, side: str, event: ev.Event) -> None:
        if side == "sender":
            acts = self.sender.handle(event)
            for a in acts:
                self._sender_action(a)
            if self.s_alloc is not None and self.sender.state is not S.STAGING:
                self.s_alloc = None  # the runtime cancels the pending allocation
        else:
            acts = self.receiver.handle(event)
            for a in acts:
                self._receiver_action(a)
            if self.r_alloc is not None and self.receiver.state is not R.ALLOCATING:
                self.r_alloc = None

    def _send(self, side: str, action: ev.Action, event: ev.Event) -> None:
        self.sent.append((side, action))
        if self.link_up:
            (self.to_receiver if side == "sender" else self.to_sender).append(event)

    # -- the sender's runtime -------------------------------------------------------------
    def _sender_action(self, a: ev.Action) -> None:
        if isinstance(a, ev.Alloc):
            assert self.staging is None, "sender holds staging while it allocates more"
            assert self.s_alloc is None
            assert 1 <= a.min_tokens <= a.num_tokens
            self.s_alloc = a
        elif isinstance(a, ev.Write):
            assert self.staging is not None and self.write is None
            assert 0 < a.count <= self.staging.capacity
            assert a.src_start >= 0 and a.src_start + a.count <= self.total
            dst = self.by_round[a.round]
            assert self.sender.dest_blocks == dst.blocks, "writing into another round's blocks"
            assert a.dst_start + a.count <= dst.capacity
            self.writes.append(a)
            self.write = (a, dst)
            if not self.link_up:  # after teardown nothing reaches the peer any more
                self.write_fate = "torn"
            elif dst.status == "freed":
                raise Corruption(f"{a} targets freed blocks {dst.blocks}")
        elif isinstance(a, ev.FreeStaging):
            assert self.staging is not None and self.write is None
            self.spool.give_back(self.staging)
            self.staging = None
        elif isinstance(a, ev.SendChunkDone):
            meta, digest = (self.sender.meta, self.sender.digest) if a.is_last else (None, None)
            msg = ev.ChunkReceived(
                a.round, a.start, a.count, a.total_tokens, a.is_last, meta, digest
            )
            self._send("sender", a, msg)
        elif isinstance(a, ev.SendAbort):
            self._send("sender", a, ev.AbortReceived(a.reason))
        elif isinstance(a, ev.SendAbortAck):
            self._send("sender", a, ev.AbortAckReceived())
        elif isinstance(a, (ev.Complete, ev.Fail)):
            self.outcomes["sender"].append(a)
        else:
            raise AssertionError(f"sender emitted {a}")

    # -- the receiver's runtime -----------------------------------------------------------
    def _receiver_action(self, a: ev.Action) -> None:
        if isinstance(a, ev.Alloc):
            assert self.current is None, "receiver holds an allocation while it allocates"
            assert self.r_alloc is None
            assert 1 <= a.min_tokens <= a.num_tokens
            self.r_round += 1
            self.r_alloc = a
        elif isinstance(a, ev.SendInit):
            assert self.current is not None and self.current.round == 0
            assert (a.blocks, a.capacity_tokens) == (self.current.blocks, self.current.capacity)
            self._send(
                "receiver", a, ev.InitReceived(a.blocks, a.capacity_tokens, a.expected_tokens)
            )
        elif isinstance(a, ev.SendResume):
            cur = self.current
            assert cur is not None and cur.round == a.round >= 1
            assert (a.blocks, a.capacity_tokens) == (cur.blocks, cur.capacity)
            assert a.received_tokens == self.delivered
            self._send(
                "receiver",
                a,
                ev.ResumeReceived(a.round, a.blocks, a.capacity_tokens, a.received_tokens),
            )
        elif isinstance(a, ev.Deliver):
            cur = self.current
            assert cur is not None and cur.round == a.round
            assert a.start == self.delivered, "Deliver out of order"
            assert 0 < a.count <= cur.capacity
            got = [cur.content.get(i) for i in range(a.count)]
            assert got == list(range(a.start, a.start + a.count)), "wrong bytes delivered"
            self.delivered += a.count
            self.deliveries.append(a)
        elif isinstance(a, ev.Free):
            assert self.current is not None
            self._check_no_write_into(self.current)
            self.rpool.give_back(self.current)
            self.current = None
        elif isinstance(a, ev.Quarantine):
            assert self.current is not None
            self.current.status = "quarantined"
            self.quarantined.append(self.current)
            self.current = None
        elif isinstance(a, ev.ReleaseQuarantine):
            assert len(self.quarantined) == 1
            q = self.quarantined.pop()
            self._check_no_write_into(q)
            self.rpool.give_back(q)
        elif isinstance(a, ev.SendAbort):
            self._send("receiver", a, ev.AbortReceived(a.reason))
        elif isinstance(a, ev.Complete):
            assert a.total_tokens == self.total
            assert (a.meta, a.digest) == (META, DIGEST)
            if a.in_place:  # the lease: read in place, then the lease closes and frees
                cur = self.current
                assert cur is not None and cur.round == 0 and self.delivered == 0
                assert [cur.content.get(i) for i in range(self.total)] == list(range(self.total))
                self.delivered = self.total
                self.deliveries.append(ev.Deliver(0, 0, self.total))
                self.rpool.give_back(cur)
                self.current = None
            else:
                assert self.current is None and self.delivered == self.total
            self.outcomes["receiver"].append(a)
        elif isinstance(a, ev.Fail):
            self.outcomes["receiver"].append(a)
        else:
            raise AssertionError(f"receiver emitted {a}")

    def _check_no_write_into(self, alloc: Allocation) -> None:
        if self.write is not None and self.write[1] is alloc and self.write_fate != "torn":
            raise Corruption(f"blocks {alloc.blocks} given back while {self.write[0]} in flight")

    # -- steps ----------------------------------------------------------------------------
    def _grant(self, side: str) -> None:
        pool = self.spool if side == "sender" else self.rpool
        a = self.s_alloc if side == "sender" else self.r_alloc
        assert a is not None
        hi = min(a.num_tokens, pool.free_tokens)
        tokens = self.rng.randint(a.min_tokens, hi) if self.partial else hi
        alloc = pool.grant(tokens, self.round_up)
        if side == "sender":
            self.s_alloc, self.staging = None, alloc
        else:
            alloc.round = self.r_round
            self.by_round[self.r_round] = alloc
            self.r_alloc, self.current = None, alloc
        self.to(side, ev.AllocGranted(alloc.blocks, alloc.capacity))

    def _finish_write(self) -> None:
        assert self.write is not None
        w, dst = self.write
        fate, self.write_fate = self.write_fate, "done"
        if fate == "done":
            if dst.status == "freed":
                raise Corruption(f"{w} landed in freed blocks {dst.blocks}")
            for i in range(w.count):
                dst.content[w.dst_start + i] = w.src_start + i
        self.write = None
        self.to("sender", ev.WriteDone() if fate == "done" else ev.WriteFailed(fate))

    def _give_data(self) -> None:
        self.data_given = True
        self.to("sender", ev.DataReady(self.total, META, DIGEST))

    def _deliver_lost(self) -> None:
        side = self.lost_pending.pop(0)
        m = self.sender if side == "sender" else self.receiver
        if not m.finished:  # the runtime tells the live requests of that peer
            self.to(side, ev.PeerLost("heartbeat missed"))

    def available(self) -> list[str]:
        steps = []
        if self.to_receiver:
            steps.append("to_receiver")
        if self.to_sender:
            steps.append("to_sender")
        if self.r_alloc is not None and self.rpool.free_tokens >= self.r_alloc.min_tokens:
            steps.append("grant_receiver")
        if self.s_alloc is not None and self.spool.free_tokens >= self.s_alloc.min_tokens:
            steps.append("grant_sender")
        if self.write is not None:
            steps.append("write")
        data_now = self.order == "any" or (self.order == "init_first") == (
            self.sender.state is S.WAIT_DATA
        )
        if not self.data_given and self.sender.state in (S.NEW, S.WAIT_DATA) and data_now:
            steps.append("data")
        if self.lost_pending:
            steps.append("lost")
        return steps

    def step(self, name: str) -> None:
        self.steps += 1
        if name == "to_receiver":
            self.to("receiver", self.to_receiver.popleft())
        elif name == "to_sender":
            self.to("sender", self.to_sender.popleft())
        elif name == "grant_receiver":
            self._grant("receiver")
        elif name == "grant_sender":
            self._grant("sender")
        elif name == "write":
            self._finish_write()
        elif name == "data":
            self._give_data()
        elif name == "lost":
            self._deliver_lost()
        else:  # pragma: no cover
            raise AssertionError(name)

    def start(self) -> Link:
        if self.order == "data_first":
            self._give_data()
        self.to("receiver", ev.Start(self.expected, self.whole))
        return self

    def run(self, *, randomly: bool = False, max_steps: int = 200_000) -> Link:
        """Run until nothing is left to do (first available step, or a random one)."""
        while steps := self.available():
            self.step(self.rng.choice(steps) if randomly else steps[0])
            assert self.steps < max_steps, "no progress"
        return self

    # -- faults (what the runtimes feed besides messages) ----------------------------------
    def faults(self) -> list[tuple[str, str]]:
        out = []
        for side, m in (("sender", self.sender), ("receiver", self.receiver)):
            if m.timeout_name is not None:
                out.append(("timeout", side))
            if not m.finished:
                out.append(("local_abort", side))
        if self.link_up:
            out.append(("peer_lost", "both"))
        if self.write is not None and self.write_fate == "done":
            out.append(("write_fails", "sender"))
        if any(isinstance(e, ev.ChunkReceived) for e in self.to_receiver):
            out.append(("corrupt_chunk", "receiver"))
        if any(isinstance(e, ev.ResumeReceived) for e in self.to_sender):
            out.append(("corrupt_resume", "sender"))
        return out

    def inject(self, kind: str, side: str) -> None:
        if kind == "timeout":
            self.to(side, ev.Timeout())
        elif kind == "local_abort":
            self.to(side, ev.LocalAbort("cancelled"))
        elif kind == "peer_lost":
            # teardown: messages in flight are gone, the write in flight fails and can no
            # longer land (the transport confirmed it); each side hears about it in turn
            self.link_up = False
            self.to_sender.clear()
            self.to_receiver.clear()
            if self.write is not None:
                self.write_fate = "torn"
            self.lost_pending = ["sender", "receiver"]
            self.rng.shuffle(self.lost_pending)
        elif kind == "write_fails":
            self.write_fate = "fail"
        elif kind == "corrupt_chunk":
            i = next(i for i, e in enumerate(self.to_receiver) if isinstance(e, ev.ChunkReceived))
            c = self.to_receiver[i]
            assert isinstance(c, ev.ChunkReceived)
            self.to_receiver[i] = ev.ChunkReceived(
                c.round + 1, c.start, c.count, c.total_tokens, c.is_last, c.meta, c.digest
            )
        elif kind == "corrupt_resume":
            i = next(i for i, e in enumerate(self.to_sender) if isinstance(e, ev.ResumeReceived))
            r = self.to_sender[i]
            assert isinstance(r, ev.ResumeReceived)
            self.to_sender[i] = ev.ResumeReceived(
                r.round, r.blocks, r.capacity_tokens, r.received_tokens + 1
            )
        else:  # pragma: no cover
            raise AssertionError(kind)

    def settle(self) -> Link:
        """Run to quiescence; then let the deadlines of waiting states fire, as the runtimes'
        timers would, until nothing waits any more."""
        while True:
            self.run(randomly=True)
            if self.sender.state is S.NEW and not self.data_given:
                self._give_data()  # the caller's send() comes eventually
                continue
            waiting = [
                side
                for side, m in (("sender", self.sender), ("receiver", self.receiver))
                if m.timeout_name is not None
            ]
            if not waiting:
                return self
            self.to(self.rng.choice(waiting), ev.Timeout())

    # -- checks -----------------------------------------------------------------------------
    def messages(self, side: str, kind: type) -> list[Any]:
        return [a for s, a in self.sent if s == side and isinstance(a, kind)]

    def assert_no_leak(self) -> None:
        assert self.s_alloc is None and self.r_alloc is None
        assert self.write is None and self.staging is None
        assert self.current is None and not self.quarantined
        for pool in (self.spool, self.rpool):
            assert pool.idle, "blocks leaked"
            assert pool.grants == pool.returns

    def assert_one_outcome_each(self) -> None:
        for side in ("sender", "receiver"):
            assert len(self.outcomes[side]) == 1, (side, self.outcomes[side])

    def assert_done(self) -> None:
        assert self.sender.state is S.DONE
        assert self.receiver.state is R.DONE
        self.assert_one_outcome_each()
        assert all(isinstance(o, ev.Complete) for v in self.outcomes.values() for o in v)
        self.assert_tiles()
        self.assert_no_leak()

    def assert_tiles(self) -> None:
        """Deliver ranges tile [0, total) in order, rounds numbered 0, 1, 2, ..."""
        pos = 0
        for rnd, d in enumerate(self.deliveries):
            assert d.round == rnd
            assert d.start == pos
            pos += d.count
        assert pos == self.total
        inits = self.messages("receiver", ev.SendInit)
        resumes = self.messages("receiver", ev.SendResume)
        assert len(inits) == 1
        assert [r.round for r in resumes] == list(range(1, len(self.deliveries)))
        chunks = self.messages("sender", ev.SendChunkDone)
        assert [(c.round, c.start, c.count) for c in chunks] == [
            (d.round, d.start, d.count) for d in self.deliveries
        ]
        assert [c.is_last for c in chunks] == [False] * (len(chunks) - 1) + [True]

    @property
    def rounds(self) -> int:
        return len(self.deliveries)


# ---------------------------------------------------------------------- fixed scenarios


def test_known_length_single_round() -> None:
    link = Link(700, expected=700).start().run()
    link.assert_done()
    assert link.rounds == 1
    (init,) = link.messages("receiver", ev.SendInit)
    assert init.capacity_tokens == 700
    assert link.messages("receiver", ev.SendResume) == []
    assert link.deliveries == [ev.Deliver(0, 0, 700)]
    assert link.messages("sender", ev.SendChunkDone) == [ev.SendChunkDone(0, 0, 700, 700, True)]


def test_known_length_exactly_the_default() -> None:
    link = Link(1024).start().run()
    link.assert_done()
    assert link.rounds == 1


def test_the_original_scenario_2000_tokens_default_1024() -> None:
    link = Link(2000, block_size=128, default_tokens=1024).start().run()
    link.assert_done()
    assert link.rounds == 2
    (init,) = link.messages("receiver", ev.SendInit)
    assert (init.capacity_tokens, init.expected_tokens, len(init.blocks)) == (1024, None, 8)
    (resume,) = link.messages("receiver", ev.SendResume)
    assert (resume.round, resume.received_tokens, resume.capacity_tokens) == (1, 1024, 976)
    assert link.deliveries == [ev.Deliver(0, 0, 1024), ev.Deliver(1, 1024, 976)]
    assert link.messages("sender", ev.SendChunkDone) == [
        ev.SendChunkDone(0, 0, 1024, 2000, False),
        ev.SendChunkDone(1, 1024, 976, 2000, True),
    ]


def test_payload_larger_than_the_whole_receiver_pool() -> None:
    # receiver pool: 4 blocks of 16 = 64 tokens; payload: 1000 tokens
    link = Link(1000, block_size=16, default_tokens=64, recv_blocks=4, seed=3).start().run()
    link.assert_done()
    assert link.rounds == -(-1000 // 64)
    assert all(d.count == 64 for d in link.deliveries[:-1])
    assert link.deliveries[-1].count == 1000 - 64 * (link.rounds - 1)


def test_payload_larger_than_the_receiver_pool_with_partial_grants() -> None:
    link = Link(1000, block_size=16, default_tokens=64, recv_blocks=4, partial=True, seed=5)
    link.start().run(randomly=True)
    link.assert_done()
    assert link.rounds > 1000 // 64


def test_sender_pool_smaller_than_the_receiver_allocation() -> None:
    # sender stages at most 2 blocks of 128 = 256 tokens; receiver allocates 1024 per round
    link = Link(2000, send_blocks=2).start().run()
    link.assert_done()
    assert link.rounds == 2
    per_round = [[w for w in link.writes if w.round == r] for r in range(2)]
    assert [len(ws) for ws in per_round] == [4, 4]
    assert [(w.src_start, w.dst_start, w.count) for w in per_round[1]] == [
        (1024, 0, 256),
        (1280, 256, 256),
        (1536, 512, 256),
        (1792, 768, 208),
    ]
    assert len(link.messages("sender", ev.SendChunkDone)) == 2  # one per round, not per write


def test_tiny_pools_on_both_sides() -> None:
    link = Link(50, block_size=4, default_tokens=12, recv_blocks=2, send_blocks=1, seed=9)
    link.start().run(randomly=True)
    link.assert_done()
    assert link.rounds == -(-50 // 8)
    assert all(w.count <= 4 for w in link.writes)


@pytest.mark.parametrize("total", [100, 1024, 3000])
def test_init_before_data(total: int) -> None:
    link = Link(total, order="init_first").start()
    link.run()
    assert link.sender.state is S.DONE  # DataReady came after the sender sat in WAIT_DATA
    assert ("NEW", "InitReceived", "WAIT_DATA") in [
        (a.name, e, b.name) for a, e, b in link.sender.history
    ]
    link.assert_done()


@pytest.mark.parametrize("total", [100, 1024, 3000])
def test_data_before_init(total: int) -> None:
    link = Link(total, order="data_first").start().run()
    assert link.sender.history[0][:2] == (S.NEW, "DataReady")
    assert link.sender.history[1][:2] == (S.WAIT_INIT, "InitReceived")
    link.assert_done()


def test_lease_single_round_in_place() -> None:
    link = Link(300, expected=300, whole=True).start().run()
    link.assert_done()
    (complete,) = link.outcomes["receiver"]
    assert isinstance(complete, ev.Complete) and complete.in_place


def test_lease_longer_than_announced_falls_back_to_rounds() -> None:
    link = Link(3000, expected=1000, whole=True).start().run()
    link.assert_done()
    assert link.rounds == 2
    (complete,) = link.outcomes["receiver"]
    assert isinstance(complete, ev.Complete) and not complete.in_place


def test_scrambled_blocks_are_respected() -> None:
    """The free list is shuffled: the blocks a round uses are rarely consecutive, yet every
    write names the round whose blocks the sender was given."""
    link = Link(5000, block_size=16, default_tokens=200, recv_blocks=20, seed=1).start()
    link.run(randomly=True)
    link.assert_done()
    assert any(list(a.blocks) != sorted(a.blocks) for a in link.by_round.values())


def test_every_token_written_exactly_once() -> None:
    link = (
        Link(
            3333,
            block_size=32,
            default_tokens=500,
            recv_blocks=10,
            send_blocks=3,
            partial=True,
            seed=11,
        )
        .start()
        .run(randomly=True)
    )
    link.assert_done()
    written = sorted(t for w in link.writes for t in range(w.src_start, w.src_start + w.count))
    assert written == list(range(3333))


# --------------------------------------------------------------------- property tests


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(1, 5000),
    block_size=st.sampled_from([4, 16, 128]),
    default_blocks=st.integers(1, 16),
    recv_blocks=st.integers(1, 64),
    send_blocks=st.integers(1, 64),
    partial=st.booleans(),
    round_up=st.booleans(),
    order=st.sampled_from(["data_first", "init_first", "any"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_every_token_delivered_once_no_leak(
    total: int,
    block_size: int,
    default_blocks: int,
    recv_blocks: int,
    send_blocks: int,
    partial: bool,
    round_up: bool,
    order: str,
    seed: int,
) -> None:
    link = Link(
        total,
        block_size=block_size,
        default_tokens=default_blocks * block_size,
        recv_blocks=recv_blocks,
        send_blocks=send_blocks,
        partial=partial,
        round_up=round_up,
        order=order,
        seed=seed,
    )
    link.start().run(randomly=True)
    link.assert_done()
    if not partial:  # each round fills what the pool allows, so the count is known
        per_round = min(default_blocks, recv_blocks) * block_size
        later = recv_blocks * block_size
        expected_rounds = 1 if total <= per_round else 1 + -(-(total - per_round) // later)
        assert link.rounds == expected_rounds


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 3000),
    block_size=st.sampled_from([4, 16, 128]),
    default_blocks=st.integers(1, 8),
    recv_blocks=st.integers(1, 32),
    send_blocks=st.integers(1, 32),
    partial=st.booleans(),
    order=st.sampled_from(["data_first", "init_first", "any"]),
    faults=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 2**16)), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_faults_end_cleanly(
    total: int,
    block_size: int,
    default_blocks: int,
    recv_blocks: int,
    send_blocks: int,
    partial: bool,
    order: str,
    faults: list[tuple[int, int]],
    seed: int,
) -> None:
    """A timeout, a cancellation, a lost peer, a failed write or a bad message (which makes
    the peer receive an Abort) at random steps: both machines end DONE or FAILED (the
    receiver's QUARANTINED is released by AbortAck/Abort/PeerLost before the end), every
    allocation is given back, no write ever lands in given-back blocks, and each side reports
    exactly one outcome."""
    # BUG: currently fails through the missing (FAILED, InitReceived) and
    # (FAILED, ResumeReceived) sender entries (see test_protocol_sender.py, test_late_*).
    link = Link(
        total,
        block_size=block_size,
        default_tokens=default_blocks * block_size,
        recv_blocks=recv_blocks,
        send_blocks=send_blocks,
        partial=partial,
        order=order,
        seed=seed,
    ).start()
    schedule = sorted(faults)
    while True:
        while schedule and schedule[0][0] <= link.steps:
            _, pick = schedule.pop(0)
            options = link.faults()
            if options:
                link.inject(*options[pick % len(options)])
        steps = link.available()
        if not steps:
            if not schedule:
                break
            link.steps = schedule[0][0]  # nothing to do until the next fault
            continue
        link.step(link.rng.choice(steps))
        assert link.steps < 200_000
    link.settle()

    assert link.sender.state in (S.DONE, S.FAILED)
    assert link.receiver.state in (R.DONE, R.FAILED)
    link.assert_no_leak()
    link.assert_one_outcome_each()
    for side, done in (
        ("sender", link.sender.state is S.DONE),
        ("receiver", link.receiver.state is R.DONE),
    ):
        (outcome,) = link.outcomes[side]
        assert isinstance(outcome, ev.Complete) == done
        if isinstance(outcome, ev.Fail):
            assert isinstance(outcome.error, TransferError)
    if link.receiver.state is R.DONE:
        link.assert_tiles()


# ------------------------------------------------------------- targeted fault scenarios


def drive_until(link: Link, predicate: Any) -> Link:
    while not predicate(link):
        steps = link.available()
        assert steps, "stalled before the point of interest"
        link.step(steps[0])
    return link


def test_receiver_timeout_while_sender_writes_quarantines_until_ack() -> None:
    link = drive_until(Link(2000).start(), lambda k: k.sender.state is S.WRITING)
    link.to("receiver", ev.Timeout())
    assert link.receiver.state is R.QUARANTINED
    assert link.quarantined and link.rpool.free_tokens < 64 * 128
    link.run()  # the abort reaches the sender mid-write: it drains, then acks
    assert link.sender.state is S.FAILED and link.receiver.state is R.FAILED
    assert [a for _, a in link.sent if isinstance(a, ev.SendAbortAck)] == [ev.SendAbortAck()]
    link.assert_no_leak()
    (fail,) = link.outcomes["receiver"]
    assert isinstance(fail, ev.Fail) and type(fail.error).__name__ == "TransferTimeout"
    (fail,) = link.outcomes["sender"]
    assert isinstance(fail, ev.Fail) and type(fail.error).__name__ == "TransferAborted"


def test_sender_cancel_mid_write_drains_before_abort() -> None:
    link = drive_until(Link(2000).start(), lambda k: k.sender.state is S.WRITING)
    link.to("sender", ev.LocalAbort("shutdown"))
    assert link.sender.state is S.DRAINING
    assert not link.to_receiver  # nothing said before the write ends
    link.run()
    assert link.receiver.state is R.FAILED
    link.assert_no_leak()


def test_peer_lost_mid_write() -> None:
    link = drive_until(Link(2000).start(), lambda k: k.sender.state is S.WRITING)
    link.inject("peer_lost", "both")
    link.step("lost")
    link.step("lost")  # both sides hear of it before the torn write reports
    assert link.sender.state is S.DRAINING
    assert link.receiver.state is R.FAILED  # teardown confirmed: freed at once
    link.run()
    assert link.sender.state is S.FAILED
    for side in ("sender", "receiver"):
        (fail,) = link.outcomes[side]
        assert isinstance(fail, ev.Fail) and type(fail.error).__name__ == "PeerLost"
    link.assert_no_leak()


def test_peer_lost_mid_write_reported_by_the_write_first() -> None:
    link = drive_until(Link(2000).start(), lambda k: k.sender.state is S.WRITING)
    link.inject("peer_lost", "both")
    link.step("write")  # the transport fails the write before the heartbeat notices
    assert link.sender.state is S.FAILED
    link.run()
    assert link.receiver.state is R.FAILED
    (fail,) = link.outcomes["sender"]
    # the caller sees a plain TransferError ("write ... failed"), not PeerLost
    assert isinstance(fail, ev.Fail) and type(fail.error) is TransferError
    link.assert_no_leak()


def test_corrupt_chunk_crossing_the_last_round() -> None:
    link = drive_until(Link(500).start(), lambda k: bool(k.to_receiver))
    link.inject("corrupt_chunk", "receiver")
    link.run()  # sender DONE acks the late abort; the quarantine is released
    assert link.sender.state is S.DONE and link.receiver.state is R.FAILED
    link.assert_no_leak()


def test_late_resume_after_sender_cancel() -> None:
    # BUG: the sender raises ProtocolError on the Resume that crossed its Abort
    # (missing (FAILED, ResumeReceived) entry; see test_protocol_sender.py).
    link = drive_until(Link(2000).start(), lambda k: bool(k.to_sender) and k.rounds == 1)
    assert isinstance(link.to_sender[0], ev.ResumeReceived)
    link.to("sender", ev.LocalAbort("cancel"))
    link.run()
    assert link.sender.state is S.FAILED and link.receiver.state is R.FAILED
    link.assert_no_leak()


def test_late_init_after_sender_init_timeout() -> None:
    # BUG: the sender raises ProtocolError on the Init that crossed its WAIT_INIT timeout
    # (missing (FAILED, InitReceived) entry; see test_protocol_sender.py).
    link = drive_until(Link(2000).start(), lambda k: bool(k.to_sender))
    assert isinstance(link.to_sender[0], ev.InitReceived)
    link.to("sender", ev.Timeout())
    link.settle()
    assert link.sender.state is S.FAILED and link.receiver.state is R.FAILED
    link.assert_no_leak()
