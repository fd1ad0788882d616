"""The benchmarks' raw engine halves (the interface every raw engine implements) and raw NIXL on a
node's own agent and registered pools: shared by ``bench_transfer.py`` (DRAM pools) and
``bench_cuda.py`` (VRAM pools on CUDA, DRAM in its dry run).

The raw NIXL writes use the node's NIXL agent, the peer's agent name and pool base from the
transport's peer record, and each side's memory type and device id as the transport registered
them (DRAM and device 0 for CPU pools; VRAM and the GPU index for CUDA pools). Threads that call
NIXL for a VRAM pool make that GPU current first, as the transport's own threads do. Notifications
are ``b"bench/<tag>\\0<nbytes>"`` (emtransfer's ``tag NUL nbytes`` format)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from typing import Any

import numpy as np
import torch

NIXL_RAW_PREFIX = b"bench/"  # raw notification: b"bench/<tag>\0<nbytes>" (emtransfer's format)
Stamps = tuple[float, float]  # (t_post, t_done), wall clock


class RawSender:
    """Writes ``nbytes`` from this node's embeddings pool at ``src`` to the peer's at ``dst``;
    returns ``(t_post, t_done)``: wall clock just before the engine call and once the engine
    reported the write complete, both taken on the thread that made the call (no hop)."""

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class RawReceiver:
    """``expect`` before the sender is told to go; the future resolves once the bytes landed,
    to the wall clock at which this side learnt it, taken on the thread that learnt it."""

    stray = 0

    def expect(self, tag: int, slot: int, dst: int, nbytes: int) -> asyncio.Future[float]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def resolve(fut: asyncio.Future[Any], at: float = 0.0, exc: BaseException | None = None) -> None:
    if not fut.done():
        if exc is None:
            fut.set_result(at)
        else:
            fut.set_exception(exc)


def _cuda_device(tr: Any) -> torch.device | None:
    """The GPU of the transport's VRAM pools, None for DRAM pools."""
    return tr._device if tr._mem == "VRAM" else None


class NixlRawSender(RawSender):
    """The node's own NIXL agent, the peer's agent name and pool base from the transport's peer
    record; ``initialize_xfer`` + ``transfer`` + ``check_xfer_state`` polled with short sleeps,
    all in one executor thread (writes to the peer are serialized, the loop stays live).
    ``poll_s`` 0: ``check_xfer_state`` in a tight loop instead. The descriptors carry each
    side's memory type and device id as its transport registered them."""

    def __init__(self, node: Any, peer_tid: str, poll_s: float) -> None:
        tr = node.transport
        self.agent = tr._agent
        peer = tr._peers[peer_tid]
        self.remote = peer.agent
        self.rbase, _, self.rdev = peer.pools["embeddings"]
        self.rmem = peer.mem
        self.lbase = node.registry.byte_view("embeddings").data_ptr()
        self.lmem, self.ldev = tr._mem, tr._local["embeddings"][2]
        self.poll_s = poll_s
        gpu = _cuda_device(tr)
        init = (torch.cuda.set_device, (gpu,)) if gpu is not None else (None, ())
        self.pool = cf.ThreadPoolExecutor(1, "bench-nixl-raw", *init)

    def _write(self, src: int, dst: int, nbytes: int, notif: bytes) -> Stamps:
        t_post = time.time()
        agent = self.agent
        local = np.array([[self.lbase + src, nbytes, self.ldev]], dtype=np.uint64)
        remote = np.array([[self.rbase + dst, nbytes, self.rdev]], dtype=np.uint64)
        handle = agent.initialize_xfer(
            "WRITE",
            agent.get_xfer_descs(local, self.lmem),
            agent.get_xfer_descs(remote, self.rmem),
            self.remote,
            notif,
        )
        try:
            state = agent.transfer(handle)
            while state == "PROC":
                if self.poll_s:
                    time.sleep(self.poll_s)
                state = agent.check_xfer_state(handle)
            t_done = time.time()
        finally:
            handle.release()
        if state != "DONE":
            raise RuntimeError(f"raw nixl write ended in state {state}")
        return t_post, t_done

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        notif = NIXL_RAW_PREFIX + b"%d\0%d" % (tag, nbytes)
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self._write, src, dst, nbytes, notif
        )

    async def close(self) -> None:
        self.pool.shutdown(wait=True)


class NixlInlineSender(NixlRawSender):
    """The same write posted on the calling (loop) thread and polled there in a tight loop: no
    thread hop, no sleep. The loop is blocked meanwhile, which a benchmark's raw line can
    afford (emtransfer posts its smaller writes on the loop too: ``inline_max_bytes``)."""

    def __init__(self, node: Any, peer_tid: str) -> None:
        super().__init__(node, peer_tid, 0.0)

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        return self._write(src, dst, nbytes, NIXL_RAW_PREFIX + b"%d\0%d" % (tag, nbytes))


class NixlRawReceiver(RawReceiver):
    """One poller thread (as a careful user would write it) polls the agent's notifications with
    ``poll_s`` sleeps while anything is expected. emtransfer's NixlTransport also drains the same
    agent (its 1 s background sweep and ``wait_landed``): a raw notification it takes first lands in
    its ``_landed`` map under our tag (same ``tag NUL nbytes`` format), so the poller checks there
    too; a non-raw notification the poller takes is handed back to that map on the loop."""

    def __init__(self, node: Any, peer_tid: str, poll_s: float) -> None:
        self.tr = node.transport
        self.agent = self.tr._agent
        self.remote = self.tr._peers[peer_tid].agent
        self.poll_s = poll_s
        self.gpu = _cuda_device(self.tr)
        self.loop = asyncio.get_running_loop()
        self.pending: dict[bytes, asyncio.Future[float]] = {}
        self.via_transport = 0  # raw notifications found in the transport's map (its sweep won)
        self.cv = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._poll, name="bench-nixl-poll", daemon=True)
        self.thread.start()

    def expect(self, tag: int, slot: int, dst: int, nbytes: int) -> asyncio.Future[float]:
        fut = self.loop.create_future()
        with self.cv:
            self.pending[NIXL_RAW_PREFIX + b"%d" % tag] = fut
            self.cv.notify()
        return fut

    def _hand_back(self, name: str, msg: bytes) -> None:  # on the loop, like NixlTransport._drain
        self.stray += 1
        tag, _, count = msg.rpartition(b"\0")
        bucket = self.tr._landed.setdefault(name, {})
        bucket.setdefault(tag, [0, time.monotonic()])[0] += int(count) if count.isdigit() else 0

    def _poll(self) -> None:
        if self.gpu is not None:
            torch.cuda.set_device(self.gpu)
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.pending or self.stop)
                if self.stop:
                    return
                keys = list(self.pending)
            found = []
            notifs = self.agent.get_new_notifs()
            seen = time.time()
            for name, msgs in notifs.items():
                for msg in msgs:
                    key = msg.rpartition(b"\0")[0]
                    if name == self.remote and key in keys:
                        found.append(key)
                    else:
                        self.loop.call_soon_threadsafe(self._hand_back, name, msg)
            bucket = self.tr._landed.get(self.remote)
            if bucket:
                swept = [k for k in keys if bucket.pop(k, None) is not None]
                self.via_transport += len(swept)
                found += swept
            if not found:
                time.sleep(self.poll_s)
                continue
            with self.cv:
                futs = [self.pending.pop(k) for k in found if k in self.pending]
            for fut in futs:
                self.loop.call_soon_threadsafe(resolve, fut, seen)

    async def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify()
        await asyncio.to_thread(self.thread.join, 5)
