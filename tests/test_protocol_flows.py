"""A SenderMachine and a ReceiverMachine connected through a tiny synchronous driver.

The driver plays both runtimes and the data plane: it turns Send* actions into the peer's
*Received events (one FIFO per direction, like the control connection), grants Alloc actions
from a fake block pool per side (scrambled free lists, optionally partial grants), runs Write
actions by copying token ids into the receiver allocation the write names, and answers them
with WriteDone. The data plane keeps the promises of one guarantee kind (protocol_samples):

* ``remote_completion``: a write lands before the sender hears WriteDone; without it the
  bytes may still be on the way afterwards (they land in a later, separate step; the
  receiver's runtime waits for a round's bytes before it takes that round's ChunkDone);
* ``fences_tag``: a Fence drops the round's bytes still on the way, and any later ones;
* ``remove_stops_inbound``: a lost peer's writes never land; without it they still may, and
  the receiver hears PeerLost(inbound_stopped=False);
* the grant's expiry: the receiver's EXPIRING deadline passes only once every write posted
  for that grant ended, and none is posted after it.

It checks every action against what the runtime would need: Deliver ranges read exactly the
tokens that were written, no write lands in blocks the receiver gave back (or gives them back
while a write may still land), nothing is held across an Alloc (no hold-and-wait), every
grant is given back exactly once, and every Write carries its grant's deadline.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_samples import GUARANTEES, KINDS

from emtransfer.errors import TransferError
from emtransfer.protocol import events as ev
from emtransfer.protocol.receiver import ReceiverMachine, ReceiverState
from emtransfer.protocol.sender import SenderMachine, SenderState

S, R = SenderState, ReceiverState
RID = "req-flow"
META = {"mrope_position_delta": 7}
DIGEST = "sha256:0123"
LINGER = (R.QUARANTINED, R.EXPIRING)
#: what may release an allocation the receiver gave up on, by guarantee kind: an ack (or the
#: sender's Abort) only with remote completion, a fence only where the engine fences, a lost
#: peer only where the transport stopped its writes, the grant's expiry only where nothing
#: else can prove it (elsewhere a proof always comes first)
RELEASED_BY = {
    "nixl": {"AbortAck", "Abort", "expiry"},
    "tcp": {"Fenced", "PeerLost(stopped)"},
    "local": {"AbortAck", "Abort", "Fenced", "PeerLost(stopped)"},
    "none": {"expiry"},
}


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


@dataclass(eq=False)
class Flight:
    """A write between its posting and its end on the receiver's side."""

    write: ev.Write
    dst: Allocation
    #: land | fail (the engine fails it) | torn (the peer's removal stopped it) | fenced
    #: (discarded by the receiver's fence) | expired (posted after its grant's deadline: the
    #: engine refuses it)
    fate: str = "land"
    #: the sender still waits for it; False: it completed there and its bytes are on the way
    posted: bool = True


# ------------------------------------------------------------------------------ driver


class Link:
    """One request between a sender and a receiver, driven step by step."""

    def __init__(
        self,
        total: int,
        *,
        kind: str = "local",
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
        hold_late_abort: bool = True,
        min_grant: int = 1,
        pipeline: bool = True,
        prefetch_rate: float = 1.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.total, self.order, self.partial, self.round_up = total, order, partial, round_up
        self.expected, self.whole = expected, whole
        self.kind, self.g = kind, GUARANTEES[kind]
        #: hold_late_abort: deliver an Abort to a sender with an abandoned write only once
        #: the write ended (the default schedule); False tries the other order too
        self.hold_late_abort = hold_late_abort
        self.sender = SenderMachine(RID, block_size=block_size, remote_num_blocks=recv_blocks)
        self.receiver = ReceiverMachine(
            RID,
            block_size=block_size,
            default_tokens=min(default_tokens, recv_blocks * block_size),
            guarantees=self.g,
            pool_tokens=recv_blocks * block_size,
            min_grant_tokens=min_grant,
            pipeline=pipeline,
        )  # fmt: skip  (as the runtime builds it: default_blocks <= num_blocks)
        #: the share of prefetches the runtime can serve at once (the rest find no free blocks)
        self.prefetch_rate = prefetch_rate
        self.prefetches: list[str] = []  # granted | refused, in order
        self.spool = Pool(send_blocks, block_size, self.rng)
        self.rpool = Pool(recv_blocks, block_size, self.rng)
        self.to_sender: deque[ev.Event] = deque()
        self.to_receiver: deque[ev.Event] = deque()
        self.link_up = True
        # sender side
        self.s_alloc: ev.Alloc | None = None
        self.staging: Allocation | None = None
        self.staging_after_write = False  # FreeStagingAfterWrite: give it back when it ends
        self.flights: list[Flight] = []  # the data plane: posted and on-the-way writes
        self.data_given = False
        # receiver side
        self.r_alloc: ev.Alloc | None = None
        self.held: dict[int, Allocation] = {}  # round -> allocation: current, prefetched
        self.by_round: dict[int, Allocation] = {}
        self.deadlines: dict[int, float] = {}  # round -> its grant's write deadline
        self.quarantined: list[Allocation] = []
        self.fence_pending: set[int] | None = None  # the rounds a Fence was asked for
        self.fence_fails = False
        self.fenced_rounds: set[int] = set()
        self.expired_rounds: set[int] = set()
        self.delivered = 0
        # observations
        self.sent: list[Any] = []  # every message, in order: (side, action)
        self.writes: list[ev.Write] = []
        self.deliveries: list[ev.Deliver] = []
        self.outcomes: dict[str, list[ev.Action]] = {"sender": [], "receiver": []}
        self.releases: list[str] = []  # what released each allocation given up on
        self.teardowns = 0
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
            before = self.receiver.state
            if isinstance(event, ev.Timeout) and before is R.EXPIRING:
                self._expire()
            acts = self.receiver.handle(event)
            gave_up = before in LINGER or (
                before is R.WAIT_CHUNK and not isinstance(event, ev.ChunkReceived)
            )
            if gave_up and any(isinstance(a, (ev.Free, ev.ReleaseQuarantine)) for a in acts):
                self.releases.append(_proof(before, event))
            for a in acts:
                self._receiver_action(a)
            if self.r_alloc is not None and self.receiver.state is not R.ALLOCATING:
                self.r_alloc = None

    def _send(self, side: str, action: ev.Action, event: ev.Event) -> None:
        self.sent.append((side, action))
        if self.link_up:
            (self.to_receiver if side == "sender" else self.to_sender).append(event)

    # -- the data plane -------------------------------------------------------------------
    @property
    def posted(self) -> Flight | None:
        posted = [f for f in self.flights if f.posted]
        assert len(posted) <= 1
        return posted[0] if posted else None

    def _may_land_into(self, alloc: Allocation) -> list[Flight]:
        return [f for f in self.flights if f.dst is alloc and f.fate == "land"]

    def _check_no_write_into(self, alloc: Allocation) -> None:
        for f in self._may_land_into(alloc):
            raise Corruption(f"blocks {alloc.blocks} given back while {f.write} may land")

    def _land(self, f: Flight) -> None:
        assert f.fate == "land"
        if f.dst.status == "freed":
            raise Corruption(f"{f.write} landed in freed blocks {f.dst.blocks}")
        for i in range(f.write.count):
            f.dst.content[f.write.dst_start + i] = f.write.src_start + i
        self.flights.remove(f)

    def _drop(self, flights: list[Flight], fate: str) -> None:
        """These writes will never land: the posted one ends without, the rest vanish."""
        for f in flights:
            if f.posted:
                f.fate = fate if f.fate == "land" else f.fate
            else:
                self.flights.remove(f)

    def _expire(self) -> None:
        """The grants of the quarantined allocations expired: the driver allowed this only
        once every write for them ended (the engine's post bound), and no later one is
        posted."""
        assert self.quarantined
        for q in self.quarantined:
            assert not self._may_land_into(q), "expiry before the engine's post bound"
            self.expired_rounds.add(q.round)

    def expiry_allowed(self) -> bool:
        """The last grant's expiry comes after every write posted for it ended, and long after
        a teardown's PeerLost."""
        if self.receiver.state is not R.EXPIRING:
            return True
        landing = any(self._may_land_into(q) for q in self.quarantined)
        return not landing and "receiver" not in self.lost_pending

    def _link_down(self) -> None:
        """Teardown: messages in flight are gone; writes too, where the transport stops a
        removed peer's writes; each side hears about it in turn."""
        self.link_up = False
        self.to_sender.clear()
        self.to_receiver.clear()
        if self.g.remove_stops_inbound:
            self._drop(list(self.flights), "torn")
        self.lost_pending = ["sender", "receiver"]
        self.rng.shuffle(self.lost_pending)

    # -- the sender's runtime -------------------------------------------------------------
    def _sender_action(self, a: ev.Action) -> None:
        if isinstance(a, ev.Alloc):
            assert self.staging is None, "sender holds staging while it allocates more"
            assert self.s_alloc is None
            assert 1 <= a.min_tokens <= a.num_tokens
            self.s_alloc = a
        elif isinstance(a, ev.Write):
            assert self.staging is not None and self.posted is None
            assert 0 < a.count <= self.staging.capacity
            assert a.src_start >= 0 and a.src_start + a.count <= self.total
            dst = self.by_round[a.round]
            assert self.sender.dest_blocks == dst.blocks, "writing into another round's blocks"
            assert a.dst_start + a.count <= dst.capacity
            assert a.deadline == self.deadlines[a.round], "the write lost its grant's deadline"
            self.writes.append(a)
            f = Flight(a, dst)
            if a.round in self.expired_rounds:
                f.fate = "expired"
            elif a.round in self.fenced_rounds:
                f.fate = "fenced"
            elif not self.link_up and self.g.remove_stops_inbound:
                f.fate = "torn"  # after teardown nothing reaches the peer any more
            elif dst.status == "freed":
                raise Corruption(f"{a} targets freed blocks {dst.blocks}")
            self.flights.append(f)
        elif isinstance(a, ev.FreeStaging):
            assert self.staging is not None and self.posted is None
            self.spool.give_back(self.staging)
            self.staging = None
        elif isinstance(a, ev.FreeStagingAfterWrite):
            assert self.staging is not None and self.posted is not None
            self.staging_after_write = True
        elif isinstance(a, ev.SendTotal):
            assert a.total_tokens == self.total and self.sender.round == 0
            assert not self.messages("sender", ev.SendTotal), "Total said twice"
            self._send("sender", a, ev.TotalReceived(a.total_tokens))
        elif isinstance(a, ev.SendChunkDone):
            meta, digest = (self.sender.meta, self.sender.digest) if a.is_last else (None, None)
            msg = ev.ChunkReceived(
                a.round, a.start, a.count, a.total_tokens, a.is_last, meta, digest
            )
            self._send("sender", a, msg)
        elif isinstance(a, ev.SendAbort):
            assert self.posted is None, "Abort sent while a write is in flight"
            self._send("sender", a, ev.AbortReceived(a.reason))
        elif isinstance(a, ev.SendAbortAck):
            self._send("sender", a, ev.AbortAckReceived())
        elif isinstance(a, (ev.Complete, ev.Fail)):
            self.outcomes["sender"].append(a)
        else:
            raise AssertionError(f"sender emitted {a}")

    # -- the receiver's runtime -----------------------------------------------------------
    def _deadline(self, rnd: int) -> float:
        self.deadlines[rnd] = 1_000.0 + 10.0 * rnd + self.rng.random()
        return self.deadlines[rnd]

    def _receiver_action(self, a: ev.Action) -> None:
        if isinstance(a, ev.Alloc):
            assert not self.held, "receiver holds an allocation while it allocates"
            assert self.r_alloc is None and not self.quarantined
            assert 1 <= a.min_tokens <= a.num_tokens
            self.r_alloc = a
        elif isinstance(a, ev.Prefetch):
            # taken now or never: the runtime never waits while it holds the current round
            assert self.receiver.state is R.WAIT_CHUNK and not self.quarantined
            assert list(self.held) == [self.receiver.round], "prefetch beside a prefetch"
            assert 1 <= a.min_tokens <= a.num_tokens
            self._prefetch(a)
        elif isinstance(a, ev.SendInit):
            cur = self.held.get(0)
            assert cur is not None and cur.round == 0
            assert (a.blocks, a.capacity_tokens) == (cur.blocks, cur.capacity)
            msg = ev.InitReceived(a.blocks, a.capacity_tokens, a.expected_tokens, self._deadline(0))
            self._send("receiver", a, msg)
        elif isinstance(a, ev.SendResume):
            cur = self.held.get(a.round)
            assert cur is not None and cur.round == a.round >= 1
            assert (a.blocks, a.capacity_tokens) == (cur.blocks, cur.capacity)
            if a.round == self.receiver.round:  # granted after the previous round was in
                assert a.received_tokens == self.delivered
            else:  # prefetched: it starts where the round on the wire ends (filled)
                assert a.round == self.receiver.round + 1
                assert a.received_tokens == self.delivered + self.held[a.round - 1].capacity
            resume = ev.ResumeReceived(
                a.round, a.blocks, a.capacity_tokens, a.received_tokens, self._deadline(a.round)
            )
            self._send("receiver", a, resume)
        elif isinstance(a, ev.Deliver):
            cur = self.held.get(a.round)
            assert cur is not None and cur.round == a.round
            assert a.start == self.delivered, "Deliver out of order"
            assert 0 < a.count <= cur.capacity
            got = [cur.content.get(i) for i in range(a.count)]
            assert got == list(range(a.start, a.start + a.count)), "wrong bytes delivered"
            self.delivered += a.count
            self.deliveries.append(a)
        elif isinstance(a, ev.Free):
            rounds = list(self.held) if a.round is None else [a.round]
            assert rounds and all(r in self.held for r in rounds)
            for r in rounds:
                self._check_no_write_into(self.held[r])
                self.rpool.give_back(self.held.pop(r))
        elif isinstance(a, ev.Quarantine):
            assert self.held and not self.quarantined
            for q in self.held.values():
                q.status = "quarantined"
                self.quarantined.append(q)
            self.held = {}
        elif isinstance(a, ev.Fence):
            assert self.g.fences_tag, "Fence asked of an engine that cannot fence"
            assert self.quarantined and self.fence_pending is None
            self.fence_pending = {q.round for q in self.quarantined}
        elif isinstance(a, ev.ReleaseQuarantine):
            assert self.quarantined
            for q in self.quarantined:
                self._check_no_write_into(q)
                self.rpool.give_back(q)
            self.quarantined = []
        elif isinstance(a, ev.TearDownPeer):
            assert self.quarantined and self.teardowns == 0
            self.teardowns += 1
            if self.link_up:
                self._link_down()
        elif isinstance(a, ev.SendAbort):
            self._send("receiver", a, ev.AbortReceived(a.reason))
        elif isinstance(a, ev.Complete):
            assert a.total_tokens == self.total
            assert (a.meta, a.digest) == (META, DIGEST)
            if a.in_place:  # the lease: read in place, then the lease closes and frees
                cur = self.held.get(0)
                assert cur is not None and list(self.held) == [0] and self.delivered == 0
                assert [cur.content.get(i) for i in range(self.total)] == list(range(self.total))
                self.delivered = self.total
                self.deliveries.append(ev.Deliver(0, 0, self.total))
                self._check_no_write_into(cur)
                self.rpool.give_back(self.held.pop(0))
            else:
                assert not self.held and self.delivered == self.total
            self.outcomes["receiver"].append(a)
        elif isinstance(a, ev.Fail):
            self.outcomes["receiver"].append(a)
        else:
            raise AssertionError(f"receiver emitted {a}")

    def _prefetch(self, a: ev.Prefetch) -> None:
        """The runtime's answer, at once: blocks free now (as often as ``prefetch_rate``
        says), or a refusal."""
        pool = self.rpool
        can = pool.free_tokens >= a.min_tokens and self.rng.random() < self.prefetch_rate
        if not can:
            self.prefetches.append("refused")
            self.to("receiver", ev.PrefetchRefused())
            return
        hi = min(a.num_tokens, pool.free_tokens)
        tokens = self.rng.randint(a.min_tokens, hi) if self.partial else hi
        alloc = pool.grant(tokens, self.round_up)
        alloc.round = self.receiver.round + 1
        self.by_round[alloc.round] = alloc
        self.held[alloc.round] = alloc
        self.prefetches.append("granted")
        self.to("receiver", ev.Prefetched(alloc.blocks, alloc.capacity))

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
            alloc.round = self.receiver.round
            self.by_round[alloc.round] = alloc
            self.held[alloc.round] = alloc
            self.r_alloc = None
        self.to(side, ev.AllocGranted(alloc.blocks, alloc.capacity))

    def _finish_write(self) -> None:
        """The posted write ends on the sender's side."""
        f = self.posted
        assert f is not None
        f.posted = False
        if f.fate == "land":
            if self.g.remote_completion:
                self._land(f)  # else its bytes are still on the way: see _land_one
            event: ev.Event = ev.WriteDone()
        elif f.fate == "fenced":  # the bytes left us; the receiver's engine drops them
            self.flights.remove(f)
            event = ev.WriteDone()
        else:
            self.flights.remove(f)
            event = ev.WriteFailed(f.fate)
        if self.staging_after_write:
            assert self.staging is not None
            self.spool.give_back(self.staging)
            self.staging, self.staging_after_write = None, False
        self.to("sender", event)

    def _land_one(self) -> None:
        self._land(next(f for f in self.flights if not f.posted))

    def _to_receiver(self) -> None:
        e = self.to_receiver.popleft()
        if (
            isinstance(e, ev.ChunkReceived)
            and self.receiver.state is R.WAIT_CHUNK
            and self.receiver.chunk_error(e) is None
        ):
            # the receiver's runtime waits for the round's bytes before it takes the chunk
            for f in [f for f in self.flights if f.write.round == e.round]:
                assert not f.posted
                self._land(f)
        self.to("receiver", e)

    def _fence(self) -> None:
        rounds, self.fence_pending = self.fence_pending, None
        assert rounds
        if self.fence_fails:
            self.fence_fails = False
            self.to("receiver", ev.FenceFailed("the engine cannot fence now"))
            return
        self.fenced_rounds |= rounds
        self._drop([f for f in self.flights if f.write.round in rounds], "fenced")
        self.to("receiver", ev.Fenced())

    def _give_data(self) -> None:
        self.data_given = True
        self.to("sender", ev.DataReady(self.total, META, DIGEST))

    def _deliver_lost(self) -> None:
        side = self.lost_pending.pop(0)
        m = self.sender if side == "sender" else self.receiver
        if not m.finished:  # the runtime tells the live requests of that peer
            stopped = self.g.remove_stops_inbound
            self.to(side, ev.PeerLost("heartbeat missed", inbound_stopped=stopped))

    def _holds_late_abort(self) -> bool:
        return (
            self.hold_late_abort
            and self.staging_after_write
            and isinstance(self.to_sender[0], ev.AbortReceived)
        )

    def available(self) -> list[str]:
        steps = []
        if self.to_receiver:
            steps.append("to_receiver")
        if self.to_sender and not self._holds_late_abort():
            steps.append("to_sender")
        if self.r_alloc is not None and self.rpool.free_tokens >= self.r_alloc.min_tokens:
            steps.append("grant_receiver")
        if self.s_alloc is not None and self.spool.free_tokens >= self.s_alloc.min_tokens:
            steps.append("grant_sender")
        if self.posted is not None:
            steps.append("write")
        if any(not f.posted for f in self.flights):
            steps.append("land")
        if self.fence_pending is not None:
            steps.append("fence")
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
            self._to_receiver()
        elif name == "to_sender":
            self.to("sender", self.to_sender.popleft())
        elif name == "grant_receiver":
            self._grant("receiver")
        elif name == "grant_sender":
            self._grant("sender")
        elif name == "write":
            self._finish_write()
        elif name == "land":
            self._land_one()
        elif name == "fence":
            self._fence()
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
            if m.timeout_name is not None and (side == "sender" or self.expiry_allowed()):
                out.append(("timeout", side))
            if not m.finished:
                out.append(("local_abort", side))
        if self.link_up:
            out.append(("peer_lost", "both"))
        if self.posted is not None and self.posted.fate == "land":
            out.append(("write_fails", "sender"))
        if self.fence_pending is not None and not self.fence_fails:
            out.append(("fence_fails", "receiver"))
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
            self._link_down()
        elif kind == "write_fails":
            assert self.posted is not None
            self.posted.fate = "fail"
        elif kind == "fence_fails":
            self.fence_fails = True
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
                r.round, r.blocks, r.capacity_tokens, r.received_tokens + 1, r.deadline
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
            assert self.expiry_allowed()  # quiescent: every write ended
            self.to(self.rng.choice(waiting), ev.Timeout())

    # -- checks -----------------------------------------------------------------------------
    def messages(self, side: str, kind: type) -> list[Any]:
        return [a for s, a in self.sent if s == side and isinstance(a, kind)]

    def assert_no_leak(self) -> None:
        assert self.s_alloc is None and self.r_alloc is None
        assert not self.flights and self.staging is None and not self.staging_after_write
        assert not self.held and not self.quarantined
        assert self.fence_pending is None
        for pool in (self.spool, self.rpool):
            assert pool.idle, "blocks leaked"
            assert pool.grants == pool.returns

    def assert_released_by_proof(self) -> None:
        """Every allocation given up on was released by what this kind's engine can prove."""
        assert set(self.releases) <= RELEASED_BY[self.kind], (self.kind, self.releases)
        assert len(self.releases) <= 1
        assert self.teardowns <= 1

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
        assert self.releases == [] and self.teardowns == 0

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


def _proof(state: ReceiverState, event: ev.Event) -> str:
    """Name what made the receiver give back an allocation it had given up on."""
    if isinstance(event, ev.PeerLost):
        return "PeerLost(stopped)" if event.inbound_stopped else "PeerLost(open)"
    if isinstance(event, ev.Timeout):
        return "expiry" if state is R.EXPIRING else f"Timeout in {state.name}"
    return {ev.AbortAckReceived: "AbortAck", ev.AbortReceived: "Abort"}.get(
        type(event), type(event).__name__
    )


# ---------------------------------------------------------------------- fixed scenarios


@pytest.mark.parametrize("kind", KINDS)
def test_known_length_single_round(kind: str) -> None:
    link = Link(kind=kind, total=700, expected=700).start().run()
    link.assert_done()
    assert link.rounds == 1
    (init,) = link.messages("receiver", ev.SendInit)
    assert init.capacity_tokens == 700
    assert link.messages("receiver", ev.SendResume) == []
    assert link.deliveries == [ev.Deliver(0, 0, 700)]
    assert link.messages("sender", ev.SendChunkDone) == [ev.SendChunkDone(0, 0, 700, 700, True)]


@pytest.mark.parametrize("kind", KINDS)
def test_known_length_exactly_the_default(kind: str) -> None:
    link = Link(kind=kind, total=1024).start().run()
    link.assert_done()
    assert link.rounds == 1


@pytest.mark.parametrize("kind", KINDS)
def test_the_original_scenario_2000_tokens_default_1024(kind: str) -> None:
    link = Link(kind=kind, total=2000, block_size=128, default_tokens=1024).start().run()
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


@pytest.mark.parametrize("kind", KINDS)
def test_payload_larger_than_the_whole_receiver_pool(kind: str) -> None:
    # receiver pool: 4 blocks of 16 = 64 tokens; payload: 1000 tokens
    link = (
        Link(kind=kind, total=1000, block_size=16, default_tokens=64, recv_blocks=4, seed=3)
        .start()
        .run()
    )
    link.assert_done()
    assert link.rounds == -(-1000 // 64)
    assert all(d.count == 64 for d in link.deliveries[:-1])
    assert link.deliveries[-1].count == 1000 - 64 * (link.rounds - 1)


@pytest.mark.parametrize("kind", KINDS)
def test_payload_larger_than_the_receiver_pool_with_partial_grants(kind: str) -> None:
    link = Link(
        kind=kind, total=1000, block_size=16, default_tokens=64, recv_blocks=4, partial=True, seed=5
    )
    link.start().run(randomly=True)
    link.assert_done()
    assert link.rounds > 1000 // 64


@pytest.mark.parametrize("kind", KINDS)
def test_sender_pool_smaller_than_the_receiver_allocation(kind: str) -> None:
    # sender stages at most 2 blocks of 128 = 256 tokens; receiver allocates 1024 per round
    link = Link(kind=kind, total=2000, send_blocks=2).start().run()
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


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_pools_on_both_sides(kind: str) -> None:
    link = Link(
        kind=kind, total=50, block_size=4, default_tokens=12, recv_blocks=2, send_blocks=1, seed=9
    )
    link.start().run(randomly=True)
    link.assert_done()
    assert link.rounds == -(-50 // 8)
    assert all(w.count <= 4 for w in link.writes)


@pytest.mark.parametrize("total", [100, 1024, 3000])
@pytest.mark.parametrize("kind", KINDS)
def test_init_before_data(total: int, kind: str) -> None:
    link = Link(kind=kind, total=total, order="init_first").start()
    link.run()
    assert link.sender.state is S.DONE  # DataReady came after the sender sat in WAIT_DATA
    assert ("NEW", "InitReceived", "WAIT_DATA") in [
        (a.name, e, b.name) for a, e, b in link.sender.history
    ]
    link.assert_done()


@pytest.mark.parametrize("total", [100, 1024, 3000])
@pytest.mark.parametrize("kind", KINDS)
def test_data_before_init(total: int, kind: str) -> None:
    link = Link(kind=kind, total=total, order="data_first").start().run()
    assert link.sender.history[0][:2] == (S.NEW, "DataReady")
    assert link.sender.history[1][:2] == (S.WAIT_INIT, "InitReceived")
    link.assert_done()


@pytest.mark.parametrize("kind", KINDS)
def test_lease_single_round_in_place(kind: str) -> None:
    link = Link(kind=kind, total=300, expected=300, whole=True).start().run()
    link.assert_done()
    (complete,) = link.outcomes["receiver"]
    assert isinstance(complete, ev.Complete) and complete.in_place


@pytest.mark.parametrize("kind", KINDS)
def test_lease_longer_than_announced_falls_back_to_rounds(kind: str) -> None:
    link = Link(kind=kind, total=3000, expected=1000, whole=True).start().run()
    link.assert_done()
    assert link.rounds == 2
    (complete,) = link.outcomes["receiver"]
    assert isinstance(complete, ev.Complete) and not complete.in_place


@pytest.mark.parametrize("kind", KINDS)
def test_scrambled_blocks_are_respected(kind: str) -> None:
    """The free list is shuffled: the blocks a round uses are rarely consecutive, yet every
    write names the round whose blocks the sender was given."""
    link = Link(
        kind=kind, total=5000, block_size=16, default_tokens=200, recv_blocks=20, seed=1
    ).start()
    link.run(randomly=True)
    link.assert_done()
    assert any(list(a.blocks) != sorted(a.blocks) for a in link.by_round.values())


@pytest.mark.parametrize("kind", KINDS)
def test_every_token_written_exactly_once(kind: str) -> None:
    link = (
        Link(
            kind=kind,
            total=3333,
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


@pytest.mark.parametrize("kind", KINDS)
def test_every_write_carries_its_grants_deadline(kind: str) -> None:
    """Each round's writes carry the deadline of the Init or Resume that granted the round
    (the driver checks every Write against it), and every round has a deadline of its own."""
    link = Link(1000, kind=kind, block_size=16, default_tokens=64, recv_blocks=6, send_blocks=2)
    link.start().run(randomly=True)
    link.assert_done()
    by_round = {w.round: w.deadline for w in link.writes}
    assert len(link.writes) > len(by_round) > 1  # several writes per round, several rounds
    assert by_round == link.deadlines
    assert len(set(by_round.values())) == len(by_round)


@pytest.mark.parametrize("kind", KINDS)
def test_without_remote_completion_the_chunk_waits_for_the_bytes(kind: str) -> None:
    link = drive_until(Link(2000, kind=kind).start(), _chunk_on_the_way)
    on_the_way = [f for f in link.flights if not f.posted]
    if GUARANTEES[kind].remote_completion:
        assert on_the_way == []  # WriteDone meant: in the receiver's pool
    else:
        assert on_the_way and all(f.write.round == 0 for f in on_the_way)
    link.run()
    link.assert_done()


# --------------------------------------------------------------------- property tests


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=100, deadline=None)
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
    min_grant_blocks=st.integers(1, 64),
    pipeline=st.booleans(),
    prefetch_rate=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_property_every_token_delivered_once_no_leak(
    kind: str,
    total: int,
    block_size: int,
    default_blocks: int,
    recv_blocks: int,
    send_blocks: int,
    partial: bool,
    round_up: bool,
    order: str,
    seed: int,
    min_grant_blocks: int,
    pipeline: bool,
    prefetch_rate: float,
) -> None:
    """Any sizes, pools, grant policies and orders, with pipelining on or off and prefetches
    served always, sometimes or never: every token is delivered once, in order, nothing
    leaks, and no round after the first is smaller than the grant policy's least."""
    link = Link(
        total,
        kind=kind,
        block_size=block_size,
        default_tokens=default_blocks * block_size,
        recv_blocks=recv_blocks,
        send_blocks=send_blocks,
        partial=partial,
        round_up=round_up,
        order=order,
        seed=seed,
        min_grant=min_grant_blocks * block_size,
        pipeline=pipeline,
        prefetch_rate=prefetch_rate,
    )
    link.start().run(randomly=True)
    link.assert_done()
    least = min(min_grant_blocks, recv_blocks) * block_size
    for d in link.deliveries[1:]:
        assert d.count >= min(least, total - d.start)
    if not pipeline or prefetch_rate == 0.0:
        assert "granted" not in link.prefetches
    if not partial and "granted" not in link.prefetches:  # each round fills the pool
        per_round = min(default_blocks, recv_blocks) * block_size
        later = recv_blocks * block_size
        expected_rounds = 1 if total <= per_round else 1 + -(-(total - per_round) // later)
        assert link.rounds == expected_rounds


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=250, deadline=None)
@given(
    total=st.integers(1, 3000),
    block_size=st.sampled_from([4, 16, 128]),
    default_blocks=st.integers(1, 8),
    recv_blocks=st.integers(1, 32),
    send_blocks=st.integers(1, 32),
    partial=st.booleans(),
    order=st.sampled_from(["data_first", "init_first", "any"]),
    faults=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 2**16)), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    pipeline=st.booleans(),
)
def test_property_faults_end_cleanly(
    kind: str,
    total: int,
    block_size: int,
    default_blocks: int,
    recv_blocks: int,
    send_blocks: int,
    partial: bool,
    order: str,
    faults: list[tuple[int, int]],
    seed: int,
    pipeline: bool,
) -> None:
    """A timeout (any state's, the sender's write_timeout and drain deadline, the receiver's
    abort_ack_timeout and grant expiry included), a cancellation, a lost peer, a failed write,
    a failed fence or a bad message (which makes the peer receive an Abort) at random steps:
    both machines end DONE or FAILED, every allocation is given back, no write ever lands in
    given-back blocks, each side reports exactly one outcome, and a receiver that gave up
    gives its blocks back only on a proof its engine offers: with NIXL-like guarantees an
    AbortAck, the sender's Abort or the grant's expiry; with TCP-like ones a fence or a
    teardown that stopped the peer's writes; with none at all only the expiry. With pipelining on,
    the faults also strike while two grants are out (the round on the wire and the next)."""
    link = Link(
        total,
        kind=kind,
        block_size=block_size,
        default_tokens=default_blocks * block_size,
        recv_blocks=recv_blocks,
        send_blocks=send_blocks,
        partial=partial,
        order=order,
        seed=seed,
        pipeline=pipeline,
        prefetch_rate=0.7,
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
    link.assert_released_by_proof()
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
        assert link.releases == []
    if not GUARANTEES[kind].fences_tag:
        assert "Fenced" not in link.releases


# ------------------------------------------------------------- targeted fault scenarios


def _chunk_on_the_way(link: Link) -> bool:
    return any(isinstance(e, ev.ChunkReceived) for e in link.to_receiver)


def drive_until(link: Link, predicate: Any) -> Link:
    while not predicate(link):
        steps = link.available()
        assert steps, "stalled before the point of interest"
        link.step(steps[0])
    return link


def writing(kind: str, total: int = 2000, **options: Any) -> Link:
    link = Link(total, kind=kind, **options).start()
    return drive_until(link, lambda k: k.sender.state is S.WRITING)


def fail_type(link: Link, side: str) -> str:
    (fail,) = link.outcomes[side]
    assert isinstance(fail, ev.Fail)
    return type(fail.error).__name__


#: what releases the quarantine of a receiver that timed out while the sender wrote
RELEASE_AFTER_TIMEOUT = {
    "nixl": ["AbortAck"],
    "local": ["AbortAck"],
    "tcp": ["Fenced"],
    "none": ["expiry"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_receiver_timeout_while_sender_writes_quarantines_until_proof(kind: str) -> None:
    link = writing(kind)
    link.to("receiver", ev.Timeout())
    assert link.receiver.state is R.QUARANTINED
    assert link.quarantined and link.rpool.free_tokens < 64 * 128
    assert (link.fence_pending is not None) == GUARANTEES[kind].fences_tag
    link.run()  # the abort reaches the sender mid-write: it drains, then acks
    assert link.sender.state is S.FAILED
    assert [a for _, a in link.sent if isinstance(a, ev.SendAbortAck)] == [ev.SendAbortAck()]
    if kind == "none":  # nothing proves the write is in: only the grant's expiry
        assert link.receiver.state is R.QUARANTINED
        link.settle()
        assert link.teardowns == 1
    assert link.receiver.state is R.FAILED
    assert link.releases == RELEASE_AFTER_TIMEOUT[kind]
    link.assert_no_leak()
    assert fail_type(link, "receiver") == "TransferTimeout"
    assert fail_type(link, "sender") == "TransferAborted"


@pytest.mark.parametrize("kind", KINDS)
def test_ack_before_the_bytes_land_is_no_proof_without_remote_completion(kind: str) -> None:
    """TCP-like: the sender's write completed (into its kernel), it acks the receiver's Abort,
    and the bytes land after the ack: the receiver must still hold the blocks then."""
    link = writing(kind)
    link.to("receiver", ev.Timeout())
    link.step("to_sender")  # the Abort: DRAINING
    link.step("write")  # the write ends on the sender: FreeStaging, AbortAck
    link.step("to_receiver")  # the AbortAck
    if GUARANTEES[kind].remote_completion:
        assert link.receiver.state is R.FAILED and link.releases == ["AbortAck"]
    else:
        assert link.receiver.state is R.QUARANTINED
        assert [f for f in link.flights if not f.posted]  # still on the way
        link.step("land")  # lands in the quarantined blocks: harmless
    link.settle()
    link.assert_no_leak()
    link.assert_released_by_proof()


@pytest.mark.parametrize("kind", KINDS)
def test_sender_cancel_mid_write_drains_before_abort(kind: str) -> None:
    link = writing(kind)
    link.to("sender", ev.LocalAbort("shutdown"))
    assert link.sender.state is S.DRAINING
    assert not link.to_receiver  # nothing said before the write ends
    link.settle()
    assert link.receiver.state is R.FAILED
    expected = {"nixl": ["Abort"], "local": ["Abort"], "tcp": ["Fenced"], "none": ["expiry"]}
    assert link.releases == expected[kind]
    link.assert_no_leak()


@pytest.mark.parametrize("kind", KINDS)
def test_sender_write_timeout_drains_then_aborts(kind: str) -> None:
    link = writing(kind)
    assert link.sender.timeout_name == "write_timeout"
    link.to("sender", ev.Timeout())
    assert link.sender.state is S.DRAINING and link.posted is not None  # not abandoned
    assert not link.to_receiver
    link.settle()
    assert [a for _, a in link.sent if isinstance(a, ev.SendAbort)] == [
        ev.SendAbort("sender write timed out")
    ]
    assert fail_type(link, "sender") == "TransferTimeout"
    assert fail_type(link, "receiver") == "TransferAborted"
    link.assert_no_leak()
    link.assert_released_by_proof()


@pytest.mark.parametrize("kind", KINDS)
def test_sender_drain_timeout_abandons_the_write_and_says_nothing(kind: str) -> None:
    link = writing(kind)
    link.to("sender", ev.LocalAbort("shutdown"))
    link.to("sender", ev.Timeout())  # abort_ack_timeout: give up on the write
    assert link.sender.state is S.FAILED
    assert link.staging is not None and link.staging_after_write  # still the engine's
    assert not link.to_receiver  # no Abort: nothing proves the write will not land
    link.step("write")  # it ends after the request did: its staging goes back now
    assert link.staging is None
    assert link.sender.history[-1] == (S.FAILED, "WriteDone", S.FAILED)
    link.settle()  # the receiver times out, gives up, and is released by its own proofs
    assert link.receiver.state is R.FAILED
    assert fail_type(link, "sender") == "TransferAborted"
    link.assert_no_leak()
    link.assert_released_by_proof()


def test_late_abort_of_an_abandoned_write_gets_no_ack() -> None:
    """The sender gave up on a running write (DRAINING's deadline) without telling the
    receiver; the receiver's chunk timeout sends Abort; the sender, FAILED, must not ack it
    while the write can still land, so a NIXL-like receiver holds the blocks until expiry."""
    link = writing("nixl", hold_late_abort=False)
    link.to("sender", ev.LocalAbort("shutdown"))
    link.to("sender", ev.Timeout())
    link.to("receiver", ev.Timeout())
    link.step("to_sender")  # the receiver's Abort: no ack while the write still runs
    assert not link.to_receiver or not isinstance(link.to_receiver[-1], ev.AbortAckReceived)
    link.settle()
    link.assert_no_leak()


@pytest.mark.parametrize("kind", KINDS)
def test_peer_lost_mid_write(kind: str) -> None:
    g = GUARANTEES[kind]
    link = writing(kind)
    link.inject("peer_lost", "both")
    link.step("lost")
    link.step("lost")  # both sides hear of it before the write reports
    assert link.sender.state is S.DRAINING
    if g.remove_stops_inbound:
        assert link.receiver.state is R.FAILED  # teardown confirmed: freed at once
        assert link.releases == ["PeerLost(stopped)"]
    else:
        # the write may still land: quarantined until the grant's expiry, which waits for it
        assert link.receiver.state is R.EXPIRING
        assert ("timeout", "receiver") not in link.faults()
        assert link.posted is not None and link.posted.fate == "land"
    link.settle()
    assert link.sender.state is S.FAILED and link.receiver.state is R.FAILED
    if not g.remove_stops_inbound:
        assert link.releases == ["expiry"]
    for side in ("sender", "receiver"):
        assert fail_type(link, side) == "PeerLost"
    link.assert_no_leak()


@pytest.mark.parametrize("kind", [k for k in KINDS if GUARANTEES[k].remove_stops_inbound])
def test_peer_lost_mid_write_reported_by_the_write_first(kind: str) -> None:
    link = writing(kind)
    link.inject("peer_lost", "both")
    link.step("write")  # the transport fails the write before the heartbeat notices
    assert link.sender.state is S.FAILED
    link.run()
    assert link.receiver.state is R.FAILED
    # the caller sees a plain TransferError ("write ... failed"), not PeerLost
    (fail,) = link.outcomes["sender"]
    assert isinstance(fail, ev.Fail) and type(fail.error) is TransferError
    link.assert_no_leak()


@pytest.mark.parametrize("kind", [k for k in KINDS if not GUARANTEES[k].remove_stops_inbound])
def test_lost_peer_still_writing_lands_in_quarantine(kind: str) -> None:
    """NIXL-like: the control connection died but the sender still posts the rest of its
    round before it hears; those writes land in the quarantined blocks, and the expiry waits
    for them."""
    link = Link(2000, kind=kind, send_blocks=2).start()
    drive_until(link, lambda k: k.sender.state is S.WRITING)
    link.inject("peer_lost", "both")
    while link.lost_pending[0] != "receiver":
        link.lost_pending.reverse()
    link.step("lost")  # the receiver first: EXPIRING
    assert link.receiver.state is R.EXPIRING
    link.step("write")
    link.step("grant_sender")  # the sender has not heard: it posts the next piece
    assert link.posted is not None and link.posted.fate == "land"
    assert not link.expiry_allowed()
    link.settle()
    assert link.releases == ["expiry"]
    link.assert_no_leak()


@pytest.mark.parametrize("kind", [k for k in KINDS if GUARANTEES[k].fences_tag])
def test_failed_fence_falls_back_to_the_teardown(kind: str) -> None:
    link = writing(kind)
    link.to("receiver", ev.Timeout())
    link.inject("fence_fails", "receiver")
    link.step("fence")
    assert link.receiver.state is R.QUARANTINED
    assert link.receiver.history[-1] == (R.QUARANTINED, "FenceFailed", R.QUARANTINED)
    link.settle()
    assert link.receiver.state is R.FAILED
    if GUARANTEES[kind].remote_completion:
        assert link.releases == ["AbortAck"]
    else:  # the ack proves nothing: abort_ack_timeout tears the peer down, which stops it
        assert link.teardowns == 1 and link.releases == ["PeerLost(stopped)"]
    link.assert_no_leak()


@pytest.mark.parametrize("kind", KINDS)
def test_no_ack_at_all_tears_down_then_releases(kind: str) -> None:
    """The Abort is lost with the connection's last bytes: abort_ack_timeout tears the peer
    down; then the teardown (where it stops writes) or the grant's expiry ends it."""
    link = writing(kind)
    link.to("receiver", ev.Timeout())
    link.to_sender.clear()  # the Abort never arrives
    if link.fence_pending is not None:  # and the engine cannot fence
        link.inject("fence_fails", "receiver")
        link.step("fence")
    link.to("receiver", ev.Timeout())  # abort_ack_timeout
    assert link.receiver.state is R.EXPIRING and link.teardowns == 1
    assert not link.link_up
    link.settle()
    assert link.receiver.state is R.FAILED
    stopped = GUARANTEES[kind].remove_stops_inbound
    assert link.releases == (["PeerLost(stopped)"] if stopped else ["expiry"])
    link.assert_no_leak()


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_chunk_crossing_the_last_round(kind: str) -> None:
    link = drive_until(Link(500, kind=kind).start(), lambda k: bool(k.to_receiver))
    link.inject("corrupt_chunk", "receiver")
    link.run()  # sender DONE acks the late abort; the quarantine is released on a proof
    link.settle()
    assert link.sender.state is S.DONE and link.receiver.state is R.FAILED
    assert link.releases == RELEASE_AFTER_TIMEOUT[kind]
    link.assert_no_leak()


@pytest.mark.parametrize("kind", KINDS)
def test_late_resume_after_sender_cancel(kind: str) -> None:
    link = Link(2000, kind=kind, pipeline=False).start()  # the Resume after round 0 is in
    link = drive_until(link, lambda k: bool(k.to_sender) and k.rounds == 1)
    assert isinstance(link.to_sender[0], ev.ResumeReceived)
    link.to("sender", ev.LocalAbort("cancel"))
    link.settle()
    assert link.sender.state is S.FAILED and link.receiver.state is R.FAILED
    link.assert_no_leak()
    link.assert_released_by_proof()


@pytest.mark.parametrize("kind", KINDS)
def test_late_init_after_sender_init_timeout(kind: str) -> None:
    link = drive_until(Link(2000, kind=kind).start(), lambda k: bool(k.to_sender))
    assert isinstance(link.to_sender[0], ev.InitReceived)
    link.to("sender", ev.Timeout())
    link.settle()
    assert link.sender.state is S.FAILED and link.receiver.state is R.FAILED
    # the late Init is answered with an Abort: the receiver gives its allocation up
    assert link.messages("sender", ev.SendAbort) == [
        ev.SendAbort("request already ended on the sender")
    ]
    link.assert_no_leak()
    link.assert_released_by_proof()


# ------------------------------------------------------------------- pipelined resume


@pytest.mark.parametrize("kind", KINDS)
def test_pipelined_resume_grants_round_1_while_round_0_is_written(kind: str) -> None:
    """2000 tokens, 1024 in round 0: the sender says Total before its write, the receiver
    grants round 1 from free blocks at once, and the sender writes round 1 straight after
    round 0 -- it never waits in WAIT_RESUME."""
    link = Link(2000, kind=kind, block_size=128, default_tokens=1024).start()
    drive_until(link, lambda k: bool(k.writes))  # round 0's first write is posted
    resumes = link.messages("receiver", ev.SendResume)
    assert [(r.round, r.received_tokens, r.capacity_tokens) for r in resumes] == [(1, 1024, 976)]
    assert link.messages("sender", ev.SendChunkDone) == []  # round 0 still on the wire
    link.run()
    link.assert_done()
    assert link.prefetches == ["granted"]
    assert S.WAIT_RESUME not in {state for _, _, state in link.sender.history}
    assert [h for h in link.receiver.history if h[2] is R.ALLOCATING] == [
        (R.NEW, "Start", R.ALLOCATING)  # it never waited for blocks after round 0
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_pipelined_rounds_past_the_whole_pool_hold_two_allocations_at_most(kind: str) -> None:
    """1000 tokens through 8 blocks of 16 (128 tokens), 4 blocks by default: every round
    after the first is prefetched beside the one on the wire, in what the pool has left."""
    link = Link(1000, kind=kind, block_size=16, default_tokens=64, recv_blocks=8, seed=4)
    link.start()
    most = 0
    while steps := link.available():
        link.step(link.rng.choice(steps))
        most = max(most, len(link.held))
    link.assert_done()
    assert most == 2 and set(link.prefetches) == {"granted"}
    # (a sender may still wait in WAIT_RESUME when its write ends before the Resume arrives)


@pytest.mark.parametrize("kind", KINDS)
def test_refused_prefetch_falls_back_to_the_sequential_resume(kind: str) -> None:
    link = Link(2000, kind=kind, prefetch_rate=0.0).start().run()
    link.assert_done()
    assert link.prefetches == ["refused"] and link.rounds == 2
    assert (R.WAIT_CHUNK, "ChunkReceived", R.ALLOCATING) in link.receiver.history
    assert S.WAIT_RESUME in {state for _, _, state in link.sender.history}


@pytest.mark.parametrize("kind", KINDS)
def test_receiver_gives_up_with_two_grants_out(kind: str) -> None:
    """A timeout while round 0 is written and round 1 is granted: both allocations are
    quarantined and released together, on this engine's proof only."""
    link = Link(2000, kind=kind).start()
    drive_until(link, lambda k: k.sender.state is S.WRITING and len(k.held) == 2)
    assert link.sender.round == 0
    link.to("receiver", ev.Timeout())
    assert len(link.quarantined) == 2 and not link.held
    link.settle()
    assert link.receiver.state is R.FAILED and link.sender.state is S.FAILED
    link.assert_no_leak()
    link.assert_released_by_proof()
