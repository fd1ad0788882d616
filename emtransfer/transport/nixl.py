"""NIXL data plane: one agent per node (UCX backend), pools registered once, one-sided WRITEs
each carrying a notification ``tag NUL nbytes``. A WRITE completed on the initiator is in the
target's memory; the target still consumes the notifications (:meth:`wait_landed`)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import importlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import torch

from ..buffers import BufferRegistry, WriteOp
from ..errors import ConfigError
from ..guarantees import Guarantees
from ..logs import get_logger
from .base import Transport, TransportError, check_deadline
from .nixl_poller import CompletionPoller

if TYPE_CHECKING:
    from ..settings import Settings

PARAMS_ENV = "EMTRANSFER_NIXL_BACKEND_PARAMS"
_VERSION = 1
_log = get_logger("emtransfer.transport")


class _Meta(msgspec.Struct, frozen=True):
    v: int
    name: str  # the agent's name
    agent: bytes  # its NIXL metadata
    mem: str  # "DRAM" or "VRAM"
    pools: dict[str, tuple[int, int, int]]  # field -> (base address, nbytes, device id)


@dataclass(eq=False)
class _Peer:
    agent: str
    mem: str
    pools: dict[str, tuple[int, int, int]]
    #: every write from its first step to its end (posted or not): remove_peer waits for them
    #: all, so no completion is still outstanding when the peer's agent goes
    inflight: set[asyncio.Future[None]] = field(default_factory=set)


def _forget_write(inflight: set[asyncio.Future[None]]) -> Any:
    def done(task: asyncio.Future[None]) -> None:
        inflight.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that was cancelled does not see it

    return done


def parse_backend_params(text: str | None = None) -> dict[str, str]:
    """``"k=v,k=v"`` as a dict; by default ``$EMTRANSFER_NIXL_BACKEND_PARAMS``."""
    text = os.environ.get(PARAMS_ENV, "") if text is None else text
    items = [s.partition("=") for s in text.split(",") if s.strip()]
    if any(not sep or not key.strip() for key, sep, _ in items):
        raise ConfigError(f"invalid {PARAMS_ENV}={text!r}: expected k=v,k=v")
    return {key.strip(): value.strip() for key, _, value in items}


#: where nixl's Python API lives: the ``nixl`` loader package (which needs every build wheel
#: installed), or one build wheel alone (emtransfer's extras install one: nixl-cu13 or -cu12)
NIXL_PACKAGES = ("nixl", "nixl_cu13", "nixl_cu12")


@functools.cache
def nixl_modules() -> tuple[Any, Any]:
    """nixl's ``_api`` and ``_bindings`` modules, from the first package that has them."""
    problems = []
    for pkg in NIXL_PACKAGES:
        try:
            api = importlib.import_module(f"{pkg}._api")
            bind = importlib.import_module(f"{pkg}._bindings")
        except ImportError as exc:  # not installed, or the loader found no build wheel
            problems.append(f"{pkg}: {exc}")
            continue
        return api, bind
    raise ImportError(
        "nixl is not installed (pip install 'emtransfer[nixl]' for CUDA 13 and CPU hosts, "
        "'emtransfer[nixl-cu12]' for CUDA 12): " + "; ".join(problems)
    )


#: Python logging levels -> NIXL_LOG_LEVEL's names (its C++ and Python halves read it once)
_NIXL_LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN"}
_nixl_logging_done = False


def _nixl_logging() -> None:
    """Make NIXL's own log lines follow the host's logging. Its C++ logger reads
    ``NIXL_LOG_LEVEL`` when the library loads: unless the user set it, it gets the level our
    transport logger has (an unconfigured host: warnings and errors, not NIXL's info lines).
    Its Python wrapper installs a stdout handler of its own: the ``nixl`` logger propagates
    to the host's handlers instead."""
    global _nixl_logging_done
    if _nixl_logging_done:
        return
    _nixl_logging_done = True
    user_set = "NIXL_LOG_LEVEL" in os.environ
    if not user_set:
        level = _log.logger.getEffectiveLevel()
        name = next((v for k, v in sorted(_NIXL_LEVELS.items()) if level <= k), "ERROR")
        os.environ["NIXL_LOG_LEVEL"] = name
    nixl_modules()  # its API configures the "nixl" logger on import

    if not user_set:
        lg = logging.getLogger("nixl")
        lg.handlers, lg.propagate = [], True
        lg.setLevel(logging.NOTSET)


#: where the kernel lists RDMA devices; none there: UCX's InfiniBand module has nothing to drive
RDMA_DEVICES = "/sys/class/infiniband"


def _ucx_defaults() -> None:
    """On a host without RDMA devices, keep UCX from loading its InfiniBand module (unless the
    user chose ``UCX_MODULES``): with ``libibverbs`` installed (other engines need it) but no
    device, that module crashes the process as it exits (UCX 1.19 in nixl 1.5.1)."""
    if "UCX_MODULES" in os.environ:
        return
    try:
        devices = os.listdir(RDMA_DEVICES)
    except OSError:
        devices = []
    if not devices:
        os.environ["UCX_MODULES"] = "^ib"


#: the UCX progress thread's poll() timeout (see :func:`new_agent`): what an idle agent costs
PROGRESS_DELAY_US = 50_000


def new_agent(name: str, params: Mapping[str, str], *, delay_us: int, thread: bool = True) -> Any:
    """A ``nixl_agent`` with the UCX backend, RW locking (loop and executor threads share it) and
    a progress thread that sleeps in ``poll()`` on its UCX worker's event fd, for at most
    ``delay_us`` (rounded up to whole milliseconds, at least 1 ms).

    Traffic wakes it at once (an arriving notification or write signals the fd); the timeout
    only matters when nothing happens: at each one it progresses and re-arms the worker
    anyway, about 15 us of CPU. With a 1 ms timeout (any ``delay_us`` up to 1000) that is
    1000 wake-ups a second, 1.5 % of a core per idle agent; with the default 50 ms, 20.
    nixl 1.5's wrapper hard-codes a delay of 0 (an idle agent spins a core) with no knob: its core
    agent is swapped, before any backend exists, for one built from the binding's config."""
    _ucx_defaults()
    _nixl_logging()
    api, bind = nixl_modules()
    nixl_agent, nixl_agent_config = api.nixl_agent, api.nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=thread, backends=[]))
    cfg = bind.nixlAgentConfig()
    cfg.useProgThread, cfg.useListenThread = thread, False
    cfg.syncMode, cfg.pthrDelay = bind.NIXL_THREAD_SYNC_RW, delay_us
    agent.agent = bind.nixlAgent(name, cfg)
    agent.create_backend("UCX", dict(params))
    return agent


class NixlTransport(Transport):
    """One-sided NIXL/UCX writes between registered pools (DRAM for CPU, VRAM for CUDA pools).
    Writes of ``inline_max_bytes`` (16 MiB, as large as the runtime's own copies on the loop) or
    more are posted from an executor thread (UCX may copy inline in the post), smaller ones on
    the loop; those still in progress are watched by one poller
    thread (:mod:`.nixl_poller`), which sleeps on a condition while none is. Idle, the agent's
    UCX progress thread wakes every ``progress_delay_us`` (:func:`new_agent`)."""

    name = "nixl"
    #: write() returns once the transfer is DONE at the target; but NIXL cannot cancel a
    #: posted write, and a peer's writes into our pool are one-sided: neither discard nor
    #: remove_peer stops them. Only the grant's deadline (checked at posting) bounds them.
    GUARANTEES = Guarantees(remote_completion=True, fences_tag=False, remove_stops_inbound=False)
    sweep_interval = 1.0  # seconds between background drains of notifications

    def __init__(
        self,
        registry: BufferRegistry,
        *,
        backend_params: Mapping[str, str] | None = None,
        progress_delay_us: int = PROGRESS_DELAY_US,
        inline_max_bytes: int = 16 << 20,
        xfer_timeout: float = 10.0,
        notif_ttl: float = 300.0,
        threads: int = 2,
    ) -> None:
        super().__init__(registry, post_bound=xfer_timeout)
        self.backend_params = dict(
            parse_backend_params() if backend_params is None else backend_params
        )
        self.progress_delay_us = progress_delay_us
        self.inline_max_bytes = inline_max_bytes
        self.xfer_timeout = xfer_timeout
        self.notif_ttl = notif_ttl  # how long notifications nobody waits for are kept
        self._device = next(iter(registry.pools.values())).device  # "cuda" -> "cuda:N"
        self._mem = "VRAM" if self._device.type == "cuda" else "DRAM"
        init = (torch.cuda.set_device, (self._device,)) if self._mem == "VRAM" else (None, ())
        self._pool = cf.ThreadPoolExecutor(threads, "emtransfer-nixl", *init)  # NIXL calls here
        self._agent: Any = None
        self._reg: Any = None
        self._meta = b""
        self._local: dict[str, tuple[int, int, int]] = {}
        self._peers: dict[str, _Peer] = {}
        self._landed: dict[str, dict[bytes, list[float]]] = {}  # agent -> tag -> [nbytes, seen]
        self._sweeper: asyncio.Task[None] | None = None
        self._poller: CompletionPoller | None = None
        self._closed = False

    @classmethod
    @functools.cache
    def unavailable(cls) -> str | None:
        """Why NIXL cannot run here (import, or an agent with the UCX backend); cached."""
        try:
            new_agent(f"probe-{uuid.uuid4().hex}", parse_backend_params(), delay_us=0, thread=False)
        except ImportError as exc:  # no nixl, or no NIXL wheel for this CUDA
            return f"nixl cannot be imported: {exc}"
        except Exception as exc:
            return f"cannot create a NIXL agent with the UCX backend: {exc}"
        return None

    @classmethod
    def from_settings(cls, settings: Settings, registry: BufferRegistry) -> NixlTransport:
        return cls(registry, xfer_timeout=settings.write_timeout)

    async def start(self) -> None:
        if self._closed:
            raise TransportError("nixl transport is closed")
        if self._agent is None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._open)
            agent: Any = self._agent
            self._poller = CompletionPoller(
                agent.check_xfer_state,
                lambda handle: _try("release", handle.release),  # fails only if not cancellable
                lambda why: TransportError(f"nixl: {why}"),
            )
            self._sweeper = asyncio.create_task(self._sweep(), name="emtransfer:nixl-sweep")

    def _open(self) -> None:
        for name in self.registry.layouts:
            view = self.registry.byte_view(name)
            self._local[name] = (view.data_ptr(), view.numel(), max(view.get_device(), 0))
        try:
            name = f"emtransfer-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            agent = new_agent(name, self.backend_params, delay_us=self.progress_delay_us)
            rows = np.array(list(self._local.values()), dtype=np.uint64)
            self._reg = agent.register_memory(rows, self._mem)
            if self.inbound:
                meta = _Meta(_VERSION, name, agent.get_agent_metadata(), self._mem, self._local)
            else:  # our name (to match the notifications of our writes), no keys to our memory
                meta = _Meta(_VERSION, name, b"", self._mem, {})
        except Exception as exc:
            raise TransportError(f"nixl: cannot start the agent: {exc}") from exc
        self._meta, self._agent = msgspec.msgpack.encode(meta), agent

    def metadata(self) -> bytes:
        self._require()
        return self._meta

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for peer_id in list(self._peers):
            await self.remove_peer(peer_id)
        if self._poller is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._poller.close)
            self._poller = None
        agent, self._agent, reg, self._reg = self._agent, None, self._reg, None
        if agent is not None:  # deregistered and destroyed (~13 ms: joins UCX threads) in a thread
            holder = [agent]
            del agent
            await asyncio.get_running_loop().run_in_executor(self._pool, _dispose, holder, reg)
        await asyncio.to_thread(self._pool.shutdown, True)  # its threads end with close

    async def add_peer(self, peer_id: str, metadata: bytes, *, secret: bytes = b"") -> None:
        agent = self._require()
        try:
            meta = msgspec.msgpack.decode(metadata, type=_Meta)
        except msgspec.DecodeError as exc:
            raise TransportError(f"nixl: bad metadata from peer {peer_id!r}: {exc}") from exc
        if meta.v == _VERSION and not meta.agent:  # a node that is never written to
            await self.remove_peer(peer_id)
            self._peers[peer_id] = _Peer(meta.name, meta.mem, {})
            self._landed.setdefault(meta.name, {})
            return
        if meta.v != _VERSION or meta.pools.keys() != self._local.keys():
            raise TransportError(
                f"nixl: peer {peer_id!r} has metadata v{meta.v} and fields {sorted(meta.pools)}, "
                f"this node v{_VERSION} and {sorted(self._local)}"
            )
        await self.remove_peer(peer_id)
        try:
            name = agent.add_remote_agent(meta.agent)
            name = name.decode() if isinstance(name, bytes) else name
            agent.make_connection(name)
        except Exception as exc:
            raise TransportError(f"nixl: cannot reach peer {peer_id!r}: {exc}") from exc
        self._peers[peer_id] = _Peer(name, meta.mem, dict(meta.pools))
        self._landed.setdefault(name, {})

    async def remove_peer(self, peer_id: str) -> None:
        """Refuse new writes to the peer, wait for those in flight, drop its agent. One-sided: the
        peer's writes *to us* stop with the peer's own ``remove_peer`` (or exit), not with this."""
        self.grants.drop_peer(peer_id)
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        if peer.inflight:
            await asyncio.gather(*list(peer.inflight), return_exceptions=True)
        if self._agent is not None and all(p.agent != peer.agent for p in self._peers.values()):
            self._drain()  # what arrived before the removal counts: waits under way see it
            self._landed.pop(peer.agent, None)
            if self._poller is not None:
                self._poller.forget(peer.agent)
            if peer.pools:  # a peer that publishes no pools was never loaded
                _try("remove_remote_agent", self._agent.remove_remote_agent, peer.agent)

    async def write(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> None:
        agent = self._require()
        peer = self._writable(peer_id)
        # the write runs to its real end even if the caller is cancelled (a posted transfer
        # cannot be called back): remove_peer and close wait for it
        task = asyncio.ensure_future(self._write(agent, peer_id, peer, ops, tag, deadline))
        peer.inflight.add(task)
        task.add_done_callback(_forget_write(peer.inflight))
        await asyncio.shield(task)

    def write_nowait(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> Awaitable[None] | None:
        """Posts on the caller's turn what :meth:`write` posts inline (host memory, under
        ``inline_max_bytes``), with the same checks right before the post: no task and no hop
        of the loop before the write is on the wire. Returns None if the engine finished it at
        once, else its completion, shielded (a cancelled wait leaves the write to run to its
        end; ``remove_peer`` and ``close`` wait for it as for any write). Larger writes, and
        VRAM (whose staging copies must be synchronised first), go through :meth:`write`."""
        if self._mem == "VRAM" or sum(op.nbytes for op in ops) >= self.inline_max_bytes:
            return self.write(peer_id, ops, tag=tag, deadline=deadline)
        agent = self._require()
        peer = self._writable(peer_id)
        local, remote, total = self._descs(peer, ops)
        if total == 0:
            return None
        args = (agent, peer_id, peer, local, remote, _notif(tag, total), deadline)
        watched = self._watch(*self._post(*args), peer, total)
        if watched is None:
            return None
        done = asyncio.wrap_future(watched)
        peer.inflight.add(done)
        done.add_done_callback(_forget_write(peer.inflight))
        return asyncio.shield(done)

    async def _write(
        self,
        agent: Any,
        peer_id: str,
        peer: _Peer,
        ops: Sequence[WriteOp],
        tag: str,
        deadline: float,
    ) -> None:
        local, remote, total = self._descs(peer, ops)
        if total == 0:
            return
        if self._mem == "VRAM":  # the staging copies were queued on the current torch stream
            stream = torch.cuda.current_stream(self._device)
            await asyncio.get_running_loop().run_in_executor(self._pool, stream.synchronize)
            if self._peers.get(peer_id) is not peer:
                raise TransportError(f"nixl: peer {peer_id!r} was removed")
        args = (agent, peer_id, peer, local, remote, _notif(tag, total), deadline)
        if total >= self.inline_max_bytes:
            handle, state = await asyncio.wrap_future(self._pool.submit(self._post, *args))
        else:
            handle, state = self._post(*args)
        watched = self._watch(handle, state, peer, total)
        if watched is not None:
            await asyncio.wrap_future(watched)

    def _writable(self, peer_id: str) -> _Peer:
        peer = self._peer(peer_id)
        if not peer.pools:
            raise TransportError(
                f"nixl: peer {peer_id!r} accepts no writes (it published no pools)"
            )
        return peer

    def _watch(self, handle: Any, state: str, peer: _Peer, nbytes: int) -> cf.Future[None] | None:
        """A posted write of ``nbytes``: None if it ended at once (raises if that end is a
        failure), else the poller's future for its end."""
        if state != "PROC":
            _try("release", handle.release)
            if state != "DONE":
                raise TransportError(f"nixl: write to {peer.agent} failed ({state})")
            return None
        assert self._poller is not None
        return self._poller.watch(handle, self.xfer_timeout, peer.agent, nbytes)

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        """Consume ``tag``'s notifications once they account for ``nbytes``; polls with a 20 us
        to 1 ms backoff (asyncio rounds sleeps up to 1 ms) until the caller's timeout. A peer
        removed meanwhile fails the wait only if its notifications had not all arrived by
        then: a write it completed before it went is in the pools (``remove_peer`` drains
        once more, into the bucket this wait holds, before it drops the peer's)."""
        key, delay = tag.encode(), 20e-6
        peer = self._peer(peer_id)
        bucket = self._landed.setdefault(peer.agent, {})
        while True:
            self._drain()
            if _take(bucket, key, nbytes):
                return
            if self._peers.get(peer_id) is not peer:
                got = bucket.get(key, (0,))[0]
                raise TransportError(
                    f"nixl: peer {peer_id!r} was removed before {tag!r} landed "
                    f"({got} of {nbytes} bytes notified)"
                )
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def landed(self, peer_id: str, tag: str, nbytes: int) -> bool:
        """One drain, no waiting: the notification is usually in before the sender's
        ChunkDone (it travels ahead of the write's completion), so the receiver needs no
        timer and no polling task for it."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        self._drain()
        bucket = self._landed.get(peer.agent)
        return bucket is not None and _take(bucket, tag.encode(), nbytes)

    async def discard(self, peer_id: str, tag: str) -> None:
        """Drop ``tag``'s notifications now rather than after ``notif_ttl`` (nothing to fence:
        a write that completed is in the pools, and the sender's AbortAck covers the rest)."""
        self.grants.revoke(peer_id, tag)
        self._drain()
        if (peer := self._peers.get(peer_id)) is not None:
            self._landed.get(peer.agent, {}).pop(tag.encode(), None)

    def pending_notifs(self) -> int:
        """Tags notified but not consumed by :meth:`wait_landed` (after a drain and a prune)."""
        self._drain(prune=True)
        return sum(len(b) for b in self._landed.values())

    def _require(self) -> Any:
        if self._agent is None:
            raise TransportError(f"nixl transport is {'closed' if self._closed else 'not started'}")
        return self._agent

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransportError(f"nixl: unknown peer {peer_id!r}")
        return peer

    def _descs(self, peer: _Peer, ops: Sequence[WriteOp]) -> tuple[np.ndarray, np.ndarray, int]:
        """(local, remote) N x 3 uint64 (address, nbytes, device id); refuses ops outside a pool."""
        local = np.empty((len(ops), 3), dtype=np.uint64)
        remote = np.empty_like(local)
        n = total = 0
        for op in ops:
            if op.field not in self._local:
                raise TransportError(f"nixl: unknown field in {op}")
            (lbase, lsize, ldev), (rbase, rsize, rdev) = self._local[op.field], peer.pools[op.field]
            src, dst, size = op.src_offset, op.dst_offset, op.nbytes
            if min(src, dst, size) < 0 or src + size > lsize or dst + size > rsize:
                raise TransportError(
                    f"nixl: {op} leaves the pools (local {lsize} bytes, remote {rsize} bytes)"
                )
            if size:
                local[n], remote[n] = (lbase + src, size, ldev), (rbase + dst, size, rdev)
                n, total = n + 1, total + size
        return local[:n], remote[:n], total

    def _post(
        self,
        agent: Any,
        peer_id: str,
        peer: _Peer,
        src: Any,
        dst: Any,
        notif: bytes,
        deadline: float,
    ) -> tuple[Any, str]:
        """Prepare and post one WRITE; the last checks (peer still added, grant not expired)
        come right before the post, after any wait in the executor's queue."""
        try:
            src, dst = agent.get_xfer_descs(src, self._mem), agent.get_xfer_descs(dst, peer.mem)
            handle = agent.initialize_xfer("WRITE", src, dst, peer.agent, notif)
        except Exception as exc:
            raise TransportError(f"nixl: write to {peer.agent} refused: {exc}") from exc
        try:
            if self._peers.get(peer_id) is not peer:
                raise TransportError(f"nixl: peer {peer_id!r} was removed")
            check_deadline(deadline, f"nixl: write to {peer.agent}")
        except TransportError:
            _try("release", handle.release)
            raise
        try:
            return handle, agent.transfer(handle)
        except Exception as exc:
            _try("release", handle.release)
            raise TransportError(f"nixl: write to {peer.agent} failed: {exc}") from exc

    def _drain(self, prune: bool = False) -> None:
        """Move new notifications into ``_landed``; drop those older than ``notif_ttl``."""
        if self._agent is None:
            return
        now = time.monotonic()
        for name, msgs in (_try("get_new_notifs", self._agent.get_new_notifs) or {}).items():
            bucket = self._landed.setdefault(name, {})  # a peer may write before we add it
            for msg in msgs:
                tag, _, count = msg.rpartition(b"\0")
                bucket.setdefault(tag, [0, now])[0] += int(count) if count.isdigit() else 0
        if prune:
            known = {p.agent for p in self._peers.values()}
            for name, bucket in list(self._landed.items()):
                for tag in [t for t, (_, seen) in bucket.items() if now - seen >= self.notif_ttl]:
                    del bucket[tag]
                if not bucket and name not in known:
                    del self._landed[name]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self._drain(prune=True)


def _notif(tag: str, nbytes: int) -> bytes:
    """A write's notification: ``tag NUL nbytes``."""
    return tag.encode() + b"\0" + str(nbytes).encode()


def _take(bucket: dict[bytes, list[float]], key: bytes, nbytes: int) -> bool:
    """Consume ``key``'s notifications if they account for ``nbytes``."""
    got = bucket.get(key)
    if nbytes <= 0 or (got is not None and got[0] >= nbytes):
        bucket.pop(key, None)
        return True
    return False


def _try(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, logging instead of raising (clean-up that must not stop the caller)."""
    try:
        return fn(*args)
    except Exception as exc:
        _log.warning(f"nixl: {what} failed", error=str(exc))
        return None


def _dispose(holder: list[Any], reg: Any) -> None:
    agent = holder.pop()  # the last reference, dropped when this returns
    _try("deregister_memory", agent.deregister_memory, reg)


TRANSPORT = NixlTransport
