"""NIXL data plane: one agent per node with the UCX backend, the pools registered once, and
one-sided WRITEs carrying a notification (``tag NUL nbytes``) per write.

A WRITE that completes on the initiator already means the bytes are in the target's memory;
:meth:`NixlTransport.wait_landed` consumes the notifications on the target all the same, so
that none accumulate, and confirms the byte count from the target's side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import structlog
import torch

from ..buffers import BufferRegistry, WriteOp
from ..errors import ConfigError
from .base import Transport, TransportError

if TYPE_CHECKING:
    from ..settings import Settings

PARAMS_ENV = "EMTRANSFER_NIXL_BACKEND_PARAMS"
_VERSION = 1
_log = structlog.get_logger("emtransfer")


class _Meta(msgspec.Struct, frozen=True):
    """What :meth:`NixlTransport.metadata` carries (msgpack)."""

    v: int
    name: str
    agent: bytes
    mem: str  # "DRAM" or "VRAM"
    pools: dict[str, tuple[int, int, int]]  # field -> (base address, nbytes, device id)


@dataclass(eq=False)
class _Peer:
    agent: str
    mem: str
    pools: dict[str, tuple[int, int, int]]
    inflight: set[cf.Future[None]] = field(default_factory=set)


def parse_backend_params(text: str) -> dict[str, str]:
    """``"k=v,k=v"`` (the format of ``EMTRANSFER_NIXL_BACKEND_PARAMS``) as a dict."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid {PARAMS_ENV}={text!r}: expected k=v,k=v")
        out[key.strip()] = value.strip()
    return out


def new_agent(
    name: str, params: Mapping[str, str], *, progress_delay_us: int, progress_thread: bool = True
) -> Any:
    """A ``nixl_agent`` with the UCX backend whose progress thread waits ``progress_delay_us``
    (rounded up to 1 ms by UCX's poll()) for events when idle.

    nixl 1.5's ``nixl_agent`` hard-codes a delay of 0 (an idle agent spins a core) and its config
    has no knob for it, but the binding's ``nixlAgentConfig`` has: the wrapper is built without
    backends and its core agent swapped for one with our config before any backend exists, so
    no global state is patched. RW locking: the event loop and executor threads share the agent.
    """
    import nixl._bindings as bind
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=progress_thread, backends=[]))
    cfg = bind.nixlAgentConfig()
    cfg.useProgThread = progress_thread
    cfg.useListenThread = False
    cfg.syncMode = bind.NIXL_THREAD_SYNC_RW
    cfg.pthrDelay = progress_delay_us
    agent.agent = bind.nixlAgent(name, cfg)
    agent.create_backend("UCX", dict(params))
    return agent


@functools.cache
def _probe() -> str | None:
    try:
        import nixl._api  # noqa: F401
    except Exception as exc:  # ImportError, or no NIXL wheel for this CUDA
        return f"nixl cannot be imported: {exc}"
    try:
        params = parse_backend_params(os.environ.get(PARAMS_ENV, ""))
        new_agent(f"emtransfer-probe-{uuid.uuid4().hex}", params, progress_delay_us=0, progress_thread=False)
    except Exception as exc:
        return f"cannot create a NIXL agent with the UCX backend: {exc}"
    return None


class NixlTransport(Transport):
    """One-sided NIXL/UCX writes between registered pools (DRAM for CPU pools, VRAM for CUDA).

    Writes of ``inline_max_bytes`` or more are posted from an executor thread (UCX may copy
    inline for the whole transfer); smaller ones are posted on the loop. A write still in
    progress after its post is polled from an executor thread with a 20 us .. 1 ms backoff.
    """

    name = "nixl"
    sweep_interval = 1.0  # seconds between background drains of notifications

    def __init__(
        self,
        registry: BufferRegistry,
        *,
        backend_params: Mapping[str, str] | None = None,
        progress_delay_us: int = 100,
        inline_max_bytes: int = 1 << 20,
        xfer_timeout: float = 60.0,
        notif_ttl: float = 300.0,
        threads: int = 2,
    ) -> None:
        super().__init__(registry)
        self.backend_params = dict(backend_params or {})
        self.progress_delay_us = progress_delay_us
        self.inline_max_bytes = inline_max_bytes
        self.xfer_timeout = xfer_timeout
        self.notif_ttl = notif_ttl  # unconsumed notifications (aborted requests) are kept this long
        self._pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="emtransfer-nixl")
        self._agent: Any = None
        self._reg: Any = None
        self._mem = "VRAM" if registry.device.type == "cuda" else "DRAM"
        self._meta = b""
        self._local: dict[str, tuple[int, int, int]] = {}
        self._peers: dict[str, _Peer] = {}
        self._landed: dict[str, dict[bytes, list[float]]] = {}  # agent -> tag -> [nbytes, seen]
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def unavailable(cls) -> str | None:
        return _probe()

    @classmethod
    def from_settings(cls, settings: Settings, registry: BufferRegistry) -> NixlTransport:
        params = parse_backend_params(os.environ.get(PARAMS_ENV, ""))
        return cls(registry, backend_params=params, xfer_timeout=settings.chunk_timeout)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:
            raise TransportError("nixl transport is closed")
        if self._agent is None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._open)
            self._sweeper = asyncio.create_task(self._sweep(), name="emtransfer:nixl-sweep")

    def _open(self) -> None:
        for name in self.registry.layouts:
            view = self.registry.byte_view(name)
            self._local[name] = (view.data_ptr(), view.numel(), max(view.get_device(), 0))
        try:
            agent = new_agent(
                f"emtransfer-{os.getpid()}-{uuid.uuid4().hex[:12]}",
                self.backend_params,
                progress_delay_us=self.progress_delay_us,
            )
            self._reg = agent.register_memory(
                np.array(list(self._local.values()), dtype=np.uint64), self._mem
            )
            meta = _Meta(_VERSION, agent.name, agent.get_agent_metadata(), self._mem, self._local)
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
        agent, self._agent, reg, self._reg = self._agent, None, self._reg, None
        if agent is not None:  # destroyed in a thread: it joins the progress thread
            done = asyncio.get_running_loop().run_in_executor(self._pool, _release_agent, agent, reg)
            del agent
            await done
        self._pool.shutdown(wait=False)

    # -- peers ---------------------------------------------------------------------------------
    async def add_peer(self, peer_id: str, metadata: bytes) -> None:
        agent = self._require()
        try:
            meta = msgspec.msgpack.decode(metadata, type=_Meta)
        except msgspec.DecodeError as exc:
            raise TransportError(f"nixl: bad metadata from peer {peer_id!r}: {exc}") from exc
        if meta.v != _VERSION:
            raise TransportError(f"nixl: peer {peer_id!r} speaks metadata v{meta.v}, not v{_VERSION}")
        if meta.pools.keys() != self._local.keys():
            raise TransportError(
                f"nixl: peer {peer_id!r} has fields {sorted(meta.pools)}, this node {sorted(self._local)}"
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
        """Refuse new writes to the peer, wait for those in flight, then drop its agent.

        A one-sided engine cannot revoke the peer's access to this node's pools: that writes
        *from* the peer stop is guaranteed by the peer's own ``remove_peer`` or its exit."""
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        if peer.inflight:
            futures = [asyncio.wrap_future(f) for f in list(peer.inflight)]
            await asyncio.gather(*futures, return_exceptions=True)
        if self._agent is not None and all(p.agent != peer.agent for p in self._peers.values()):
            self._landed.pop(peer.agent, None)
            try:
                self._agent.remove_remote_agent(peer.agent)
            except Exception as exc:
                _log.warning("nixl: remove_remote_agent failed", peer=peer_id, error=str(exc))

    # -- data ----------------------------------------------------------------------------------
    async def write(self, peer_id: str, ops: Sequence[WriteOp], *, tag: str) -> None:
        agent = self._require()
        peer = self._peer(peer_id)
        local, remote, total = self._descs(peer, ops)
        if total == 0:
            return
        if self.registry.device.type == "cuda":  # staging copies are queued on the torch stream
            stream = torch.cuda.current_stream(self.registry.device)
            await asyncio.get_running_loop().run_in_executor(self._pool, stream.synchronize)
            if self._peers.get(peer_id) is not peer:
                raise TransportError(f"nixl: peer {peer_id!r} was removed")
        args = (agent, peer, local, remote, tag.encode() + b"\0" + str(total).encode())
        if total >= self.inline_max_bytes:
            fut = self._pool.submit(self._post_and_complete, *args)
        else:
            handle, state = self._post(*args)
            if state != "PROC":
                self._complete(agent, handle, state, peer.agent)
                return
            fut = self._pool.submit(self._complete, agent, handle, state, peer.agent)
        peer.inflight.add(fut)
        fut.add_done_callback(peer.inflight.discard)
        await asyncio.wrap_future(fut)

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        """Consume the notifications of ``tag`` once they account for ``nbytes``; polls with a
        20 us .. 1 ms backoff (asyncio rounds sleeps up to 1 ms) until the caller's timeout."""
        key, delay = tag.encode(), 20e-6
        while True:
            peer = self._peer(peer_id)
            self._drain()
            bucket = self._landed.setdefault(peer.agent, {})
            got = bucket.get(key)
            if nbytes <= 0 or (got is not None and got[0] >= nbytes):
                bucket.pop(key, None)
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1e-3)

    def pending_notifs(self) -> int:
        """Tags notified but not consumed by :meth:`wait_landed` (drains and prunes first)."""
        self._drain()
        self._prune()
        return sum(len(b) for b in self._landed.values())

    # -- internals -----------------------------------------------------------------------------
    def _require(self) -> Any:
        if self._agent is None:
            raise TransportError("nixl transport is " + ("closed" if self._closed else "not started"))
        return self._agent

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransportError(f"nixl: unknown peer {peer_id!r}")
        return peer

    def _descs(self, peer: _Peer, ops: Sequence[WriteOp]) -> tuple[np.ndarray, np.ndarray, int]:
        """(local, remote) N x 3 uint64 descriptor arrays; refuses any op outside either pool."""
        local = np.empty((len(ops), 3), dtype=np.uint64)
        remote = np.empty_like(local)
        n = total = 0
        for op in ops:
            if op.field not in self._local:
                raise TransportError(f"nixl: unknown field {op.field!r} in {op}")
            lbase, lsize, ldev = self._local[op.field]
            rbase, rsize, rdev = peer.pools[op.field]
            src, dst, size = op.src_offset, op.dst_offset, op.nbytes
            if min(src, dst, size) < 0 or src + size > lsize or dst + size > rsize:
                raise TransportError(
                    f"nixl: {op} runs outside the pools of field {op.field!r} "
                    f"(local {lsize} bytes, remote {rsize} bytes)"
                )
            if size:
                local[n], remote[n] = (lbase + src, size, ldev), (rbase + dst, size, rdev)
                n, total = n + 1, total + size
        return local[:n], remote[:n], total

    def _post(self, agent: Any, peer: _Peer, local: Any, remote: Any, notif: bytes) -> tuple[Any, str]:
        try:
            handle = agent.initialize_xfer(
                "WRITE", agent.get_xfer_descs(local, self._mem),
                agent.get_xfer_descs(remote, peer.mem), peer.agent, notif,
            )
        except Exception as exc:
            raise TransportError(f"nixl: write to {peer.agent} refused: {exc}") from exc
        try:
            return handle, agent.transfer(handle)
        except Exception as exc:
            _release(handle)
            raise TransportError(f"nixl: write to {peer.agent} failed: {exc}") from exc

    def _post_and_complete(self, agent: Any, peer: _Peer, *args: Any) -> None:
        self._complete(agent, *self._post(agent, peer, *args), peer.agent)

    def _complete(self, agent: Any, handle: Any, state: str, where: str) -> None:
        """Poll ``handle`` with backoff while in progress (blocking), release it, raise unless
        DONE. Called on the loop only with a final ``state``."""
        deadline, delay = time.monotonic() + self.xfer_timeout, 20e-6
        try:
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(2 * delay, 1e-3)
                state = agent.check_xfer_state(handle)
        except Exception as exc:
            state = f"ERR: {exc}"
        _release(handle)
        if state == "PROC":
            raise TransportError(f"nixl: write to {where} timed out after {self.xfer_timeout}s")
        if state != "DONE":
            raise TransportError(f"nixl: write to {where} failed ({state})")

    def _drain(self) -> None:
        if self._agent is None:
            return
        now = time.monotonic()
        try:
            new = self._agent.get_new_notifs()
        except Exception as exc:
            _log.warning("nixl: get_new_notifs failed", error=str(exc))
            return
        for name, msgs in new.items():
            bucket = self._landed.setdefault(name, {})
            for msg in msgs:
                tag, _, count = msg.rpartition(b"\0")
                entry = bucket.setdefault(tag, [0, now])
                entry[0] += int(count) if count.isdigit() else 0

    def _prune(self) -> None:
        cutoff = time.monotonic() - self.notif_ttl
        known = {p.agent for p in self._peers.values()}
        for name, bucket in list(self._landed.items()):
            for tag in [t for t, (_, seen) in bucket.items() if seen <= cutoff]:
                del bucket[tag]
            if not bucket and name not in known:
                del self._landed[name]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self._drain()
            self._prune()


def _release(handle: Any) -> None:
    try:
        handle.release()
    except Exception as exc:  # an in-flight transfer NIXL could not cancel
        _log.warning("nixl: cannot release a transfer handle", error=str(exc))


def _release_agent(agent: Any, reg: Any) -> None:
    if reg is not None:
        try:
            agent.deregister_memory(reg)
        except Exception as exc:
            _log.warning("nixl: deregister_memory failed", error=str(exc))
    del agent  # the last reference: the core agent stops its progress thread


TRANSPORT = NixlTransport
