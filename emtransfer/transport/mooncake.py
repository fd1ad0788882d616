"""Mooncake Transfer Engine data plane: one engine per node (P2P handshake: no metadata server),
the pools registered once, every ``write`` one batched one-sided WRITE that carries a
notification ``tag NUL nbytes``. The engine reports a WRITE complete once the target applied
it (TCP: the receiver's acknowledgement, protocol v2; RDMA: the reliable connection's
completion) and only then sends the notification; the target consumes the notifications in
:meth:`wait_landed`. Details and guarantees: docs/transports-mooncake.md."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from ..buffers import BufferRegistry, WriteOp
from ..guarantees import Guarantees
from ..logs import get_logger
from . import mooncake_env as env
from .base import Transport, TransportError, check_deadline

if TYPE_CHECKING:
    from ..settings import Settings

_VERSION = 1
HANDSHAKE = "P2PHANDSHAKE"  # peers exchange segment descriptors directly, no metadata server
_log = get_logger("emtransfer.transport")
#: engines of closed transports. Destroying one holds the GIL for about a second (it joins its
#: handshake listener), which would stall the event loop: with its pools deregistered first,
#: it is kept, idle, until the process exits
_RETIRED: list[Any] = []


class _Meta(msgspec.Struct, frozen=True):
    v: int
    name: str  # the name our notifications carry
    session: str  # "host:rpc_port", the engine's segment name; empty without inbound
    protocol: str
    pools: dict[str, tuple[int, int]]  # field -> (base address, nbytes); empty without inbound


@dataclass(eq=False)
class _Peer:
    name: str
    session: str
    pools: dict[str, tuple[int, int]]
    #: its writes, one at a time: a peer that stalls holds up only its own
    thread: cf.ThreadPoolExecutor | None = None
    inflight: set[cf.Future[None]] = field(default_factory=set)


class MooncakeTransport(Transport):
    """One-sided Mooncake writes between registered pools, over ``tcp`` or ``rdma``. The
    engine's blocking batch call runs in a thread of the peer's own (it releases the GIL and
    waits for the target's completion and the notification's delivery), so a stalled peer
    holds up no other; the loop only drains notifications."""

    name = "mooncake"
    #: write() returns once the engine reports the batch COMPLETED, i.e. applied at the target
    #: (and notified). The engine cannot cancel a posted write, and a peer's writes into our
    #: registered pools are one-sided: neither discard nor remove_peer stops them, and nothing
    #: checks them against the grants. Only the grant's deadline (checked at posting) bounds them.
    GUARANTEES = Guarantees(remote_completion=True, fences_tag=False, remove_stops_inbound=False)
    sweep_interval = 1.0  # seconds between background drains of notifications
    poll_s = 1e-3  # a waiter's drain interval (asyncio wakes no finer than 1 ms anyway)
    max_tags = 1 << 16  # notified tags kept at most (a hostile sender cannot grow this)

    def __init__(
        self,
        registry: BufferRegistry,
        *,
        host: str = "127.0.0.1",
        protocol: str = "tcp",
        devices: str | None = None,
        location: str | None = None,
        post_bound: float = 10.0,
        notif_ttl: float = 300.0,
        engine_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(registry, post_bound=post_bound)
        self.host, self.protocol, self.devices = host, protocol, devices or ""
        self.notif_ttl = notif_ttl  # how long notifications nobody waits for are kept
        self._device = next(iter(registry.pools.values())).device
        self._cuda = self._device.type == "cuda"
        self.location = env.pool_location(self._device.type, self._device.index, location)
        self._factory = engine_factory
        self._pool = self._executor("emtransfer-mooncake")  # start and close
        self._engine: Any = None
        self._notify: Any = None  # TransferNotify
        self._write_op: Any = None  # TransferOpcode.Write
        self._name = f"emtransfer-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._meta = b""
        self._local: dict[str, tuple[int, int]] = {}
        self._registered: list[int] = []
        self._peers: dict[str, _Peer] = {}
        self._landed: dict[tuple[str, str], list[float]] = {}  # (name, tag) -> [nbytes, seen]
        self._waiters: dict[tuple[str, str], tuple[str, int, asyncio.Future[None]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    @functools.cache
    def unavailable(cls) -> str | None:
        """Why the engine cannot run here (libibverbs, the mooncake module); cached."""
        return env.unavailable()

    @classmethod
    def from_settings(cls, settings: Settings, registry: BufferRegistry) -> MooncakeTransport:
        """The transport of ``settings`` (protocol, RDMA devices, pool location, host, the
        write bound), refused with a ConfigError where this machine or engine build cannot."""
        kind = next(iter(registry.pools.values())).device.type
        env.check_config(
            protocol=settings.mooncake_protocol,
            devices=settings.mooncake_devices,
            host=settings.host,
            pool_kind=kind,
            support_cuda=bool(getattr(env.load_engine(), "SUPPORT_CUDA", False)),
            environ=os.environ,
        )
        return cls(
            registry,
            host=settings.host,
            protocol=settings.mooncake_protocol,
            devices=settings.mooncake_devices,
            location=settings.mooncake_location,
            post_bound=settings.write_timeout,
        )

    async def start(self) -> None:
        if self._closed:
            raise TransportError("mooncake transport is closed")
        if self._engine is None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._open)
            if self.inbound:  # an encode node is never notified: nothing to sweep
                self._tasks.append(asyncio.create_task(self._sweep(), name="emtransfer:mc-sweep"))

    def _open(self) -> None:
        env.prepare_environment(self.post_bound)
        if self._factory is None:
            module = env.load_engine()
            factory, notify, op = (
                module.TransferEngine,
                module.TransferNotify,
                module.TransferOpcode,
            )
        else:
            factory, notify, op = self._factory, _Notify, _Op
        for name in self.registry.layouts:
            view = self.registry.byte_view(name)
            self._local[name] = (view.data_ptr(), view.numel())
        try:
            engine = factory()
            rc = engine.initialize(self.host, HANDSHAKE, self.protocol, self.devices)
            if rc != 0:
                raise TransportError(f"initialize returned {rc}")
            # sources need no registration over tcp: an encode node then has nothing a write
            # could land in; rdma needs its sources registered (their keys)
            if self.inbound or self.protocol == "rdma":
                addrs = [a for a, _ in self._local.values()]
                sizes = [n for _, n in self._local.values()]
                rc = engine.batch_register_memory(addrs, sizes, self.location)
                if rc != 0:
                    raise TransportError(f"registering the pools returned {rc}")
                self._registered = addrs
            session = _session(self.host, engine.get_rpc_port()) if self.inbound else ""
        except Exception as exc:
            raise TransportError(
                f"mooncake: cannot start the engine ({self.protocol} on {self.host}): {exc}"
            ) from exc
        pools = dict(self._local) if self.inbound else {}
        meta = _Meta(_VERSION, self._name, session, self.protocol, pools)
        self._meta, self._notify, self._write_op = msgspec.msgpack.encode(meta), notify, op.Write
        self._engine = engine

    def metadata(self) -> bytes:
        self._require()
        return self._meta

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in [*self._tasks, self._poller]:
            if task is not None:
                task.cancel()
        for peer_id in list(self._peers):
            await self.remove_peer(peer_id)
        engine, self._engine = self._engine, None
        if engine is not None:  # nothing lands in the pools once they are deregistered
            await asyncio.get_running_loop().run_in_executor(self._pool, self._retire, engine)
        self._pool.shutdown(wait=False)

    def _retire(self, engine: Any) -> None:
        for addr in self._registered:
            if (rc := engine.unregister_memory(addr)) != 0:
                _log.warning("mooncake: unregister_memory failed", rc=rc)
        self._registered = []
        _RETIRED.append(engine)

    async def add_peer(self, peer_id: str, metadata: bytes, *, secret: bytes = b"") -> None:
        self._require()
        try:
            meta = msgspec.msgpack.decode(metadata, type=_Meta)
        except msgspec.DecodeError as exc:
            raise TransportError(f"mooncake: bad metadata from peer {peer_id!r}: {exc}") from exc
        if meta.v != _VERSION:
            raise TransportError(f"mooncake: peer {peer_id!r} has metadata v{meta.v}, not v1")
        if meta.pools or meta.session:
            if meta.pools.keys() != self._local.keys() or meta.protocol != self.protocol:
                raise TransportError(
                    f"mooncake: peer {peer_id!r} has fields {sorted(meta.pools)} over "
                    f"{meta.protocol}, this node {sorted(self._local)} over {self.protocol}"
                )
            bad = any(min(base, size) < 0 for base, size in meta.pools.values())
            if bad or not env.check_session(meta.session):
                raise TransportError(f"mooncake: bad pools or session from peer {peer_id!r}")
        await self.remove_peer(peer_id)
        thread = self._executor(f"emtransfer-mooncake-{peer_id[:16]}") if meta.pools else None
        self._peers[peer_id] = _Peer(meta.name, meta.session, dict(meta.pools), thread)

    async def remove_peer(self, peer_id: str) -> None:
        """Refuse new writes to the peer, fail its waiters whose bytes had not all arrived
        (what arrived before the removal counts: one last drain first), wait for its writes
        in flight. One-sided: the peer's writes *to us* stop with its own ``remove_peer``
        (or exit)."""
        self.grants.drop_peer(peer_id)
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        self._drain()
        self._wake()
        for pid, _, fut in list(self._waiters.values()):
            if pid == peer_id and not fut.done():
                fut.set_exception(TransportError(f"mooncake: peer {peer_id!r} was removed"))
        if peer.inflight:
            futures = [asyncio.wrap_future(f) for f in list(peer.inflight)]
            await asyncio.gather(*futures, return_exceptions=True)
        if peer.thread is not None:
            peer.thread.shutdown(wait=False)
        if all(p.name != peer.name for p in self._peers.values()):
            for key in [k for k in self._landed if k[0] == peer.name]:
                del self._landed[key]

    async def write(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> None:
        engine = self._require()
        peer = self._peer(peer_id)
        if peer.thread is None:
            raise TransportError(
                f"mooncake: peer {peer_id!r} accepts no writes (it published no pools)"
            )
        srcs, dsts, lens = self._descs(peer, ops)
        if not lens:
            return
        if self._cuda:  # the staging copies were queued on the current torch stream
            stream = torch.cuda.current_stream(self._device)
            await asyncio.get_running_loop().run_in_executor(peer.thread, stream.synchronize)
            if self._peers.get(peer_id) is not peer:
                raise TransportError(f"mooncake: peer {peer_id!r} was removed")
        notify = self._notify(self._name, f"{tag}\0{sum(lens)}")
        args = (engine, peer_id, peer, srcs, dsts, lens, notify, deadline)
        post = peer.thread.submit(self._post, *args)
        peer.inflight.add(post)  # remove_peer waits for a post queued or under way
        post.add_done_callback(peer.inflight.discard)
        await asyncio.wrap_future(post)

    def _post(
        self,
        engine: Any,
        peer_id: str,
        peer: _Peer,
        srcs: list[int],
        dsts: list[int],
        lens: list[int],
        notify: Any,
        deadline: float,
    ) -> None:
        """One batched WRITE; the last checks (peer still added, grant not expired) come right
        before the post, after any wait in the executor's queue. Blocks until the engine
        reports the batch COMPLETED (applied at the target, notification delivered) or not."""
        if self._peers.get(peer_id) is not peer:
            raise TransportError(f"mooncake: peer {peer_id!r} was removed")
        check_deadline(deadline, f"mooncake: write to {peer.session}")
        try:
            rc = engine.batch_transfer_sync(peer.session, srcs, dsts, lens, self._write_op, notify)
        except Exception as exc:
            raise TransportError(f"mooncake: write to {peer.session} failed: {exc}") from exc
        if rc != 0:
            raise TransportError(
                f"mooncake: write of {sum(lens)} bytes in {len(lens)} runs to {peer.session} "
                f"failed (engine returned {rc}; its log says why)"
            )

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        """Consume ``tag``'s notifications once they account for ``nbytes``. The sender's
        write returned only after its notification was delivered, so it is usually here
        already; else one poller drains every ``poll_s`` until the caller's timeout."""
        key = (self._peer(peer_id).name, tag)
        self._drain()
        if self._take(key, nbytes):
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters[key] = (peer_id, nbytes, fut)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="emtransfer:mc-poll")
        try:
            await fut
        finally:
            if self._waiters.get(key, (None, 0, None))[2] is fut:
                del self._waiters[key]

    async def discard(self, peer_id: str, tag: str) -> None:
        """Drop ``tag``'s notifications now rather than after ``notif_ttl`` (nothing to fence:
        a write that completed is in the pools, and the sender's AbortAck covers the rest)."""
        self.grants.revoke(peer_id, tag)
        self._drain()
        if (peer := self._peers.get(peer_id)) is not None:
            self._landed.pop((peer.name, tag), None)

    def pending_notifs(self) -> int:
        """Tags notified but not consumed by :meth:`wait_landed` (after a drain and a prune)."""
        self._drain(prune=True)
        return len(self._landed)

    def _executor(self, name: str) -> cf.ThreadPoolExecutor:
        """One thread; on a CUDA pool's GPU (the engine's calls find its context there)."""
        init = (torch.cuda.set_device, (self._device,)) if self._cuda else (None, ())
        return cf.ThreadPoolExecutor(1, name, *init)

    def _require(self) -> Any:
        if self._engine is None:
            why = "closed" if self._closed else "not started"
            raise TransportError(f"mooncake transport is {why}")
        return self._engine

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransportError(f"mooncake: unknown peer {peer_id!r}")
        return peer

    def _descs(self, peer: _Peer, ops: Sequence[WriteOp]) -> tuple[list[int], list[int], list[int]]:
        """Source and destination addresses and lengths, one per run; refuses ops outside a
        pool before anything is posted."""
        srcs: list[int] = []
        dsts: list[int] = []
        lens: list[int] = []
        for op in ops:
            if op.field not in self._local:
                raise TransportError(f"mooncake: unknown field in {op}")
            (lbase, lsize), (rbase, rsize) = self._local[op.field], peer.pools[op.field]
            src, dst, size = op.src_offset, op.dst_offset, op.nbytes
            if min(src, dst, size) < 0 or src + size > lsize or dst + size > rsize:
                raise TransportError(
                    f"mooncake: {op} leaves the pools (local {lsize} bytes, remote {rsize} bytes)"
                )
            if size:
                srcs.append(lbase + src)
                dsts.append(rbase + dst)
                lens.append(size)
        return srcs, dsts, lens

    def _take(self, key: tuple[str, str], nbytes: int) -> bool:
        got = self._landed.get(key)
        if nbytes <= 0 or (got is not None and got[0] >= nbytes):
            self._landed.pop(key, None)
            return True
        return False

    def _drain(self, prune: bool = False) -> int:
        """Move new notifications into ``_landed`` and wake their waiters; drop those older
        than ``notif_ttl`` (``prune``) and, past ``max_tags``, the oldest. Returns how many
        arrived."""
        if self._engine is None:
            return 0
        try:
            notes = self._engine.get_notifies()
        except Exception as exc:
            _log.warning("mooncake: get_notifies failed", error=str(exc))
            return 0
        now = time.monotonic()
        for note in notes:
            tag, _, count = str(note.msg).rpartition("\0")
            key = (str(note.name), tag)
            entry = self._landed.setdefault(key, [0, now])  # a peer may write before we add it
            entry[0] += int(count) if count.isdigit() else 0
        if notes:
            self._wake()
        while len(self._landed) > self.max_tags:
            del self._landed[next(iter(self._landed))]
        if prune:
            old = [k for k, (_, seen) in self._landed.items() if now - seen >= self.notif_ttl]
            for key in old:
                del self._landed[key]
        return len(notes)

    def _wake(self) -> None:
        """Resolve every waiter whose tag now accounts for its bytes."""
        for key, (_, nbytes, fut) in list(self._waiters.items()):
            if not fut.done() and self._take(key, nbytes):
                fut.set_result(None)

    async def _poll(self) -> None:
        while self._waiters:
            await asyncio.sleep(self.poll_s)
            self._drain()
            self._wake()  # also what reached ``_landed`` another way (a tool draining for us)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self._drain(prune=True)


def _session(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Notify:
    """Stand-in for ``TransferNotify`` with an injected engine (tests)."""

    def __init__(self, name: str, msg: str) -> None:
        self.name, self.msg = name, msg


class _Op:
    Write = "write"


TRANSPORT = MooncakeTransport
