"""The encode role: holds computed embeddings and pushes them into the receivers' blocks."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import torch

from ..allocator import Allocation
from ..buffers import WriteOp, payload_digest
from ..errors import (
    AbortKind,
    CapacityError,
    ConfigError,
    InvalidRequest,
    PayloadError,
    PeerLost,
    ProtocolError,
    RidInFlight,
    TransferError,
    Unavailable,
)
from ..protocol import SenderMachine, SenderState
from ..protocol import events as ev
from ..protocol import messages as m
from ..transport import Transport
from . import control, tls
from .channel import Channel
from .directory import register_local, unregister_local
from .jobs import JobPieces
from .node import OFFLOAD_BYTES, Node, Peer, check_rid, data_tag, now_stamp
from .session import Session, StateObserver, _Granted

#: in Peer.job_pieces: a job refused while its pieces arrived (the rest are dropped)
_REFUSED = object()

#: who may claim a payload: one connection, the node id a peer presents, or any peer
Owner = Peer | str | None


def _owns(owner: Owner, peer: Peer) -> bool:
    if owner is None:
        return True
    if isinstance(owner, Peer):
        return owner is peer
    return owner == peer.node_id


def _overlap(a: Owner, b: Owner) -> bool:
    """Whether one peer could claim both ``a``'s and ``b``'s payloads."""
    if a is None or b is None:
        return True
    if isinstance(a, Peer) and isinstance(b, Peer):
        return a is b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    peer, name = (a, b) if isinstance(a, Peer) else (b, a)
    return isinstance(peer, Peer) and peer.node_id == name


def grant_deadline(stamp: int, ttl_ms: int) -> float:
    """The local ``time.monotonic()`` after which no write may be posted for a grant: its
    lifetime counts from ``stamp``, our own clock as the receiver last saw it (a moment that
    surely came before the grant was made). A stamp we cannot have issued (in our future)
    voids the grant: its write is refused at posting and the request aborts as usual."""
    if stamp > now_stamp():
        return float("-inf")
    return stamp / 1e6 + ttl_ms / 1e3


@dataclass(frozen=True)
class SendStats:
    rid: str
    num_tokens: int
    nbytes: int
    rounds: int
    writes: int
    elapsed_s: float
    #: first write posted to last write completed
    transfer_s: float
    alloc_wait_s: float
    digest: str | None
    #: wall-clock time (time.time()) the first write was posted, to line up with the receiver
    first_write_at: float = 0.0
    #: rounds after which the sender waited for the receiver's Resume (0 when every resumed
    #: round was granted while the one before it was written: pipelined)
    resume_waits: int = 0


def _job_failure_kind(exc: BaseException) -> AbortKind:
    """The Abort kind for an Encode job that failed: the input refused (the encoder raised
    InvalidRequest, e.g. JobError), no room (CapacityError), or the encoder's own failure."""
    if isinstance(exc, InvalidRequest) and not isinstance(exc, PayloadError):
        return "refused"
    return "unavailable" if isinstance(exc, CapacityError) else "encoder_failed"


@dataclass(eq=False)
class Staged:
    """Encode-pool blocks lent for one payload by :meth:`EncodeNode.stage`. Write the payload
    into ``tensors`` and pass this object to :meth:`EncodeNode.send`. ``zero_copy``: the
    tensors are views into the pool (its blocks are consecutive), and ``send`` copies nothing
    in; otherwise they are ordinary tensors that ``send`` copies into the reserved blocks."""

    rid: str
    num_tokens: int
    tensors: dict[str, torch.Tensor]
    zero_copy: bool
    #: the reserved blocks; None once a send took them over
    allocation: Allocation | None = field(default=None, repr=False)


#: an encoder maps a job (JSON-like dict) to the tensors, or (tensors, meta); may be async
Encoder = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class _Prestaged:
    """Tokens ``[start, start + count)`` staged (or being staged by ``copy``) in ``allocation``."""

    allocation: Allocation
    start: int
    count: int
    copy: asyncio.Future[None]
    #: the caller's own staging (stage()): every round writes from it, freed at the end
    pinned: bool = False

    def covers(self, staging: Allocation, start: int, count: int) -> bool:
        return staging is self.allocation and start == self.start and count <= self.count


class _WritePlan(NamedTuple):
    """What one Write moves, worked out before any byte does."""

    staging: Allocation
    ops: list[WriteOp]
    nbytes: int
    pre: _Prestaged | None
    pinned: bool
    #: copies the round into the staging blocks (None: it is there already)
    stage: Callable[[], None] | None
    stage_on_loop: bool  # small enough to copy on the loop
    tag: str
    peer_id: str


def _posts_at_once(transport: Transport) -> bool:
    """Whether the sender may try ``write_nowait``: the engine implements it, and whoever
    wrapped this instance's ``write`` (a tracer, a test's fault injector) wrapped
    ``write_nowait`` too, so it still sees every write."""
    wrapped = transport.__dict__
    return type(transport).write_nowait is not Transport.write_nowait and (
        "write" not in wrapped or "write_nowait" in wrapped
    )


class SenderSession(Session):
    ALLOC_STATES = frozenset({SenderState.STAGING})
    machine: SenderMachine
    node: EncodeNode

    def __init__(self, node: EncodeNode, rid: str, owner: Owner = None, job_tag: str = "") -> None:
        machine = SenderMachine(rid, block_size=node.settings.block_size, remote_num_blocks=0)
        super().__init__(node, machine, None)
        self.owner = owner
        #: an Encode job's session: only an Init of that attempt (its tag) may bind to it
        self.job_tag = job_tag
        self.payload: Mapping[str, torch.Tensor] | None = None
        self.staging: Allocation | None = None
        self.writes = 0
        self.t_first_write: float | None = None
        self.t_last_write = 0.0
        self._write_task: asyncio.Task[None] | None = None
        self.session_tag = ""  # the receiver's name for this attempt (from Init)
        self._prestaged: _Prestaged | None = None  # staged, not yet handed to the machine
        self._staged: _Prestaged | None = None  # handed to the machine as its staging grant
        self._pinned: _Prestaged | None = None  # the whole payload, staged by the caller
        self.first_write_at = 0.0
        self.held = 0  # bytes of the payload counted in the node's held_bytes
        self.resume_waits = 0

    def bind(self, peer: Peer, session_tag: str) -> None:
        self.peer = peer
        self.session_tag = session_tag
        self.machine.remote_num_blocks = peer.num_blocks
        peer.sessions[self.rid] = self

    def _loop_done(self) -> bool:
        # a write given up on keeps the session (and its answers) until the write ends
        return self.machine.finished and not self.machine.write_abandoned

    def _linger(self) -> None:
        """The request failed while a write it gave up on still runs: free the rid for a
        retry, and keep answering for this attempt (by its tag) until the write ends."""
        peer = self.peer
        if peer is None:
            return
        if peer.sessions.get(self.rid) is self:
            del peer.sessions[self.rid]
        if self.session_tag:
            peer.lingering[self.session_tag] = self

    @property
    def waits_for_data(self) -> bool:
        """An Init-first session that a ``send()`` may still fill."""
        return (
            not self.job_tag
            and self.payload is None
            and self.machine.state in (SenderState.NEW, SenderState.WAIT_DATA)
        )

    def _granted(self, allocation: Allocation) -> ev.Event:
        self.staging = allocation
        return ev.AllocGranted(allocation.blocks, allocation.capacity_tokens)

    def _send(self, msg: m.Message) -> None:
        try:
            assert self.peer is not None
            self.peer.send(msg)
        except PeerLost:
            self.log.debug("peer gone; message dropped", msg=type(msg).__name__)

    def _is_pinned(self, allocation: Allocation | None) -> bool:
        return self._pinned is not None and allocation is self._pinned.allocation

    def _release_grant(self, allocation: Allocation) -> None:
        if not self._is_pinned(allocation):  # the caller's staging is freed at the end
            super()._release_grant(allocation)

    async def _execute(self, action: ev.Action) -> None:
        mach = self.machine
        match action:
            case ev.Alloc() if self._pinned is not None:  # every round writes from it
                self._staged, self._alloc_token = self._pinned, object()
                self.feed(_Granted(self._alloc_token, self._pinned.allocation))
            case ev.Alloc() if self._prestaged is not None:
                self.node.allocator.reclaimers.discard(self._cleanup)
                pre, self._prestaged = self._prestaged, None
                self.node.speculative_blocks -= len(pre.allocation.blocks)
                try:
                    await pre.copy  # usually long done: it ran while we waited for the Resume
                except Exception as exc:  # the copy failed: its blocks go back, stage anew
                    self.node.allocator.free(pre.allocation)
                    self.log.warning("pre-staging failed", error=repr(exc))
                    self._start_alloc(action)
                    return
                self._staged, self._alloc_token = pre, object()
                self.feed(_Granted(self._alloc_token, pre.allocation))  # stale ones are freed
            case ev.Alloc():
                self._start_alloc(action)
            case ev.Write():
                self._start_write(action)
            case ev.FreeStaging():
                if self.staging is not None and not self._is_pinned(self.staging):
                    self.node.allocator.free(self.staging)
                self.staging = None
            case ev.FreeStagingAfterWrite():
                staging, self.staging = self.staging, None
                if self._is_pinned(staging):
                    staging = None  # freed when the session ends, after its writes
                task = self._write_task
                alloc = self.node.allocator
                if task is None or task.done():
                    if staging is not None:
                        alloc.free(staging)
                    return
                if staging is not None:
                    task.add_done_callback(lambda _: alloc.free(staging))
                self._linger()
            case ev.SendTotal():
                tag = self.session_tag
                self._send(m.Total(rid=self.rid, total_tokens=action.total_tokens, session=tag))
            case ev.SendChunkDone():
                last = action.is_last
                self._send(
                    m.ChunkDone(
                        rid=self.rid,
                        round=action.round,
                        start=action.start,
                        count=action.count,
                        total_tokens=action.total_tokens,
                        is_last=last,
                        meta=mach.meta if last else None,
                        digest=mach.digest if last else None,
                        stamp=now_stamp(),
                    )
                )
                self.node.metrics.rounds.inc()
                if action.round > 0:
                    self.node.metrics.resumes.inc()
                if mach.state is SenderState.WAIT_RESUME:
                    self.resume_waits += 1
                if last:
                    if self.node.log.logger.isEnabledFor(logging.DEBUG):
                        self.log.debug("last chunk sent", rounds=action.round + 1)
                else:
                    self.log.debug(
                        "round sent, awaiting resume",
                        round=action.round,
                        sent=action.start + action.count,
                        total=action.total_tokens,
                    )
                    self._prestage(action.start + action.count, action.total_tokens)
            case ev.SendAbort():
                reason = m.reason(action.reason)
                self._send(
                    m.Abort(rid=self.rid, reason=reason, session=self.session_tag, kind=action.kind)
                )
            case ev.SendAbortAck():
                self._send(m.AbortAck(rid=self.rid, session=self.session_tag))
            case ev.Complete():
                self._complete(action)
            case ev.Fail():
                self._set_error(action.error)
            case _:  # pragma: no cover
                raise ProtocolError(f"sender cannot execute {action!r}")

    def _start_write(self, action: ev.Write) -> None:
        """Execute a Write. As far as it goes without waiting, right here: a payload copied on
        the loop and an engine that posts at once (``Transport.write_nowait``) finish it before
        this returns, WriteDone queued; whatever must wait runs as the write's task."""
        self._write_task = None
        try:
            plan = self._plan_write(action)
            transport = self.node.transport
            eager = _posts_at_once(transport) and plan.stage_on_loop
            if not eager:  # the whole write in a task, as engines without write_nowait need
                self._write_task = self._loop.create_task(self._write(action, plan))
                return
            if plan.stage is not None:
                plan.stage()
            self._first_write()
            pending = transport.write_nowait(
                plan.peer_id, plan.ops, tag=plan.tag, deadline=action.deadline
            )
        except Exception as exc:  # as a failure of the write's task would: the machine decides
            self._write_task = self._loop.create_task(self._write_failed(action, exc))
            return
        if pending is not None:
            self._write_task = self._loop.create_task(self._write(action, plan, pending))
            return
        try:
            self._wrote(action, plan)
        except Exception as exc:
            self._write_task = self._loop.create_task(self._write_failed(action, exc))

    def _plan_write(self, action: ev.Write) -> _WritePlan:
        node = self.node
        staging, payload, peer = self.staging, self.payload, self.peer
        assert staging is not None and payload is not None and peer is not None
        dest = Allocation(self.rid, self.machine.dest_blocks, node.settings.block_size, 0)
        pinned = self._is_pinned(staging)  # holds the whole payload: token t at t
        src = action.src_start if pinned else 0
        runs = staging.runs_to(dest, action.count, src_start=src, dst_start=action.dst_start)
        ops = node.registry.write_ops(runs)
        nbytes = action.count * node.token_nbytes
        if action.round > 0 and self.node.log.logger.isEnabledFor(logging.DEBUG):
            self.log.debug(
                "resumed round",
                round=action.round,
                blocks=len(self.machine.dest_blocks),
                runs=len(runs),
                tokens=action.count,
            )
        pre, self._staged = self._staged, None
        if pre is not None and not pre.covers(staging, action.src_start, action.count):
            pre = None
        stage: Callable[[], None] | None = None
        if not pinned and pre is None:  # else the caller wrote it there, or it was pre-staged

            def stage() -> None:
                node.registry.write(
                    staging, payload, count=action.count, src_start=action.src_start
                )

        tag = data_tag(self.rid, self.session_tag, action.round)
        return _WritePlan(
            staging, ops, nbytes, pre, pinned, stage, nbytes < OFFLOAD_BYTES, tag, peer.transport_id
        )

    def _first_write(self) -> None:
        if self.t_first_write is None:
            self.t_first_write = time.perf_counter()
            self.first_write_at = time.time()

    def _wrote(self, action: ev.Write, plan: _WritePlan) -> None:
        """The write returned: its bytes are the engine's (or the peer's) now."""
        if plan.pre is not None and not plan.pinned:
            self._keep_the_rest(plan.pre, plan.staging, action.count)
        self.t_last_write = time.perf_counter()
        self.writes += 1
        self.node.metrics.bytes_out.inc(plan.nbytes)
        self.feed(ev.WriteDone())

    async def _write(
        self, action: ev.Write, plan: _WritePlan, pending: Awaitable[None] | None = None
    ) -> None:
        node = self.node
        try:
            if pending is not None:  # posted already: what is left of it
                await pending
            else:
                if plan.stage is not None:
                    if plan.stage_on_loop:
                        plan.stage()
                    else:
                        await self._loop.run_in_executor(node.executor, plan.stage)
                self._first_write()
                await node.transport.write(
                    plan.peer_id, plan.ops, tag=plan.tag, deadline=action.deadline
                )
            self._wrote(action, plan)
        except Exception as exc:  # the transport failed: the machine decides what follows
            await self._write_failed(action, exc)

    async def _write_failed(self, action: ev.Write, exc: Exception) -> None:
        self.log.warning("write failed", error=repr(exc), round=action.round)
        # a dead peer usually breaks the data path a moment before its control connection
        # reports it: give that report a moment, so the caller learns the real cause
        if self.peer is not None and await self.peer.lost_soon():
            self.feed(ev.PeerLost("peer lost during the write"))
        self.feed(ev.WriteFailed(repr(exc)))

    def _keep_the_rest(self, pre: _Prestaged, staging: Allocation, written: int) -> None:
        """Pre-staged tokens past this write (staged at send() before the receiver's grant
        was known) stay staged for the next write instead of being freed and copied again."""
        b = self.node.settings.block_size
        if pre.count <= written or written % b or self.staging is not staging:
            return
        if self._prestaged is not None or not self.node.allocator.owns(staging):
            return
        head, tail = self.node.allocator.split(staging, written // b)
        self.staging = head  # FreeStaging frees what this write used
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        self._prestaged = _Prestaged(tail, pre.start + written, pre.count - written, done)
        self.node.speculative_blocks += len(tail.blocks)
        self.node.allocator.reclaimers.add(self._cleanup)

    def _prestage(self, start: int, total: int) -> None:
        """While the receiver prepares its next allocation (or, for round 0, before its Init
        arrives), stage the next tokens into blocks that are free right now (never waiting
        for blocks while the receiver holds its own; given back when anyone must wait). While
        other sessions speculate, at most half the pool is speculative: the rest serves the
        rounds under way (a burst of sends must not take it all and thrash)."""
        node = self.node
        if self._pinned is not None or self._prestaged is not None:
            return  # staged already
        total_blocks = node.allocator.num_blocks
        room = total_blocks if not node.speculative_blocks else total_blocks // 2
        room -= node.speculative_blocks
        if room <= 0:
            return
        want = min(total - start, room * node.settings.block_size)
        try:
            a = node.allocator.try_alloc(want, self.rid, min_tokens=1)
        except TransferError:
            return
        if a is None:
            return
        count = min(a.capacity_tokens, total - start)
        payload = self.payload
        assert payload is not None

        def stage() -> None:
            node.registry.write(a, payload, count=count, src_start=start)

        loop = asyncio.get_running_loop()
        if count * node.token_nbytes >= OFFLOAD_BYTES:
            copy = loop.run_in_executor(node.executor, stage)
        else:
            copy = loop.create_future()
            try:
                stage()
            except Exception as exc:  # a failed copy must not keep the blocks
                node.allocator.free(a)
                self.log.warning("pre-staging failed", error=repr(exc))
                return
            copy.set_result(None)
        self._prestaged = _Prestaged(a, start, count, copy)
        node.speculative_blocks += len(a.blocks)
        node.allocator.reclaimers.add(self._cleanup)

    def _cleanup(self) -> None:
        """Give speculative staging back: the round never came, or someone needs the blocks."""
        self.node.allocator.reclaimers.discard(self._cleanup)
        pre, self._prestaged = self._prestaged, None
        if pre is not None:
            self.node.speculative_blocks -= len(pre.allocation.blocks)
            alloc = self.node.allocator
            pre.copy.add_done_callback(lambda _: alloc.free(pre.allocation))

    def _complete(self, action: ev.Complete) -> None:
        now = time.perf_counter()
        stats = SendStats(
            rid=self.rid,
            num_tokens=action.total_tokens,
            nbytes=action.total_tokens * self.node.token_nbytes,
            rounds=self.machine.round + 1,
            writes=self.writes,
            elapsed_s=now - self.t_start,
            transfer_s=self.t_last_write - (self.t_first_write or now),
            alloc_wait_s=self.alloc_wait_s,
            digest=action.digest,
            first_write_at=self.first_write_at,
            resume_waits=self.resume_waits,
        )
        self.node.metrics.tokens_out.inc(action.total_tokens)
        self.node.metrics.transfers_ok.inc()
        self.node.metrics.duration.observe(stats.elapsed_s)
        self._set_result(stats)

    async def _crash_cleanup(self) -> None:
        if self._write_task is not None:
            await asyncio.wait([self._write_task])
        if self.staging is not None and not self._is_pinned(self.staging):
            self.node.allocator.free(self.staging)
        self.staging = None
        if self.peer is not None and self.peer.alive:
            self._send(m.Abort(rid=self.rid, reason="sender failed", session=self.session_tag))


class EncodeNode(Node):
    """Owns the encode side's pool, transport and control listener."""

    role = "encode"

    def __init__(
        self, *args: Any, control: str = "auto", encoder: Encoder | None = None, **kwargs: Any
    ) -> None:
        """``control`` picks how language nodes reach this one: ``tcp`` (a listener on
        ``host:bootstrap_port``), ``local`` (this process only), or ``auto`` (local with the
        local transport, else tcp). ``encoder`` computes embeddings for ``Encode`` jobs that
        language nodes send (see :meth:`LanguageNode.encode`)."""
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        if control not in ("auto", "tcp", "local"):
            raise ConfigError(f"invalid control={control!r}: choose auto, tcp or local")
        self._control = control
        #: payloads handed to send() that no Init claimed yet, by rid (a few per rid at most:
        #: one per owner); claimed ones live in their peer's ``sessions``
        self._offers: dict[str, list[SenderSession]] = {}
        #: (connection, rid, attempt) -> why its encode job failed, for an Init still on its
        #: way (bounded); a retry is another attempt and never sees it
        #: (reason, abort kind) of Encode jobs that failed before their Init came
        self._failed_jobs: dict[tuple[str, str, str], tuple[str, AbortKind]] = {}
        self._server: asyncio.Server | None = None
        #: where language nodes connect: ``host:port``, or ``local://...`` in-process
        self.address: str = ""
        self._handshaking = 0  # connections in their handshake now
        self.held_bytes = 0  # bytes of the payloads sessions hold (bounded by max_held_mib)
        self.speculative_blocks = 0  # pre-staged blocks no round has claimed yet

    async def start(self) -> None:
        """Start the pool and transport, and listen for language nodes (on
        ``host:bootstrap_port``, 0 picking a free port, unless the control is local)."""
        await super().start()
        if self.address:
            return
        local = self._control == "local" or (
            self._control == "auto" and self.transport.name == "local"
        )
        if local:
            self.address = register_local(self)
            return
        self._server = await control.listen(
            self.settings.host,
            self.settings.bootstrap_port,
            self.accept,
            tls=tls.server_context(self.settings),
            tls_timeout=self.settings.bootstrap_timeout,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        self.log.info("listening", address=self.address)

    async def close(self) -> None:
        unregister_local(self.address)
        if self._server is not None:
            self._server.close()
        await super().close()

    @property
    def senders(self) -> dict[str, SenderSession]:
        """The sessions in flight by rid (offers not yet claimed, and those of every peer)."""
        out = {x.rid: x for offers in self._offers.values() for x in offers}
        for peer in self.peers.values():
            out.update((r, x) for r, x in peer.sessions.items() if isinstance(x, SenderSession))
        return out

    def _unbound_sessions(self) -> list[Session]:
        return [x for offers in self._offers.values() for x in offers]

    # -- the API -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def stage(self, rid: str, num_tokens: int) -> AsyncIterator[Staged]:
        """Reserve this node's pool for one payload of ``num_tokens`` and lend it, so that an
        encoder can write its output straight into the memory the transport sends from:

            async with enc.stage(rid, n) as staged:
                model(out=staged.tensors["embeddings"])
                await enc.send(rid, staged)

        Zero copy (``staged.zero_copy``, the tensors are views into the pool) when
        ``num_tokens`` fits the pool and a run of consecutive free blocks that long exists
        now; otherwise the blocks are reserved all the same and the tensors are ordinary
        ones that ``send`` copies in (one copy, as with plain tensors, but no waiting for
        blocks once the receiver asks). Waits up to ``alloc_timeout`` for the blocks (FIFO).
        The blocks are freed when the send ends, or at exit if it never started; the
        tensors must not be used after that."""
        check_rid(rid)
        self.check_started()
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
            raise InvalidRequest(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if num_tokens > self.settings.max_tokens:
            raise PayloadError(
                f"payload of {num_tokens} tokens exceeds max_tokens={self.settings.max_tokens}"
            )
        if num_tokens > self.allocator.capacity_tokens:
            raise CapacityError(
                f"stage({num_tokens} tokens): the pool holds {self.allocator.capacity_tokens}; "
                "send() plain tensors instead (they travel in rounds)"
            )
        alloc = self.allocator.try_alloc_run(num_tokens, rid)
        if alloc is None:
            alloc = await self.allocator.alloc(num_tokens, rid, timeout=self.settings.alloc_timeout)
        views = self.registry.views(alloc, count=num_tokens)
        tensors = views if views is not None else self.registry.empty_like_payload(num_tokens)
        staged = Staged(rid, num_tokens, tensors, views is not None, alloc)
        try:
            yield staged
        finally:
            if staged.allocation is not None:  # never handed to a send
                self.allocator.free(staged.allocation)
                staged.allocation = None

    async def send(
        self,
        rid: str,
        tensors: Mapping[str, torch.Tensor] | Staged,
        meta: dict[str, Any] | None = None,
        *,
        peer: Peer | str | None = None,
        observer: StateObserver | None = None,
    ) -> SendStats:
        """Push ``tensors`` for ``rid`` to the receiver that asks for it (its ``Init`` may come
        before or after this call) and return once the last round was written. ``tensors``
        may be a :class:`Staged` from :meth:`stage` (for the same rid): then nothing is
        copied in when it is zero copy.

        ``peer`` says who may claim the payload: a :class:`Peer` (that connection only), a
        node id (a peer presenting that id on an authenticated connection), or None (any
        connected peer: the first Init for ``rid`` wins, so use it only among trusted peers).
        An Init from anyone else is refused. ``observer`` watches the request's session
        (:meth:`Session.watch`)."""
        check_rid(rid)
        self.check_started()
        staged = None
        if isinstance(tensors, Staged):
            staged, tensors = tensors, tensors.tensors
            if staged.rid != rid or staged.allocation is None:
                raise InvalidRequest(
                    f"send({rid!r}): this Staged is for rid {staged.rid!r}"
                    if staged.rid != rid
                    else f"send({rid!r}): this Staged was sent already"
                )
        num_tokens = self._check_outgoing(tensors, meta)
        if self._closing:
            raise Unavailable("node is closing")
        if why := self._over_memory(num_tokens):
            raise CapacityError(f"rid={rid!r}: {why}")
        session = self._claimed_by_init(rid, peer)
        if session is None:
            if any(_overlap(x.owner, peer) for x in self._offers.get(rid, ())):
                raise RidInFlight(f"rid {rid!r} is already in flight on this node")
            session = SenderSession(self, rid, owner=peer)
            self._offers.setdefault(rid, []).append(session)
            session.start()
        session.watch(observer)
        try:
            return await self._push(session, tensors, meta, num_tokens, staged)
        finally:
            # the caller's error may outlive this call in a traceback (and a task that keeps
            # it: a cycle only the collector breaks): none of its frames holds the payload
            del tensors, session

    async def _adopt(
        self,
        session: SenderSession,
        staged: Staged,
        tensors: Mapping[str, torch.Tensor],
        num_tokens: int,
    ) -> None:
        """The session takes the staged blocks over; every round writes from them."""
        alloc, staged.allocation = staged.allocation, None
        assert alloc is not None
        copied = asyncio.get_running_loop().create_future()
        # the session frees it when it ends, even if the copy below fails
        session._pinned = _Prestaged(alloc, 0, num_tokens, copied, pinned=True)
        if not staged.zero_copy:  # ordinary tensors: one copy into the reserved blocks

            def copy_in() -> None:
                self.registry.write(alloc, tensors, count=num_tokens)

            if num_tokens * self.token_nbytes >= OFFLOAD_BYTES:
                await asyncio.get_running_loop().run_in_executor(self.executor, copy_in)
            else:
                copy_in()
        copied.set_result(None)

    def _check_outgoing(
        self, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any] | None
    ) -> int:
        """The payload's token count, once it fits the fields, ``max_tokens`` and the wire."""
        num_tokens = self.registry.check_payload(tensors)
        if num_tokens > self.settings.max_tokens:
            raise PayloadError(
                f"payload of {num_tokens} tokens exceeds max_tokens={self.settings.max_tokens}"
            )
        if meta is not None:
            _check_meta(meta)
        return num_tokens

    async def _push(
        self,
        session: SenderSession,
        tensors: Mapping[str, torch.Tensor],
        meta: dict[str, Any] | None,
        num_tokens: int,
        staged: Staged | None = None,
    ) -> SendStats:
        digest = None
        if self.settings.verify_digest:
            digest = payload_digest(tensors, list(self.registry.layouts))
        session.payload = tensors
        session.held = num_tokens * self.token_nbytes
        self.held_bytes += session.held
        if staged is not None:
            try:
                await self._adopt(session, staged, tensors, num_tokens)
            except BaseException:
                session.feed(ev.LocalAbort("staging the payload failed"))
                raise
        elif session._prestaged is None:  # stage now: the Init finds round 0 ready to write
            session._prestage(0, num_tokens)
        session.feed(ev.DataReady(num_tokens, meta, digest))
        del tensors  # the session holds the payload until it ends; no frame of ours does
        try:
            result: SendStats = await session.outcome()  # a cancel leaves the result be
            return result
        except asyncio.CancelledError:
            if session.running:
                session.feed(ev.LocalAbort("send cancelled by caller"))
            raise
        except TransferError as exc:
            # the session's future keeps ``exc``: raised through here, its traceback would
            # hold this frame and the session, in a cycle only the garbage collector breaks.
            # The future keeps it without frames; the caller gets a copy nothing else holds.
            exc.with_traceback(None)
            raise copy.copy(exc) from None

    def _claimed_by_init(self, rid: str, owner: Owner) -> SenderSession | None:
        """An Init-first session for ``rid`` from a peer ``owner`` admits, waiting for data."""
        for peer in self.peers.values():
            session = peer.sessions.get(rid)
            if isinstance(session, SenderSession) and session.waits_for_data and _owns(owner, peer):
                return session
        return None

    # -- peers ---------------------------------------------------------------------------------
    async def accept(self, channel: Channel) -> Peer | None:
        """Serve the handshake of a language node that connected on ``channel``, unless the
        node is at its connection or handshake bound (then refuse at once, saying which)."""
        s = self.settings
        why = None
        if self._handshaking >= s.max_pending_handshakes:
            why = f"too many handshakes in progress (max_pending_handshakes={s.max_pending_handshakes})"
        elif self._handshaking + len(self.peers) >= s.max_connections:
            why = f"too many connections (max_connections={s.max_connections})"
        if why is not None:
            self.log.warning("connection refused", reason=why, via=channel.description)
            with contextlib.suppress(PeerLost):
                channel.send(m.Error(reason=why))
            channel.close()
            return None
        self._handshaking += 1
        try:
            return await self._serve_handshake(channel, client_role="language")
        finally:
            self._handshaking -= 1

    def _on_message(self, peer: Peer, msg: m.AnyMessage) -> None:
        match msg:
            case m.Init():
                self._on_init(peer, msg)
            case m.Resume():
                event: ev.Event = ev.ResumeReceived(
                    msg.round,
                    tuple(msg.blocks),
                    msg.capacity_tokens,
                    msg.received_tokens,
                    grant_deadline(msg.stamp, msg.ttl_ms),
                )
                self._to_session(peer, msg.rid, event)
            case m.Abort():
                peer.job_pieces.pop((msg.rid, msg.session), None)
                self._to_session(peer, msg.rid, ev.AbortReceived(msg.reason, msg.kind), msg.session)
            case m.JobPart():
                self._on_job_part(peer, msg)
            case m.Encode():
                self._on_encode(peer, msg)
            case m.Heartbeat():
                pass
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from a language node")

    def _refuse_rid(self, peer: Peer, rid: str, tag: str, why: str, kind: AbortKind = "") -> None:
        """Abort ``rid`` for the peer; ``kind`` (errors.ABORT_KINDS) picks its typed error."""
        self.log.warning("request refused", peer=peer.node_id, rid=rid, reason=why)
        try:
            peer.send(m.Abort(rid=rid, reason=m.reason(why), session=tag, kind=kind))
        except PeerLost:
            pass

    def _over_limit(self, peer: Peer) -> str | None:
        if self._closing:
            return "encode node closing"
        limit = self.settings.max_inflight_per_peer
        if len(peer.sessions) >= limit:
            return f"too many requests in flight from this peer (max_inflight_per_peer={limit})"
        return None

    def _on_job_part(self, peer: Peer, msg: m.JobPart) -> None:
        """A piece of a large job. A peer has at most ``max_inflight_per_peer`` jobs arriving
        (a newer one evicts the oldest), each at most ``max_job_bytes``: bounded memory."""
        key = (msg.rid, msg.session)
        pieces = peer.job_pieces.get(key)
        if pieces is _REFUSED:
            return  # the rest of a job refused already
        if pieces is None:
            while len(peer.job_pieces) >= self.settings.max_inflight_per_peer:
                del peer.job_pieces[next(iter(peer.job_pieces))]
            pieces = peer.job_pieces[key] = JobPieces(self.settings.max_job_bytes)
        if why := pieces.add(msg.key, msg.data):
            peer.job_pieces[key] = _REFUSED  # its further pieces are dropped, not answered
            self._refuse_rid(peer, msg.rid, msg.session, why, "refused")

    def _on_encode(self, peer: Peer, msg: m.Encode) -> None:
        """An Encode job: its result belongs to this connection's attempt ``msg.session``, and
        it counts against the peer's in-flight limit from now on."""
        pieces = peer.job_pieces.pop((msg.rid, msg.session), None)
        if pieces is _REFUSED:
            return  # refused while its pieces arrived
        if msg.parts or pieces is not None:
            try:
                if pieces is None:
                    raise InvalidRequest(f"the Encode names {msg.parts} pieces, none arrived")
                msg = msgspec.structs.replace(msg, job=pieces.join(msg.job, msg.parts), parts=0)
            except InvalidRequest as exc:
                self._refuse_rid(peer, msg.rid, msg.session, str(exc), "refused")
                return
        kind: AbortKind = "unavailable"
        why = self._over_limit(peer)
        if why is None and msg.rid in peer.sessions:
            why, kind = f"rid {msg.rid!r} is already in flight on this connection", ""
        if why is None and self.encoder is None:
            why, kind = "this encode node has no encoder", ""
        if why is not None:
            self._refuse_rid(peer, msg.rid, msg.session, why, kind)
            return
        self._failed_jobs.pop((peer.transport_id, msg.rid, msg.session), None)
        session = SenderSession(self, msg.rid, owner=peer, job_tag=msg.session or "-")
        session.bind(peer, msg.session)
        session.start()
        self.spawn(self._encode(peer, msg, session))

    async def _encode(self, peer: Peer, msg: m.Encode, session: SenderSession) -> None:
        """Run the encoder for a job and push the result into its own session; any failure
        aborts that attempt (and only it)."""
        try:
            assert self.encoder is not None
            out = self.encoder(msg.job)
            if asyncio.iscoroutine(out):
                out = await out
            tensors, meta = out if isinstance(out, tuple) else (out, None)
            num_tokens = self._check_outgoing(tensors, meta)
            if why := self._over_memory(num_tokens):
                raise CapacityError(why)
        except Exception as exc:
            self.log.warning("encode job failed", rid=msg.rid, error=repr(exc))
            reason = m.reason(f"encode failed: {exc}")
            kind = _job_failure_kind(exc)
            if session.running and session.machine.state is SenderState.NEW:
                # no Init yet: the receiver hears it now, its Init (if on its way) later
                self._failed_jobs[(peer.transport_id, msg.rid, msg.session)] = (reason, kind)
                while len(self._failed_jobs) > 1024:
                    del self._failed_jobs[next(iter(self._failed_jobs))]
                self._refuse_rid(peer, msg.rid, msg.session, reason, kind)
            if session.running:  # past NEW its machine tells the receiver
                session.feed(ev.LocalAbort(reason, kind))
            return
        if not session.running or session.payload is not None:
            self.log.info("encode result dropped: its request ended", rid=msg.rid)
            return
        with contextlib.suppress(TransferError):
            await self._push(session, tensors, meta, num_tokens)

    def _on_init(self, peer: Peer, msg: m.Init) -> None:
        event = ev.InitReceived(
            tuple(msg.blocks),
            msg.capacity_tokens,
            msg.expected_tokens,
            grant_deadline(msg.stamp, msg.ttl_ms),
        )
        rid, tag = msg.rid, msg.session
        session = peer.sessions.get(rid)
        if isinstance(session, SenderSession):
            if session.job_tag and session.session_tag == tag and session.running:
                session.feed(event)  # the Init of the Encode job's attempt
                return
            self._refuse_rid(peer, rid, tag, f"rid {rid!r} is already in flight on this connection")
            return
        offers = self._offers.get(rid, [])
        mine = next((x for x in offers if _owns(x.owner, peer) and x.running), None)
        if mine is not None:
            offers.remove(mine)
            if not offers:
                del self._offers[rid]
            mine.bind(peer, tag)
            if not mine.step_now(event):  # the write is posted on this turn, not the next
                mine.feed(event)
            return
        kind: AbortKind
        why, kind = self._failed_jobs.pop((peer.transport_id, rid, tag), (None, ""))
        if why is None:
            why, kind = self._over_limit(peer), "unavailable"
        if why is None and offers:
            why, kind = f"rid {rid!r} is held here for another peer", ""
        if why is None:
            waiting = sum(
                1
                for x in peer.sessions.values()
                if isinstance(x, SenderSession) and x.waits_for_data
            )
            if waiting >= (cap := self.settings.max_waiting_inits_per_peer):
                why, kind = (
                    (
                        f"no payload for rid {rid!r} here yet, and {waiting} requests of this peer "
                        f"already wait for theirs (max_waiting_inits_per_peer={cap})"
                    ),
                    "unavailable",
                )
        if why is not None:
            self._refuse_rid(peer, rid, tag, why, kind)
            return
        session = SenderSession(self, rid, owner=peer)  # Init first: send() fills it later
        session.bind(peer, tag)
        session.start()
        session.feed(event)

    def _to_session(self, peer: Peer, rid: str, event: ev.Event, tag: str = "") -> None:
        session = peer.lingering.get(tag) if tag else None  # its abandoned write still runs
        if session is None or session.rid != rid:
            session = peer.sessions.get(rid)
        if isinstance(session, SenderSession) and tag and session.session_tag != tag:
            session = None  # a message for an attempt that already ended
        if session is None or not session.running:
            self.answer_unknown(peer, SenderMachine, rid, tag, event)
            return
        if not (isinstance(event, ev.ResumeReceived) and session.step_now(event)):
            session.feed(event)  # a grant is taken at once (see _on_init); the rest in turn
        if isinstance(event, ev.AbortReceived) and peer.sessions.get(rid) is session:
            # the receiver gave this attempt up: a retry of the rid right behind the Abort
            # must not find it in the way (it still answers through its own peer)
            del peer.sessions[rid]

    def _over_memory(self, num_tokens: int) -> str | None:
        limit = int(self.settings.max_held_mib * 2**20)
        nbytes = num_tokens * self.token_nbytes
        if self.held_bytes + nbytes > limit:
            return (
                f"payload of {nbytes} bytes would pass max_held_mib={self.settings.max_held_mib} "
                f"({self.held_bytes} bytes held for receivers now)"
            )
        return None

    def session_ended(self, session: Session) -> None:
        if isinstance(session, SenderSession):
            session.payload = None  # the caller's tensors are not ours to keep
            self.held_bytes -= session.held
            session.held = 0
            if session._pinned is not None:  # every write from it has ended
                self.allocator.free(session._pinned.allocation)
                session._pinned = None
        offers = self._offers.get(session.rid)
        if offers is not None and session in offers:
            offers.remove(session)
            if not offers:
                del self._offers[session.rid]
        peer = session.peer
        if peer is not None and peer.sessions.get(session.rid) is session:
            del peer.sessions[session.rid]
        tag = session.session_tag if isinstance(session, SenderSession) else ""
        if peer is not None and tag and peer.lingering.get(tag) is session:
            del peer.lingering[tag]


def _check_meta(meta: object) -> None:
    """meta travels in ChunkDone: it must survive the wire schema (string keys, plain values)."""
    try:
        probe = m.ChunkDone(
            rid="r",
            round=0,
            start=0,
            count=1,
            total_tokens=1,
            is_last=True,
            meta=meta,  # type: ignore[arg-type]
        )
        m.decode(m.encode(probe))
    except (TypeError, ValueError, msgspec.EncodeError, ProtocolError) as exc:
        raise PayloadError(
            f"meta must be a dict with string keys and plain values: {exc}"
        ) from None
