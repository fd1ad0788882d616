"""The language role: reserves blocks, receives the rounds, hands the embedding to the caller."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..allocator import Allocation
from ..buffers import payload_digest
from ..errors import (
    InvalidRequest,
    PeerLost,
    ProtocolError,
    RidInFlight,
    TransferError,
    Unavailable,
)
from ..protocol import ReceiverMachine, ReceiverState
from ..protocol import events as ev
from ..protocol import messages as m
from . import control, tls
from .channel import LocalChannel
from .directory import lookup_local
from .jobs import split_job
from .node import OFFLOAD_BYTES, Node, Peer, check_rid, data_tag
from .session import Session, StateObserver

#: slack on a grant's expiry for clock-rate drift between two hosts and scheduling
GRANT_MARGIN_S = 0.05


@dataclass
class Received:
    """A received payload. With :meth:`LanguageNode.lease`, ``tensors`` may be views into the
    pool (``zero_copy``), valid until the lease closes."""

    rid: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    num_tokens: int
    rounds: int
    digest: str | None
    zero_copy: bool = False
    stats: dict[str, float] = field(default_factory=dict)


class ReceiverSession(Session):
    ALLOC_STATES = frozenset({ReceiverState.ALLOCATING})
    machine: ReceiverMachine

    def __init__(self, node: LanguageNode, rid: str, peer: Peer) -> None:
        s = node.settings
        machine = ReceiverMachine(
            rid,
            block_size=s.block_size,
            default_tokens=s.default_tokens,
            guarantees=node.transport.guarantees,
            max_tokens=s.max_tokens,
            pool_tokens=s.capacity_tokens,
            min_grant_tokens=s.min_grant_tokens,
            waits={"chunk_timeout": s.chunk_timeout, "encode_timeout": s.encode_timeout},
            peer=f"encode node {peer.node_id}" if peer.node_id else "",
            pipeline=s.pipeline_resume,
        )
        super().__init__(node, machine, peer)
        #: round -> its allocation: the current round's, and a prefetched next one
        self.held: dict[int, Allocation] = {}
        #: what a give-up kept out of circulation, with the rounds they served
        self.quarantined: dict[int, Allocation] = {}
        self.out: dict[str, torch.Tensor] | None = None
        self.copy_s = 0.0
        self.t_init = 0.0
        self.t_last_chunk = 0.0
        self.session_tag = secrets.token_hex(4)
        self.last_chunk_at = 0.0  # wall clock, to line up with the sender's first_write_at
        self._copying: tuple[Allocation, asyncio.Future[None]] | None = None
        self._pending_copies: list[asyncio.Future[None]] = []
        self._expiry = 0.0  # loop time after which no write for any grant sent can land
        self.prefetched = 0  # rounds granted while the one before was on the wire
        self._granted_tags: set[str] = set()  # data-plane grants still open on the transport

    @property
    def current(self) -> Allocation | None:
        """The allocation of the round the machine waits for (or allocated last)."""
        return self.held.get(self.machine.round)

    def grant_expiry(self) -> float:
        """After this (loop time) no write for any grant of this request can land: the sender
        posts none after ``stamp + ttl`` (a moment before we sent the grant), and a posted one
        ends within the engine's post bound."""
        return self._expiry

    def _open_grant(self, round_: int, blocks: tuple[int, ...]) -> None:
        """Tell the transport what the sender may write, before the grant leaves."""
        assert self.peer is not None
        tag = self._tag(round_)
        self.node.transport.grant(self.peer.transport_id, tag, blocks)
        self._granted_tags.add(tag)

    def _close_grant(self, round_: int | None = None) -> None:
        """The grant of ``round_`` (default: every one still open) ended."""
        if self.peer is None or not self._granted_tags:
            return
        tags = [self._tag(round_)] if round_ is not None else list(self._granted_tags)
        for tag in tags:
            if tag in self._granted_tags:
                self.node.transport.revoke(self.peer.transport_id, tag)
                self._granted_tags.discard(tag)

    def _cleanup(self) -> None:
        self._close_grant()

    def _grant_fields(self, round_: int) -> dict[str, int]:
        """``ttl_ms`` adds the stamp's age as we measure it (an upper bound of its real age):
        the sender's deadline still falls at most the grant's ttl after this moment."""
        assert self.peer is not None
        now = asyncio.get_running_loop().time()
        ttl = self._grant_ttl(round_)
        bound = self.node.transport.guarantees.post_bound
        self._expiry = max(self._expiry, now + ttl * 1.001 + bound + GRANT_MARGIN_S)
        age = min(max(0.0, now - self.peer.stamp_at), 3600.0)
        return {"stamp": self.peer.stamp, "ttl_ms": int((ttl + age) * 1000)}

    def _grant_ttl(self, round_: int) -> float:
        """A grant lasts as long as the receiver may wait for its round: round 0 of an Encode
        job waits for the encoder too; a round granted while the one before it is still on
        the wire waits for that round first."""
        m = self.machine
        if round_ == 0 and m.job:
            return self.settings.encode_timeout
        if round_ == m.round + 1:  # prefetched
            return self._grant_ttl(m.round) + self.settings.chunk_timeout
        return self.settings.chunk_timeout

    def _granted(self, allocation: Allocation) -> ev.Event:
        self.held[self.machine.round] = allocation
        return ev.AllocGranted(allocation.blocks, allocation.capacity_tokens)

    async def _prefetch(self, action: ev.Prefetch) -> None:
        """Take the next round's blocks now or not at all, and answer the machine at once."""
        try:
            got = self.node.allocator.try_alloc(
                action.num_tokens, self.rid, min_tokens=action.min_tokens
            )
        except TransferError:
            got = None  # can never fit now: the sequential path will say why
        event: ev.Event = ev.PrefetchRefused()
        if got is not None:
            self.prefetched += 1
            self.node.metrics.prefetched.inc()
            self.held[self.machine.round + 1] = got
            event = ev.Prefetched(got.blocks, got.capacity_tokens)
        for follow in self.machine.handle(event):
            await self._execute(follow)

    async def _to_event(self, item: object) -> ev.Event | None:
        if isinstance(item, m.ChunkDone):
            event = _chunk_event(item)
            peer = self.peer
            if self.machine.state is ReceiverState.WAIT_CHUNK and peer is not None:
                nbytes = item.count * self.node.token_nbytes
                error = self.machine.chunk_error(event)
                if error is None:  # never wait for the data of a chunk we will refuse
                    tag = self._tag(item.round)
                    if not self.node.transport.landed(peer.transport_id, tag, nbytes):
                        failure = await self._wait_landed(item.round, nbytes)
                        if failure is not None:
                            return failure
                    self._close_grant(item.round)  # every byte is in: nothing more may land
            self.t_last_chunk = time.perf_counter()
            self.last_chunk_at = time.time()
            return event
        return await super()._to_event(item)

    def _tag(self, round_: int) -> str:
        return data_tag(self.rid, self.session_tag, round_)

    async def _wait_landed(self, round_: int, nbytes: int) -> ev.Event | None:
        """Wait for the round's bytes; if they cannot arrive, end the request instead."""
        assert self.peer is not None
        await self.own_task()  # the timeout below belongs to this session's task
        try:
            async with asyncio.timeout(self.settings.chunk_timeout):
                await self.node.transport.wait_landed(
                    self.peer.transport_id, self._tag(round_), nbytes
                )
            return None
        except (TimeoutError, TransferError) as exc:
            if await self.peer.lost_soon():  # a dead peer: let its loss be the cause
                return ev.PeerLost(f"peer lost while round {round_} was landing")
            self._error_override = TransferError(
                f"rid={self.rid!r}: data of round {round_} did not land: {exc!r}"
            )
            return ev.LocalAbort(f"data of round {round_} did not land")

    def _send(self, msg: m.Message) -> None:
        try:
            assert self.peer is not None
            self.peer.send(msg)
        except PeerLost:
            self.log.debug("peer gone; message dropped", msg=type(msg).__name__)

    async def _execute(self, action: ev.Action) -> None:
        alloc = self.node.allocator
        match action:
            case ev.Alloc():
                self._start_alloc(action)
            case ev.SendInit():
                self.t_init = time.perf_counter()
                self._open_grant(0, action.blocks)
                self._send(
                    m.Init(
                        rid=self.rid,
                        blocks=list(action.blocks),
                        capacity_tokens=action.capacity_tokens,
                        expected_tokens=action.expected_tokens,
                        session=self.session_tag,
                        **self._grant_fields(0),
                    )
                )
            case ev.SendResume():
                self._open_grant(action.round, action.blocks)
                self.log.debug(
                    "resume",
                    round=action.round,
                    blocks=len(action.blocks),
                    received=action.received_tokens,
                    total=self.machine.total,
                )
                self._send(
                    m.Resume(
                        rid=self.rid,
                        round=action.round,
                        blocks=list(action.blocks),
                        capacity_tokens=action.capacity_tokens,
                        received_tokens=action.received_tokens,
                        **self._grant_fields(action.round),
                    )
                )
            case ev.Prefetch():
                await self._prefetch(action)
            case ev.Deliver():
                await self._deliver(action)
            case ev.Free():
                rounds = list(self.held) if action.round is None else [action.round]
                for r in rounds:
                    # closed already when its round landed; not on an abort
                    self._close_grant(r)
                    self._free_after_copy(self.held.pop(r))
            case ev.Quarantine():
                assert self.held
                for r, held in self.held.items():
                    alloc.quarantine(held)
                    self.quarantined[r] = held
                self.held = {}
                self._linger()
                self.node.metrics.quarantines.inc()
                blocks = sum(len(a.blocks) for a in self.quarantined.values())
                self.log.info("allocation quarantined", blocks=blocks, rounds=len(self.quarantined))
            case ev.Fence():
                await self._fence()
            case ev.ReleaseQuarantine():
                assert self.quarantined
                self._close_grant()
                for q in self.quarantined.values():
                    alloc.release_quarantine(q)
                self.quarantined = {}
            case ev.TearDownPeer():
                if self.peer is not None:
                    self.node.spawn(self.node.tear_down(self.peer, action.reason))
            case ev.SendAbort():
                self._send(
                    m.Abort(
                        rid=self.rid,
                        reason=m.reason(action.reason),
                        session=self.session_tag,
                        kind=action.kind,
                    )
                )
            case ev.Complete():
                if self._pending_copies:
                    await asyncio.gather(*self._pending_copies)
                self._complete(action)
            case ev.Fail():
                self._set_error(action.error)
            case _:  # pragma: no cover
                raise ProtocolError(f"receiver cannot execute {action!r}")

    async def _fence(self) -> None:
        """Ask the engine to fence the quarantined rounds; feed the machine the outcome."""
        assert self.peer is not None
        await self.own_task()  # an engine's fence may time out: in this session's task
        try:
            for r in self.quarantined:
                await self.node.transport.discard(self.peer.transport_id, self._tag(r))
        except TransferError as exc:
            self.log.warning("cannot fence the round; blocks stay quarantined", error=str(exc))
            self.feed(ev.FenceFailed(str(exc)))
            return
        self.feed(ev.Fenced())

    def _linger(self) -> None:
        """An ended request whose blocks are quarantined frees its rid for a retry, and waits
        for its proof (or expiry) under its attempt's tag."""
        if self.peer is not None:
            if self.peer.sessions.get(self.rid) is self:
                del self.peer.sessions[self.rid]
            self.peer.lingering[self.session_tag] = self

    async def _deliver(self, action: ev.Deliver) -> None:
        """Copy the round out. A large copy runs on the executor *in the background*: the
        Free that follows waits for it, but the next allocation and the Resume do not, so the
        sender's next round overlaps this copy."""
        node, cur, total = self.node, self.held.get(action.round), self.machine.total
        assert cur is not None and total is not None
        if self.out is None:
            self.out = node.registry.empty_like_payload(total)
        out = self.out

        def copy() -> None:
            t0 = time.perf_counter()
            node.registry.read_into(cur, out, count=action.count, out_start=action.start)
            self.copy_s += time.perf_counter() - t0

        if action.count * node.token_nbytes >= OFFLOAD_BYTES:
            loop = asyncio.get_running_loop()

            async def copy_soon() -> None:  # starts once this coroutine yields: after the Resume
                await loop.run_in_executor(node.executor, copy)

            self._copying = (cur, asyncio.ensure_future(copy_soon()))
        else:
            copy()

    def _free_after_copy(self, allocation: Allocation) -> None:
        copying, self._copying = self._copying, None
        if copying is None or copying[0] is not allocation:
            self.node.allocator.free(allocation)
            return
        fut = copying[1]
        fut.add_done_callback(lambda _: self.node.allocator.free(allocation))
        self._pending_copies.append(fut)

    def _complete(self, action: ev.Complete) -> None:
        node = self.node
        zero_copy = False
        if action.in_place:
            assert self.current is not None
            views = node.registry.views(self.current, count=action.total_tokens)
            zero_copy = views is not None
            tensors = views or node.registry.read(self.current, count=action.total_tokens)
        else:
            assert self.out is not None
            tensors = self.out
        if node.settings.verify_digest and action.digest is not None:
            got = payload_digest(tensors, list(node.registry.layouts))
            if got != action.digest:
                self._release_in_place()
                self._set_error(
                    TransferError(f"rid={self.rid!r}: digest mismatch {got} != {action.digest}")
                )
                return
        now = time.perf_counter()
        nbytes = action.total_tokens * node.token_nbytes
        stats = {
            "elapsed_s": now - self.t_start,
            "transfer_s": self.t_last_chunk - self.t_init,
            "alloc_wait_s": self.alloc_wait_s,
            "copy_s": self.copy_s,
            "bytes": float(nbytes),
            "prefetched_rounds": float(self.prefetched),
            "last_chunk_at": self.last_chunk_at,
        }
        node.metrics.bytes_in.inc(nbytes)
        node.metrics.tokens_in.inc(action.total_tokens)
        node.metrics.rounds.inc(self.machine.round + 1)
        if self.machine.round:
            node.metrics.resumes.inc(self.machine.round)
        node.metrics.transfers_ok.inc()
        node.metrics.duration.observe(stats["elapsed_s"])
        self._set_result(
            Received(
                rid=self.rid,
                tensors=tensors,
                meta=action.meta or {},
                num_tokens=action.total_tokens,
                rounds=self.machine.round + 1,
                digest=action.digest,
                zero_copy=zero_copy,
                stats=stats,
            )
        )

    def _release_in_place(self) -> None:
        held = self.take_allocation()
        if held is not None:
            self.node.allocator.free(held)

    def take_allocation(self) -> Allocation | None:
        """Hand the in-place allocation to a lease (which frees it on exit)."""
        return self.held.pop(self.machine.round, None)

    def _forget(self) -> None:
        if self.peer is not None:
            if self.peer.sessions.get(self.rid) is self:
                del self.peer.sessions[self.rid]
            if self.peer.lingering.get(self.session_tag) is self:
                del self.peer.lingering[self.session_tag]

    async def _crash_cleanup(self) -> None:
        """A bug ended the session: a write may still land in what it holds, so keep that out
        of circulation until the grant has surely expired."""
        allocator = self.node.allocator
        for held in [*self.held.values(), *self.quarantined.values()]:
            if allocator.owns(held):
                allocator.quarantine(held)
            self.node.release_at(self.grant_expiry(), held)
        self.held, self.quarantined = {}, {}
        self._send(m.Abort(rid=self.rid, reason="receiver failed", session=self.session_tag))


def _chunk_event(msg: m.ChunkDone) -> ev.ChunkReceived:
    return ev.ChunkReceived(
        msg.round, msg.start, msg.count, msg.total_tokens, msg.is_last, msg.meta, msg.digest
    )


def _check_expected(expected_tokens: object, max_tokens: int) -> None:
    if expected_tokens is not None and (
        not isinstance(expected_tokens, int)
        or isinstance(expected_tokens, bool)
        or expected_tokens <= 0
    ):
        raise InvalidRequest(f"expected_tokens must be a positive integer, got {expected_tokens!r}")
    if expected_tokens is not None and expected_tokens > max_tokens:
        raise InvalidRequest(
            f"expected_tokens={expected_tokens} exceeds max_tokens={max_tokens} (a setting)"
        )


class LanguageNode(Node):
    """Owns the language side's pool and transport; connects to encode nodes."""

    role = "language"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connecting: dict[str, asyncio.Future[Peer]] = {}
        self._tls = tls.client_context(self.settings)  # bad files fail here, not at connect

    async def connect(self, address: str) -> Peer:
        """The live connection to the encode node at ``address`` (``host:port`` or
        ``local://...``), connecting -- or reconnecting after a restart -- when needed.
        Single-flight: concurrent callers for one address share one connection attempt."""
        self.check_started()
        for peer in self.peers.values():
            if peer.address == address and peer.alive:
                return peer
        pending = self._connecting.get(address)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(address))
            self._connecting[address] = pending
            pending.add_done_callback(lambda f: self._connect_done(address, f))
        return await asyncio.shield(pending)

    def _connect_done(self, address: str, fut: asyncio.Future[Peer]) -> None:
        if self._connecting.get(address) is fut:
            del self._connecting[address]
        if not fut.cancelled():
            fut.exception()  # retrieved: callers that left must not make it warn

    async def _connect(self, address: str) -> Peer:
        if address.startswith("local://"):
            server = lookup_local(address)
            ours, theirs = LocalChannel.pair()
            accepting = asyncio.create_task(server.accept(theirs))
            try:
                return await self._client_handshake(ours, "encode", address)
            finally:
                await accepting
        channel = await control.connect(
            address,
            self.settings.bootstrap_timeout,
            tls=self._tls,
            server_name=self.settings.tls_server_name,
        )
        return await self._client_handshake(channel, "encode", address)

    async def _resolve(self, peer: Peer | str) -> Peer:
        self.check_started()
        if self._closing:  # not a reconnect through a transport that is gone
            raise Unavailable("node is closing")
        if isinstance(peer, str):
            return await self.connect(peer)
        if not peer.alive and peer.address:
            return await self.connect(peer.address)
        return peer

    # -- the API -------------------------------------------------------------------------------
    async def receive(
        self,
        rid: str,
        peer: Peer | str,
        expected_tokens: int | None = None,
        *,
        observer: StateObserver | None = None,
    ) -> Received:
        """Receive the payload of ``rid`` from ``peer`` (a :class:`Peer` or an address). Without
        ``expected_tokens`` the first allocation is ``default_blocks``; longer payloads resume
        into further allocations. ``observer`` watches the request's session once it opens
        (:meth:`Session.watch`)."""
        check_rid(rid)
        _check_expected(expected_tokens, self.settings.max_tokens)
        peer = await self._resolve(peer)
        self._check_new(rid, peer)
        async with peer.inflight:
            session = self._open(rid, peer, observer)
            result: Received = await self._run(session, expected_tokens, whole=False)
            return result

    async def encode(
        self,
        rid: str,
        peer: Peer | str,
        job: dict[str, Any],
        expected_tokens: int | None = None,
        *,
        observer: StateObserver | None = None,
    ) -> Received:
        """Ask the encode node to compute ``job`` (its encoder decides what a job holds) and
        receive the result as :meth:`receive` does."""
        check_rid(rid)
        _check_expected(expected_tokens, self.settings.max_tokens)
        inline, pieces = split_job(rid, job, self.settings.max_job_bytes)
        peer = await self._resolve(peer)
        self._check_new(rid, peer)
        async with peer.inflight:
            session = self._open(rid, peer, observer)  # registered first: an early Abort finds it
            tag = session.session_tag
            try:
                for key, data in pieces:  # a large job: its bytes in pieces, paced by the socket
                    peer.send(m.JobPart(rid=rid, key=key, data=data, session=tag))
                    await peer.channel.drain()
                peer.send(m.Encode(rid=rid, job=inline, session=tag, parts=len(pieces)))
            except BaseException:
                session._forget()
                if pieces and peer.alive:  # the encode node drops what arrived of the job
                    with contextlib.suppress(PeerLost):
                        peer.send(m.Abort(rid=rid, reason="job cancelled", session=tag))
                raise
            result: Received = await self._run(session, expected_tokens, whole=False, job=True)
            return result

    @asynccontextmanager
    async def lease(
        self,
        rid: str,
        peer: Peer | str,
        expected_tokens: int | None = None,
        *,
        observer: StateObserver | None = None,
    ) -> AsyncIterator[Received]:
        """Receive into one allocation and lend it: ``tensors`` are views into the pool when the
        payload fits one allocation of consecutive blocks (else copies). Freed at exit."""
        check_rid(rid)
        _check_expected(expected_tokens, self.settings.max_tokens)
        peer = await self._resolve(peer)
        self._check_new(rid, peer)
        async with peer.inflight:
            session = self._open(rid, peer, observer)
            got: Received = await self._run(session, expected_tokens, whole=True)
        held = session.take_allocation()  # no await between the result and this: no leak
        try:
            yield got
        finally:
            if held is not None:
                self.allocator.free(held)

    def _check_new(self, rid: str, peer: Peer) -> None:
        if not peer.alive:
            raise PeerLost(f"peer {peer.node_id} is gone")
        if self._closing:
            raise Unavailable("node is closing")
        if rid in peer.sessions:
            raise RidInFlight(f"rid {rid!r} is already in flight with peer {peer.node_id}")

    def _open(self, rid: str, peer: Peer, observer: StateObserver | None = None) -> ReceiverSession:
        self._check_new(rid, peer)  # again: the in-flight limit may have made us wait
        session = ReceiverSession(self, rid, peer)
        peer.sessions[rid] = session
        session.watch(observer)
        return session

    async def _run(
        self, session: ReceiverSession, expected: int | None, *, whole: bool, job: bool = False
    ) -> Any:
        session.run_now(ev.Start(expected, whole, job))
        session.start()
        try:
            return await session.outcome()  # a cancel here leaves the session's result be
        except asyncio.CancelledError:
            # the result may already be there (the cancel raced the completion): whatever
            # it holds in the pool goes back, since nobody will take it any more
            if session.result.done() and not session.result.cancelled():
                held = session.take_allocation()
                if held is not None:
                    self.allocator.free(held)
            elif session.running:
                session.feed(ev.LocalAbort("receive cancelled by caller"))
            raise

    # -- control messages ----------------------------------------------------------------------
    def _on_message(self, peer: Peer, msg: m.AnyMessage) -> None:
        match msg:
            case m.ChunkDone():
                self._to_session(peer, msg.rid, msg)
            case m.Total():
                self._to_session(peer, msg.rid, ev.TotalReceived(msg.total_tokens), msg.session)
            case m.Abort():
                self._to_session(peer, msg.rid, ev.AbortReceived(msg.reason, msg.kind), msg.session)
            case m.AbortAck():
                self._to_session(peer, msg.rid, ev.AbortAckReceived(), msg.session)
            case m.Heartbeat():
                pass
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from an encode node")

    @staticmethod
    def _find(peer: Peer, rid: str, tag: str = "") -> ReceiverSession | None:
        """The request ``rid`` of ``peer``: attempt ``tag`` when the message names one (a
        quarantined attempt lingers under its tag), else the live one."""
        found = peer.lingering.get(tag) if tag else None
        if found is None:
            found = peer.sessions.get(rid)
            if found is not None and tag and getattr(found, "session_tag", tag) != tag:
                return None  # a message for another attempt of rid
        if found is not None and found.rid != rid:
            return None
        return found  # type: ignore[return-value]

    def _to_session(self, peer: Peer, rid: str, item: object, tag: str = "") -> None:
        session = self._find(peer, rid, tag)
        if session is None or not session.running:
            event = _chunk_event(item) if isinstance(item, m.ChunkDone) else item
            assert isinstance(event, ev.Event)
            self.answer_unknown(peer, ReceiverMachine, rid, tag, event)
            return
        session.feed(item)

    def session_ended(self, session: Session) -> None:
        assert isinstance(session, ReceiverSession)
        session._forget()
