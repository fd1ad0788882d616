"""torch.distributed data plane for torchrun deployments: gloo for CPU pools, NCCL for CUDA pools.

A write is a header (ops as field, dst offset, nbytes; the tag) then one message per op, or, for
a small write on CPU pools, one message with the payload appended. Per peer rank a link runs a
sender thread draining a FIFO and a receiver thread that keeps header receives posted, validates
each header and lands the write in the pool (drains it for a discarded tag); a small write is
posted straight from the caller's turn (``write_nowait``). A STOP header each way ends the link.
docs/transports-torch.md has the protocol, the process-group set-up and the limitations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ..buffers import BufferRegistry, WriteOp
from ..errors import ConfigError
from ..guarantees import Guarantees
from ..logs import get_logger
from .base import MAX_TAG_BYTES, Transport, TransportError, check_deadline

if TYPE_CHECKING:
    from ..settings import Settings

_log = get_logger("emtransfer.transport")
_MAGIC, _WRITE, _STOP = 0x454D54, 1, 2
#: frame 2: the preamble and body in one message, then the payloads (WRITE_HEAD), or all of it
#: in one message (WRITE_ALL, CPU pools): fewer gloo rendezvous
_WRITE_HEAD, _WRITE_ALL = 3, 4
_KINDS = (_WRITE, _STOP, _WRITE_HEAD, _WRITE_ALL)  # what a frame-2 or frame-3 header may be
#: the framing this end speaks; a link uses the lower of both ends'. 1: preamble, body and
#: payloads as separate messages. 2: WRITE_HEAD / WRITE_ALL; a header too long for the peer's
#: receive goes as frame 1. 3: as 2, but the receiver keeps ``ring`` header receives posted (a
#: gloo send waits for its receive: the writer need not wait for the receiver to post the next),
#: so its writers never send frame 1 (a header too long is split into several writes under the
#: tag), may post small writes at once, and follow their STOP with one message for each
#: receive it leaves posted
_FRAME = 3
_RING = 5  # header receives a frame-3 receiver keeps posted per link
_MAX_RING = 64  # the most a peer may announce (the STOP's padding)
_HEAD_MAX = 1 << 16  # bytes of ops and tag a frame-2 header carries at most
_INLINE_MAX = 1 << 20  # payload bytes a WRITE_ALL carries at most
_RECV_MAX = 32 + _HEAD_MAX + _INLINE_MAX  # what a frame-2 receiver posts for each header
_MAX_OPS, _MAX_TAG = 1 << 16, MAX_TAG_BYTES  # per write, both sides
_MAX_DISCARDED = 4096  # per link: beyond this, the oldest discarded tag is forgotten
_PRE = struct.Struct("=4q")  # a header's first message: magic, kind, ops, tag bytes
_FOREVER = timedelta(days=3650)  # a gloo wait that expires closes every pair of the group
#: one write's messages, how many of them are headers, whether they travel as one message
#: (messages[0] the header, the rest appended to it)
_Part = tuple[list[torch.Tensor], int, bool]
#: what a link's sender thread takes: (_SEND, parts, future, grant deadline), (_REAP, gloo
#: works posted on the loop, None, 0) or (_STOP, None, None, 0)
_SEND, _REAP, _STOPJOB = 0, 1, 2
_Job = tuple[int, Any, "asyncio.Future[None] | None", float]


def _err(msg: str) -> TransportError:
    return TransportError(f"torch transport: {msg}")


def _fits(sizes: Sequence[int], f: int, offset: int, nbytes: int) -> bool:
    return 0 <= f < len(sizes) and offset >= 0 and 0 < nbytes <= sizes[f] - offset


@dataclass(eq=False)
class _Link:
    """This node's end of the link with one peer rank."""

    rank: int
    tag: int  # the peer's header tag; its payload tag is tag + 1
    sizes: list[int]  # the peer's pool bytes per field
    peer_id: str | None  # None once removed: what still arrives is drained
    name: str = ""  # the peer id it was added under, kept after removal
    error: str | None = None
    sent_stop: bool = False
    busy: bool = False  # receiving into the pool right now
    current: str | None = None  # the tag of that receive
    #: tags whose writes are drained, not landed (insertion-ordered, capped); under _mu
    discarded: dict[str, None] = field(default_factory=dict)
    #: discard() callers waiting for the receive into the pool in progress to end; under _mu
    fences: list[asyncio.Future[None]] = field(default_factory=list)
    jobs: queue.SimpleQueue[_Job] = field(default_factory=queue.SimpleQueue)
    threads: list[threading.Thread] = field(default_factory=list)
    #: held to post on the loop's turn (write_nowait) and to queue our STOP: nothing is
    #: posted behind the STOP
    post_mu: threading.Lock = field(default_factory=threading.Lock)
    #: writes posted on the loop's turn, and how many of them the sender thread saw end;
    #: the loop times of those still running (oldest first), and the timer watching them
    posts: int = 0
    reaped: int = 0
    running: deque[float] = field(default_factory=deque)
    watchdog: asyncio.TimerHandle | None = None
    #: receives left posted when the receiver thread ended on an error: kept alive (gloo
    #: may still fill them), and the rank cannot be linked again
    stale: list[Any] = field(default_factory=list)
    landed: dict[str, int] = field(default_factory=dict)
    waiters: dict[str, tuple[int, asyncio.Future[None]]] = field(default_factory=dict)
    #: the link's framing (see _FRAME), the header message the peer posts receives for
    #: (frame 2 on), and how many it keeps posted (frame 3)
    frame: int = 1
    recv_max: int = 0
    ring: int = 1


#: what torch.distributed's env:// rendezvous reads (torchrun sets them)
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TorchTransport(Transport):
    name = "torch"
    #: a completed isend is not yet in the peer's pool; but the receiver's thread reads every
    #: write itself: discard drains a tag into scratch (or raises), remove_peer stops the
    #: link (or raises when a receive into the pool does not end within ``grace``)
    GUARANTEES = Guarantees(
        remote_completion=False, fences_tag=True, remove_stops_inbound=True, authorizes_writes=True
    )

    def __init__(
        self,
        registry: BufferRegistry,
        *,
        grace: float = 5.0,
        write_timeout: float = 30.0,
        init_timeout: float = 30.0,
    ) -> None:
        super().__init__(registry, post_bound=write_timeout)
        self._grace, self._write_timeout, self._init_timeout = grace, write_timeout, init_timeout
        self._fields = list(registry.layouts)
        self._views = [registry.byte_view(f) for f in self._fields]
        self._sizes = [v.numel() for v in self._views]
        self._device = self._views[0].device
        self._cuda = self._device.type == "cuda"
        self._tag = 1000 + 2 * secrets.randbelow(1 << 20)  # apart from other users of the group
        self._rank = self._world = -1
        self._ctl: Any = None  # the gloo group for headers (None: the default group)
        self._data: Any = None  # the group for payloads: _ctl, or an NCCL one for CUDA pools
        self._owns = self._closing = False
        self._mu = threading.Condition()
        self._peers: dict[str, _Link] = {}
        self._links: dict[int, _Link] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: Settings, registry: BufferRegistry) -> TorchTransport:
        if not dist.is_initialized():  # fail now, not at start() with torch's own words
            missing = [v for v in _RENDEZVOUS if v not in os.environ]
            if missing:
                raise ConfigError(
                    "invalid setting transport='torch': it runs inside a torch.distributed "
                    f"job; start the processes with torchrun (or set {', '.join(_RENDEZVOUS)}); "
                    f"not set here: {', '.join(missing)}"
                )
        return cls(
            registry,
            grace=settings.abort_ack_timeout,
            write_timeout=settings.write_timeout,
            init_timeout=max(settings.bootstrap_timeout, settings.chunk_timeout),
        )

    @classmethod
    def unavailable(cls) -> str | None:
        if dist.is_available() and dist.is_gloo_available():  # headers use gloo, even for CUDA
            return None
        return "this torch build has no torch.distributed with the gloo backend"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._init_groups)
        except Exception as exc:
            raise _err(f"cannot set up the process group: {exc}") from exc

    def _init_groups(self) -> None:
        if self._cuda and not dist.is_nccl_available():
            raise _err("CUDA pools need NCCL, which this torch build lacks")
        if not dist.is_initialized():  # from torchrun's RANK, WORLD_SIZE, MASTER_ADDR/PORT
            backend = "cpu:gloo,cuda:nccl" if self._cuda else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=self._init_timeout))
            self._owns = True
        backend = str(dist.get_backend())
        self._ctl = None if "gloo" in backend else dist.new_group(backend="gloo")
        self._data = self._ctl
        if self._cuda:
            self._data = None if "nccl" in backend else dist.new_group(backend="nccl")
        self._rank, self._world = dist.get_rank(), dist.get_world_size()

    def metadata(self) -> bytes:
        if self._rank < 0:
            raise _err("metadata() before start()")
        return json.dumps(
            {
                "rank": self._rank,
                "world": self._world,
                "tag": self._tag,
                "device": self._device.type,
                "pools": dict(zip(self._fields, self._sizes, strict=True)),
                "frame": _FRAME,
                "recv_max": _RECV_MAX,
                "ring": _RING,
            }
        ).encode()

    async def add_peer(self, peer_id: str, metadata: bytes, *, secret: bytes = b"") -> None:
        try:
            meta = json.loads(metadata)
            rank, world, tag = (int(meta[k]) for k in ("rank", "world", "tag"))
            pools = {str(k): int(v) for k, v in meta["pools"].items()}
            frame, recv_max = int(meta.get("frame", 1)), int(meta.get("recv_max", 0))
            ring = int(meta.get("ring", 1))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _err(f"bad peer metadata: {exc!r}") from exc
        if not 1 <= ring <= _MAX_RING:
            raise _err(f"bad peer metadata: ring {ring} is not in 1..{_MAX_RING}")
        if list(pools) != self._fields or meta.get("device") != self._device.type:
            raise _err("the peer's fields or device kind differ")
        if world != self._world or not 0 <= rank < world or rank == self._rank:
            raise _err(f"rank {rank} of {world} is no peer of rank {self._rank} of {self._world}")
        old = self._links.get(rank)
        if peer_id in self._peers or (old and any(t.is_alive() for t in old.threads)):
            raise _err(f"{peer_id!r} or rank {rank} is still linked")
        if old and old.stale:  # they would take the new link's first messages
            raise _err(f"rank {rank}'s link broke with receives posted: it cannot be linked again")
        link = _Link(rank, tag, list(pools.values()), peer_id, peer_id)
        if frame >= 2 and recv_max >= 32:  # an older peer gets the frame-1 messages
            link.frame, link.recv_max = min(frame, _FRAME), recv_max
            link.ring = ring if link.frame >= 3 else 1
        self._peers[peer_id] = self._links[rank] = link
        for fn in (self._sender, self._receiver):
            link.threads.append(
                threading.Thread(
                    target=fn,
                    args=(link,),
                    daemon=True,
                    name=f"emtransfer-torch{fn.__name__}-{rank}",
                )
            )
            link.threads[-1].start()

    def _peer(self, peer_id: str) -> _Link:
        if (link := self._peers.get(peer_id)) is None:
            raise _err(f"unknown peer {peer_id!r}")
        return link

    async def write(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> None:
        link = self._peer(peer_id)
        if not ops:
            return
        await self._queue(link, self._frames(link, ops, tag), tag, deadline)

    async def _queue(self, link: _Link, parts: list[_Part], tag: str, deadline: float) -> None:
        """Hand the write to the link's sender thread and wait for it, within write_timeout."""
        # the sender thread settles it through _settle (a no-op once it is cancelled): awaited
        # directly, its completion is one hop of the loop (shield and wait_for added three)
        fut = asyncio.get_running_loop().create_future()
        with self._mu:
            if link.error or link.sent_stop:  # nothing may queue behind our STOP
                raise _err(f"peer {link.name!r} is unusable: {link.error or 'stopped'}")
            link.jobs.put((_SEND, parts, fut, deadline))
        try:
            async with asyncio.timeout(self._write_timeout):
                await fut
        except TimeoutError:
            self._break(link, f"write {tag!r} did not complete in {self._write_timeout}s")
            raise _err(f"write {tag!r} to {link.name!r} timed out") from None

    def write_nowait(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> Awaitable[None] | None:
        """A write that travels as one message (frame 3, CPU pools) is posted here, on the
        caller's turn, and is done (None): its bytes were copied into that message, so the
        source may be reused at once. The sender thread waits for the send to end, and a send
        that does not end within write_timeout breaks the link, as a timed-out ``write`` does.
        Every other write is ``write``."""
        link = self._peers.get(peer_id)
        if link is None or link.frame < 3 or self._cuda or not ops:
            return self.write(peer_id, ops, tag=tag, deadline=deadline)
        parts = self._frames(link, ops, tag)
        if len(parts) != 1 or not parts[0][2]:
            return self._queue(link, parts, tag, deadline)
        msg = torch.cat(parts[0][0])
        with link.post_mu:
            if link.error or link.sent_stop:  # a removed peer is not in _peers any more
                raise _err(f"peer {peer_id!r} is unusable: {link.error or 'stopped'}")
            check_deadline(deadline, f"torch transport: write to rank {link.rank}")
            work = dist.isend(msg, dst=link.rank, group=self._ctl, tag=link.tag)
            link.jobs.put((_REAP, [work], None, 0.0))
        link.posts += 1
        loop = asyncio.get_running_loop()
        link.running.append(loop.time())
        if link.watchdog is None:
            link.watchdog = loop.call_later(self._write_timeout, self._watch, link)
        return None

    def _watch(self, link: _Link) -> None:
        """On the loop: the oldest write posted on the loop's turn that has not ended must end
        within write_timeout of its post, or the link is broken."""
        link.watchdog = None
        while len(link.running) > link.posts - link.reaped:  # ended, oldest first
            link.running.popleft()
        if not link.running or link.error:
            return
        due = link.running[0] + self._write_timeout
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self._break(link, f"a write did not complete in {self._write_timeout}s")
            return
        link.watchdog = loop.call_at(due, self._watch, link)

    def _frames(self, link: _Link, ops: Sequence[WriteOp], tag: str) -> list[_Part]:
        """The messages of one write: frame 1 for an older peer; else one header per part (the
        ops split where a header would not fit the peer's receive) and, for CPU pools, the
        payload appended to it when it fits that receive too."""
        if link.frame < 2:
            return [(self._encode(link, ops, tag), 2, False)]
        rows, srcs, tb = self._check(link, ops, tag)
        per = (link.recv_max - _PRE.size - len(tb)) // 24  # ops one header can carry
        if per < 1:
            raise _err(f"a {len(tb)}-byte tag leaves no room for an op in the peer's header")
        if len(rows) > per and link.frame < 3:  # a frame-2 peer takes frame 1 for it
            return [(self._encode(link, ops, tag), 2, False)]
        return [
            self._part(link, rows[i : i + per], srcs[i : i + per], tb)
            for i in range(0, len(rows), per)
        ]

    def _part(
        self,
        link: _Link,
        rows: list[tuple[int, int, int]],
        srcs: list[torch.Tensor],
        tb: bytes,
        *,
        pack: bool = True,
    ) -> _Part:
        """One header of ``rows`` and its payload slices (``pack``: appended when they fit)."""
        flat = [x for row in rows for x in row]
        body = struct.pack(f"={len(flat)}q", *flat) + tb
        hlen = _PRE.size + len(body)
        total = sum(nb for *_, nb in rows)
        packed = pack and not self._cuda and total <= _INLINE_MAX and hlen + total <= link.recv_max
        kind = _WRITE_ALL if packed else _WRITE_HEAD
        head = torch.frombuffer(
            bytearray(_PRE.pack(_MAGIC, kind, len(rows), len(tb)) + body), dtype=torch.uint8
        )
        return [head, *srcs], 1, packed

    def _check(
        self, link: _Link, ops: Sequence[WriteOp], tag: str
    ) -> tuple[list[tuple[int, int, int]], list[torch.Tensor], bytes]:
        """Check ``ops`` against both pools: (field, dst offset, nbytes) rows, source slices."""
        tb = tag.encode()
        if len(ops) > _MAX_OPS or len(tb) > _MAX_TAG:
            raise _err(f"{len(ops)} ops or a {len(tb)}-byte tag is too many for one write")
        rows, srcs = [], []
        for op in ops:
            f = self._fields.index(op.field) if op.field in self._fields else -1
            if not (
                _fits(self._sizes, f, op.src_offset, op.nbytes)
                and _fits(link.sizes, f, op.dst_offset, op.nbytes)
            ):
                raise _err(f"descriptor {op} runs past a pool")
            rows.append((f, op.dst_offset, op.nbytes))
            srcs.append(self._views[f][op.src_offset : op.src_offset + op.nbytes])
        return rows, srcs, tb

    def _encode(self, link: _Link, ops: Sequence[WriteOp], tag: str) -> list[torch.Tensor]:
        """Frame 1: check ``ops``; the preamble and body tensors, then the source slices."""
        rows, srcs, tb = self._check(link, ops, tag)
        # int64s in native byte order, as torch.tensor(..., dtype=torch.int64) lays them out
        pre = torch.frombuffer(
            bytearray(_PRE.pack(_MAGIC, _WRITE, len(rows), len(tb))), dtype=torch.int64
        )
        flat = [x for row in rows for x in row]
        body = torch.frombuffer(
            bytearray(struct.pack(f"={len(flat)}q", *flat) + tb), dtype=torch.uint8
        )
        return [pre, body, *srcs]

    def landed(self, peer_id: str, tag: str, nbytes: int) -> bool:
        link = self._peers.get(peer_id)
        if link is None or tag in link.waiters or link.landed.get(tag, 0) < nbytes:
            return False  # wait_landed waits, or says why it cannot
        del link.landed[tag]
        return True

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        link = self._peer(peer_id)
        if tag in link.waiters:
            raise _err(f"{tag!r} is already waited on")
        try:
            if link.landed.get(tag, 0) < nbytes:
                if link.error:
                    raise _err(f"cannot wait for {tag!r}: {link.error}")
                if tag in link.discarded:
                    raise _err(f"tag {tag!r} from {peer_id!r} was discarded")
                fut = asyncio.get_running_loop().create_future()
                link.waiters[tag] = (nbytes, fut)
                await fut
        finally:
            link.landed.pop(tag, None)
            link.waiters.pop(tag, None)

    async def discard(self, peer_id: str, tag: str) -> None:
        """From now on writes under ``tag`` from ``peer_id`` are drained into scratch. A receive of
        that tag already posted into the pool cannot be cancelled: wait (up to ``grace``) until it
        completed. If it does not, break the link and raise: bytes of ``tag`` may still land, so
        the caller must keep the destination blocks out of use."""
        self.grants.revoke(peer_id, tag)
        loop = asyncio.get_running_loop()
        for link in [lk for lk in self._links.values() if lk.name == peer_id]:  # removed too
            fut: asyncio.Future[None] | None = None
            with self._mu:
                link.discarded.pop(tag, None)
                link.discarded[tag] = None
                while len(link.discarded) > _MAX_DISCARDED:
                    del link.discarded[next(iter(link.discarded))]
                if link.busy and link.current == tag:
                    fut = loop.create_future()
                    link.fences.append(fut)
            link.landed.pop(tag, None)
            _, waiter = link.waiters.pop(tag, (0, None))
            if waiter is not None and not waiter.done():
                waiter.set_exception(_err(f"tag {tag!r} from {peer_id!r} was discarded"))
            if fut is None:
                continue
            try:
                await asyncio.wait_for(asyncio.shield(fut), self._grace)
            except TimeoutError:
                with self._mu:
                    if fut in link.fences:
                        link.fences.remove(fut)
                why = f"a receive of discarded tag {tag!r} did not end in {self._grace}s"
                self._break(link, why)
                raise _err(f"{peer_id!r}: {why}; its bytes may still land") from None

    async def remove_peer(self, peer_id: str) -> None:
        self.grants.drop_peer(peer_id)
        link = self._peers.pop(peer_id, None)
        if link is not None:
            self._retire(link, "peer removed")
            if not await asyncio.to_thread(self._quiesce, [link], self._grace):
                raise _err(
                    f"a receive from removed rank {link.rank} is still running after "
                    f"{self._grace}s: its bytes may still land"
                )

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        links = list(self._links.values())
        self._peers.clear()
        for link in links:
            self._retire(link, "transport closed")
        await asyncio.to_thread(self._quiesce, links, self._grace)
        stuck = [lk.rank for lk in links if any(t.is_alive() for t in lk.threads)]
        if stuck:  # e.g. a peer that never added us: our STOP stays parked in a daemon thread
            _log.warning("torch transport: links did not finish closing", ranks=stuck)
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()

    # -- link threads --------------------------------------------------------------------------
    def _retire(self, link: _Link, reason: str) -> None:
        with self._mu:
            link.peer_id = None
        if link.watchdog is not None:  # on the loop: nothing is posted at once any more
            link.watchdog.cancel()
            link.watchdog = None
        self._fail(link, reason)
        self._stop(link)

    def _stop(self, link: _Link) -> None:
        """Queue our STOP behind the writes already queued or posted; once per link."""
        with link.post_mu, self._mu:
            if not link.sent_stop:
                link.sent_stop = True
                link.jobs.put((_STOPJOB, None, None, 0.0))

    def _quiesce(self, links: list[_Link], timeout: float) -> bool:
        """Wait (bounded) for the links' threads to end; True once none receives into a pool."""
        deadline = time.monotonic() + timeout
        for t in [t for lk in links for t in lk.threads]:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._mu:
            return self._mu.wait_for(
                lambda: not any(lk.busy for lk in links), max(0.0, deadline - time.monotonic())
            )

    def _wait(self, works: list[Any]) -> None:
        for w in works:
            w.wait(_FOREVER)
        if self._cuda:
            torch.cuda.current_stream(self._device).synchronize()

    def _sender(self, link: _Link) -> None:
        if self._cuda:
            torch.cuda.set_device(self._device)
        while True:
            kind, item, fut, deadline = link.jobs.get()
            if kind == _STOPJOB:  # our last message on this link (and the padding, frame 3)
                stop = torch.tensor([_MAGIC, _STOP, 0, 0], dtype=torch.int64)
                try:
                    self._wait(
                        [
                            dist.isend(stop, dst=link.rank, group=self._ctl, tag=link.tag)
                            for _ in range(link.ring)
                        ]
                    )
                except Exception as e:
                    _log.debug("torch transport: STOP not delivered", rank=link.rank, error=str(e))
                return
            if kind == _REAP:  # a write posted on the loop's turn: wait for it to end
                try:
                    self._wait(item)
                except Exception as e:
                    self._break(link, f"send to rank {link.rank}: {e}")
                finally:
                    link.reaped += 1
                continue
            assert fut is not None
            try:
                with self._mu:
                    if link.peer_id is None or link.error:
                        raise _err(f"peer gone before the write started: {link.error or 'removed'}")
                check_deadline(deadline, f"torch transport: write to rank {link.rank}")
                works = []
                for msgs, nhead, packed in item:
                    if packed:  # the payload appended to the header: one message
                        msgs = [torch.cat(msgs)]
                    works += [
                        dist.isend(t, dst=link.rank, group=self._ctl, tag=link.tag)
                        for t in msgs[:nhead]
                    ]
                    works += [
                        dist.isend(t, dst=link.rank, group=self._data, tag=link.tag + 1)
                        for t in msgs[nhead:]
                    ]
                self._wait(works)
                self._post(_settle, fut, None)
            except Exception as e:
                exc = e if isinstance(e, TransportError) else _err(f"send to rank {link.rank}: {e}")
                if exc is not e:
                    self._break(link, str(exc))
                self._post(_settle, fut, exc)

    def _receiver(self, link: _Link) -> None:
        if self._cuda:
            torch.cuda.set_device(self._device)
        try:
            if link.frame >= 2:
                self._receive_frames(link)
            else:
                pre = torch.empty(4, dtype=torch.int64)
                while self._receive_one(link, pre):
                    pass
        except Exception as exc:  # the peer died, or its stream cannot be followed any more
            self._break(link, f"receive from rank {link.rank} failed: {exc}")

    def _receive_frames(self, link: _Link) -> None:
        """A frame-2 or frame-3 peer's writes, each header received into a buffer of
        ``_RECV_MAX`` bytes. Frame 3: ``_RING`` receives stay posted, each posted again once
        its write is handled; the peer's STOP is followed by its padding for the rest. Frame 2
        (the peer may send a frame-1 write, whose body follows its header on the same tag):
        one receive, the next posted into the other buffer once the header's kind allows,
        before its write is handled. Either way the sender does not wait on us to post a
        receive (a gloo send waits for its receive) while we handle a write."""
        early = link.frame < 3
        bufs = [torch.empty(_RECV_MAX, dtype=torch.uint8) for _ in range(2 if early else _RING)]
        raws = [b.numpy() for b in bufs]
        posted: deque[tuple[int, Any]] = deque()
        spare = deque(range(len(bufs)))

        def post(k: int) -> None:
            posted.append((k, dist.irecv(bufs[k], src=link.rank, group=self._ctl, tag=self._tag)))

        for _ in range(1 if early else len(bufs)):
            post(spare.popleft())
        try:
            while True:
                k, work = posted[0]
                self._wait([work])
                posted.popleft()
                head = self._header(link, bufs[k], raws[k], early)
                if head is None:  # the peer's STOP
                    self._wait([w for _, w in posted])  # its padding: nothing stays posted
                    posted.clear()
                    return
                kind, ops, tag, payload = head
                if early and kind != _WRITE:
                    post(spare.popleft())
                    self._handle_write(link, ops, tag, payload)
                    spare.append(k)
                else:
                    self._handle_write(link, ops, tag, payload)
                    post(k)
        finally:  # gloo may still fill what is posted: keep it alive
            link.stale = [*(w for _, w in posted), *bufs] if posted else []

    def _header(
        self, link: _Link, buf: torch.Tensor, raw: np.ndarray[Any, Any], early: bool
    ) -> tuple[int, list[list[int]], str, torch.Tensor | None] | None:
        """The write whose header arrived in ``buf``: its kind, ops, tag and (WRITE_ALL) its
        payload, still in ``buf``; None for the peer's STOP."""
        _, kind, n, tlen = pre = _PRE.unpack_from(raw.data, 0)
        if not self._preamble(link, pre, _KINDS):
            return None
        end = _PRE.size + 24 * n + tlen
        if kind == _WRITE:  # frame 1: the body is a message of its own
            if not early:
                raise _err("a frame-1 write from a peer that speaks frame 3")
            body_t = torch.empty(24 * n + tlen, dtype=torch.uint8)
            self._wait([dist.irecv(body_t, src=link.rank, group=self._ctl, tag=self._tag)])
            body, payload = body_t.numpy(), None
        elif end > _RECV_MAX or (kind == _WRITE_ALL and self._cuda):
            raise _err(f"a header of kind {kind} this receiver cannot take")
        else:
            body = raw[_PRE.size : end]
            payload = buf[end:] if kind == _WRITE_ALL else None
        ops = body[: 24 * n].view(np.int64).reshape(n, 3).tolist()
        tag = body[24 * n :].tobytes().decode("utf-8", "replace")
        if payload is not None and sum(nb for *_, nb in ops) > payload.numel():
            raise _err(f"write {tag!r}: its ops run past the message")
        return kind, ops, tag, payload

    def _preamble(self, link: _Link, pre: Sequence[int], kinds: tuple[int, ...]) -> bool:
        """Check a header's preamble (magic, kind among ``kinds``, ops, tag bytes); False for
        the peer's STOP, answered with ours; raises for one this receiver cannot follow."""
        magic, kind, n, tlen = pre
        if magic != _MAGIC or kind not in kinds:
            raise _err(f"not a header: {list(pre)}")
        if kind == _STOP:
            self._break(link, f"rank {link.rank} closed the link", quiet=True)
            self._stop(link)
            return False
        if not (0 < n <= _MAX_OPS and 0 <= tlen <= _MAX_TAG):
            raise _err(f"a header announces {n} ops and a {tlen}-byte tag")
        return True

    def _receive_one(self, link: _Link, pre: torch.Tensor) -> bool:
        self._wait([dist.irecv(pre, src=link.rank, group=self._ctl, tag=self._tag)])
        _, _, n, tlen = pream = pre.tolist()
        if not self._preamble(link, pream, (_WRITE, _STOP)):
            return False
        body = torch.empty(24 * n + tlen, dtype=torch.uint8)
        self._wait([dist.irecv(body, src=link.rank, group=self._ctl, tag=self._tag)])
        ops: list[list[int]] = body[: 24 * n].view(torch.int64).view(n, 3).tolist()
        tag = bytes(body[24 * n :].numpy()).decode("utf-8", "replace")
        self._handle_write(link, ops, tag, None)
        return True

    def _handle_write(
        self, link: _Link, ops: list[list[int]], tag: str, payload: torch.Tensor | None
    ) -> None:
        """Validate a write's ops and land it (or drain it): its payload is received op by op,
        or (WRITE_ALL) was received with the header, ``payload`` holding it from its start
        (the caller checked that it holds every op)."""
        bad = next((op for op in ops if not _fits(self._sizes, *op)), None)
        if bad is not None:
            if payload is None and not all(0 < nb <= max(self._sizes) for _, _, nb in ops):
                raise _err(f"write {tag!r}: op {bad} cannot even be drained")
            self._break(link, f"refused write {tag!r}: (field, dst, nbytes)={bad} is off the pool")
        elif tag not in link.discarded and link.peer_id is not None:
            grants = self.grants  # read-only here; the loop thread adds and revokes
            why = next(
                (
                    w
                    for f, d, nb in ops
                    if (w := grants.refusal(link.peer_id, tag, self._fields[f], d, nb))
                ),
                None,
            )
            if why is not None:
                bad = ops[0]
                self._break(link, f"refused write outside this node's grants: {why}")
        with self._mu:
            live = link.busy = (
                bad is None
                and link.error is None
                and link.peer_id is not None
                and tag not in link.discarded
            )
            if live:
                link.current = tag
                self._mu.notify_all()
        try:
            if payload is not None:  # in already: copied into the pool, or left where it is
                if live:
                    off = 0
                    for f, d, nb in ops:
                        self._views[f][d : d + nb].copy_(payload[off : off + nb])
                        off += nb
            else:
                if live:
                    dsts = [self._views[f][d : d + nb] for f, d, nb in ops]
                else:  # refused, broken or removed: drain, so that the sender's sends complete
                    scratch = torch.empty(
                        max(nb for *_, nb in ops), dtype=torch.uint8, device=self._device
                    )
                    dsts = [scratch[:nb] for *_, nb in ops]
                self._wait(
                    [
                        dist.irecv(t, src=link.rank, group=self._data, tag=self._tag + 1)
                        for t in dsts
                    ]
                )
        finally:
            with self._mu:
                link.busy, link.current = False, None
                fences, link.fences = link.fences, []
                self._mu.notify_all()
            for fut in fences:
                self._post(_wake, fut)
        if live:
            self._post(self._landed, link, tag, sum(nb for *_, nb in ops))

    def _break(self, link: _Link, reason: str, *, quiet: bool = False) -> None:
        with self._mu:
            first, quiet = link.error is None, quiet or self._closing or link.peer_id is None
            link.error = link.error or reason
        if first and not quiet:
            _log.warning("torch transport: link unusable", rank=link.rank, reason=reason)
        self._post(self._fail, link, reason)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            if self._loop is not None:
                self._loop.call_soon_threadsafe(fn, *args)

    # -- on the event loop ---------------------------------------------------------------------
    def _landed(self, link: _Link, tag: str, nbytes: int) -> None:
        if link.peer_id is None or tag in link.discarded:  # discarded while it was received
            return
        got = link.landed[tag] = link.landed.get(tag, 0) + nbytes
        want, fut = link.waiters.get(tag, (0, None))
        if fut is not None and got >= want and not fut.done():
            fut.set_result(None)

    def _fail(self, link: _Link, reason: str) -> None:
        for _, fut in list(link.waiters.values()):
            if not fut.done():
                fut.set_exception(_err(f"rank {link.rank}: {reason}"))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    """A write's outcome, unless its writer stopped waiting (timed out or cancelled)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


TRANSPORT = TorchTransport
