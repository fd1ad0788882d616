"""emtransfer against the raw transport it drives, in one run, on the same registered pools.

    torchrun --nproc-per-node 2 bench/bench_transfer.py --transport nixl|torch|tcp|mooncake
             [--sizes 256,1024,2048,8192] [--reps 20] [--reps-large 10] [--warmup 3]
             [--small-n 400] [--small-conc 1,32] [--json PATH] [--plot PATH]
             [--gc default|freeze]
             [--trace PATH] [--switch-interval MS]     (profiling aids, off by default)

Rank 0 is the encode side (an ``EncodeNode``), rank 1 the language side (a ``LanguageNode``);
both run uvloop and one torch thread. For each payload ([tokens, 4096] bfloat16) and each rep,
in rotating order:

(a) wire  -- the raw engine alone writes the payload region of rank 0's registered pool into
             rank 1's. a = t1 - t0: t0 just before the engine call, on the thread that makes
             it; t1 the first moment either side knows the bytes landed, on the thread that
             learns it (rank 1: notification / last byte read / recv completed; rank 0 too
             where the engine's completion is remote completion: nixl's DONE, mooncake's sync
             return). A ceiling: every rep runs each of the engine's raw methods (RAW_METHODS)
             once, and (a) is, per payload, the method with the best median (the JSON keeps
             all of them, ``a_methods``):
               nixl  thread-sleep: post and poll ``check_xfer_state`` with --poll-us sleeps
                     in an executor thread (what (b) uses: the loop stays live);
                     loop-spin: post on the calling thread and poll it in a tight loop (no
                     hop, no sleep; emtransfer posts writes under 4 MiB on the loop too).
               tcp   loop-sock: ``loop.sock_sendall`` / ``loop.sock_recv_into`` ((b)'s);
                     loop-stream: a stream's ``write`` + ``drain`` to a BufferedProtocol that
                     reads straight into the pool (how emtransfer's tcp transport does it);
                     threads: blocking ``sendall`` / ``recv_into`` in a thread on each side.
               torch ``dist.send`` / ``irecv`` + ``wait``, each in a thread (the stamps are
                     taken there: no hop to the loop counts).
               mooncake ``batch_transfer_sync`` in a thread (it returns once the target
                     applied the bytes and took the notification).
             Before, (a) posted from an executor thread and polled with 30 us sleeps (and its
             t1 waited for a hop to the loop), while emtransfer posts small writes on the
             loop: its (d) could beat (a).
(b) hand  -- the job by hand on the raw engine, no emtransfer: rank 1 records T0 and sends "go"
             naming pre-agreed slots; rank 0 copies the tensor into its pool, writes with a
             notification; rank 1 waits for it and copies the slots out into a fresh tensor; T1.
(c) emt   -- ``EncodeNode.send`` already pending on rank 0; rank 1 records T0, awaits
             ``LanguageNode.receive`` (known length, except the 2048-token payload that resumes
             from the default 1024-token allocation), T1.
(d) xfer  -- emtransfer's transfer phase from the same (c) reps: receiver's
             ``stats["last_chunk_at"]`` minus the sender's ``SendStats.first_write_at``.
(e) zero  -- the zero-copy path, timed as (c) is (from the receiver's request to the payload in
             hand): rank 0 has started ``async with enc.stage(rid, n) as staged``, written the
             source tensor into ``staged.tensors`` (the encoder producing its output into the
             pool: part of what an encoder does anyway) and ``send(rid, staged)``; rank 1
             records T0 and enters ``lang.lease(rid, peer, expected_tokens=n)``; T1 once it
             holds the payload. Neither end copies when both lend views; the payload is
             verified inside the lease in the untimed reps, byte for byte. Every size is
             received with its length known, the 2048-token one too: a lease without it gets
             the default 1024-token allocation, and a longer payload then resumes by copy.

When zero copy is possible, and what the caller gets otherwise:
- sender, ``stage(rid, n)``: views into the pool when the pool has a free run of consecutive
  blocks for ``n`` tokens at that moment (``staged.zero_copy``); otherwise it still reserves the
  blocks but lends ordinary tensors, which ``send`` copies in (one copy, as with ``send`` of
  plain tensors). ``n`` larger than the pool is refused (CapacityError).
- receiver, ``lease``: views into the pool (``got.zero_copy``) when the payload fits one
  allocation of consecutive blocks, i.e. it came in one round (known length, at most the pool)
  and the allocator handed out consecutive blocks in order; otherwise copies (a resumed
  payload is assembled into a fresh tensor; a scattered allocation is read out).
With these settings both hold for every size: the big pools have 64 blocks of 128 tokens, and
more if a --sizes payload needs them (``big_blocks``: the largest payload must fit the pool,
or stage refuses it and lease can never take it whole); one request at a time leaves the sender's
pool free (stage finds its run) and the receiver's free list in order (its allocation comes out
consecutive). The table counts, per payload, the timed reps in which each side lent views.

Then the rate of small transfers (256 tokens of hidden 1024 = 512 KiB) at concurrency 1 and 32,
for (b) and (c). Times are wall clock (``time.time()``) across two processes of one host.
Results: a table on rank 1's stdout, JSON (--json) and a PNG (--plot); ratios of medians
(c)/(b), (d)/(a) and (e)/(a) (1.0: as fast as the baseline). docs/bench.md explains each line,
the engine details and the results.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import datetime as dt
import gc
import itertools
import json
import os
import platform
import socket
import statistics
import struct
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import numpy as np
import torch

import emtransfer as et
from bench.raw_nixl import (
    NixlInlineSender,
    NixlRawReceiver,
    NixlRawSender,
    RawReceiver,
    RawSender,
    Stamps,
)
from bench.raw_nixl import resolve as _resolve
from emtransfer.logs import configure_logging

MiB = 1 << 20
HIDDEN, SMALL_HIDDEN, SMALL_TOKENS, SMALL_KEYS = 4096, 1024, 256, 4
DTYPE = torch.bfloat16
RESUME_TOKENS = 2048  # received with expected_tokens=None: resumes from default_blocks (1024)
LINES = ("a", "b", "c", "d", "e")
LABELS = {
    "a": "(a) wire: raw engine, pool to pool (best method)",
    "b": "(b) by hand: copy in + raw write + copy out",
    "c": "(c) emtransfer send/receive",
    "d": "(d) emtransfer transfer phase",
    "e": "(e) emtransfer zero copy: stage/lease",
}
#: the ways (a) writes with each raw engine; (a) is the best median per payload. The first
#: is also (b)'s, and the small pair's (a careful user's code that keeps the loop live)
RAW_METHODS: dict[str, tuple[str, ...]] = {
    "nixl": ("thread-sleep", "loop-spin"),
    "tcp": ("loop-sock", "loop-stream", "threads"),
    "torch": ("thread",),
    "mooncake": ("thread-sync",),
}


def raw_methods(transport: str, pair: str) -> tuple[str, ...]:
    methods = RAW_METHODS[transport]
    return methods if pair == "big" else methods[:1]


TORCH_RAW_TAG = 100  # + slot; the torch transport's tags are >= 1000 (see transport/torch.py)
MOONCAKE_RAW_PREFIX = "bench/"  # the same, as the Mooncake engine's notification text
TCP_HDR = struct.Struct("!QQQ")  # raw tcp: tag, dst offset, nbytes
TCP_ACK = b"\x06"


# -- payloads ------------------------------------------------------------------------------------
def make_payload(hidden: int, tokens: int, key: int) -> torch.Tensor:
    """Deterministic from (hidden, tokens, key): rank 1 rebuilds it to verify."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{hidden}/{tokens}/{key}".encode()))
    return torch.randn((tokens, hidden), generator=g).to(DTYPE)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# -- coordination channel (asyncio TCP, length-prefixed msgpack) ---------------------------------
class Coord:
    """Bench-only messages between the ranks: requests carry an id, replies resolve futures."""

    _LEN = struct.Struct("!I")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Any = None
    ) -> None:
        self.reader, self.writer, self.handler = reader, writer, handler
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ids = itertools.count()
        self._futs: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.closed = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._read())

    def send(self, msg: dict[str, Any]) -> None:
        body = msgspec.msgpack.encode(msg)
        self.writer.write(self._LEN.pack(len(body)) + body)

    def request(self, op: str, **kw: Any) -> asyncio.Future[dict[str, Any]]:
        """Send now; the returned future holds the reply (await it later or at once)."""
        rid = next(self._ids)
        fut = self._futs[rid] = asyncio.get_running_loop().create_future()
        self.send({"op": op, "id": rid, **kw})
        return fut

    async def call(self, op: str, timeout: float = 300.0, **kw: Any) -> dict[str, Any]:
        return await asyncio.wait_for(self.request(op, **kw), timeout)

    def reply(self, msg: dict[str, Any], **kw: Any) -> None:
        self.send({"op": "reply", "id": msg["id"], **kw})

    async def _read(self) -> None:
        try:
            while True:
                (n,) = self._LEN.unpack(await self.reader.readexactly(4))
                msg = msgspec.msgpack.decode(await self.reader.readexactly(n))
                if msg["op"] == "reply":
                    fut = self._futs.pop(msg["id"])
                    if "error" in msg:
                        fut.set_exception(RuntimeError(f"rank 0: {msg['error']}"))
                    else:
                        fut.set_result(msg)
                else:
                    self.handler(msg)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for fut in self._futs.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"coordination channel lost: {exc!r}"))
            if not self.closed.done():
                self.closed.set_result(None)


async def coord_connect(host: str, port: int, timeout: float = 120.0) -> Coord:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            return Coord(reader, writer)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# -- raw engines: sender (rank 0) and receiver (rank 1) halves -----------------------------------
# (their interface, RawSender / RawReceiver, and the NIXL ones are in raw_nixl.py, shared with
# bench_cuda.py)
class MooncakeRawSender(RawSender):
    """The node's own Mooncake engine, the peer's session and pool base from the transport's
    peer record; one ``batch_transfer_sync`` with a notification per write (it returns once the
    target applied the bytes and took the notification), in one executor thread (writes to the
    peer are serialized, the loop stays live)."""

    def __init__(self, node: Any, peer_tid: str) -> None:
        from mooncake.engine import TransferNotify, TransferOpcode

        tr = node.transport
        self.engine, self.name = tr._engine, tr._name
        peer = tr._peers[peer_tid]
        self.session, self.rbase = peer.session, peer.pools["embeddings"][0]
        self.lbase = node.registry.byte_view("embeddings").data_ptr()
        self.notify, self.op = TransferNotify, TransferOpcode.Write
        self.pool = cf.ThreadPoolExecutor(1, "bench-mooncake-raw")

    def _write(self, src: int, dst: int, nbytes: int, msg: str) -> Stamps:
        t_post = time.time()
        rc = self.engine.batch_transfer_sync(
            self.session, [self.lbase + src], [self.rbase + dst], [nbytes], self.op,
            self.notify(self.name, msg),
        )  # fmt: skip
        t_done = time.time()
        if rc != 0:
            raise RuntimeError(f"raw mooncake write returned {rc}")
        return t_post, t_done

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        msg = f"{MOONCAKE_RAW_PREFIX}{tag}\0{nbytes}"
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self._write, src, dst, nbytes, msg
        )

    async def close(self) -> None:
        self.pool.shutdown(wait=True)


class MooncakeRawReceiver(RawReceiver):
    """One poller thread polls the engine's notifications (``get_notifies``) with ``poll_s``
    sleeps while anything is expected. emtransfer's MooncakeTransport drains the same engine
    (its 1 s sweep and ``wait_landed``): a raw notification it took first is in its
    ``_landed`` map under our tag, so the poller checks there too; one of emtransfer's that the
    poller takes is handed back to that map on the loop (its waiters re-check it)."""

    def __init__(self, node: Any, peer_tid: str, poll_s: float) -> None:
        self.tr = node.transport
        self.engine, self.remote = self.tr._engine, self.tr._peers[peer_tid].name
        self.poll_s = poll_s
        self.loop = asyncio.get_running_loop()
        self.pending: dict[str, asyncio.Future[float]] = {}
        self.via_transport = 0  # raw notifications found in the transport's map (its sweep won)
        self.cv = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._poll, name="bench-mooncake-poll", daemon=True)
        self.thread.start()

    def expect(self, tag: int, slot: int, dst: int, nbytes: int) -> asyncio.Future[float]:
        fut = self.loop.create_future()
        with self.cv:
            self.pending[f"{MOONCAKE_RAW_PREFIX}{tag}"] = fut
            self.cv.notify()
        return fut

    def _hand_back(self, name: str, msg: str) -> None:  # on the loop, like the transport's drain
        self.stray += 1
        tag, _, count = msg.rpartition("\0")
        entry = self.tr._landed.setdefault((name, tag), [0, time.monotonic()])
        entry[0] += int(count) if count.isdigit() else 0

    def _poll(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.pending or self.stop)
                if self.stop:
                    return
                keys = list(self.pending)
            found = []
            notes = self.engine.get_notifies()
            seen = time.time()
            for note in notes:
                name, msg = str(note.name), str(note.msg)
                key = msg.rpartition("\0")[0]
                if name == self.remote and key in keys:
                    found.append(key)
                else:
                    self.loop.call_soon_threadsafe(self._hand_back, name, msg)
            swept = [k for k in keys if self.tr._landed.pop((self.remote, k), None) is not None]
            self.via_transport += len(swept)
            found += swept
            if not found:
                time.sleep(self.poll_s)
                continue
            with self.cv:
                futs = [self.pending.pop(k) for k in found if k in self.pending]
            for fut in futs:
                self.loop.call_soon_threadsafe(_resolve, fut, seen)

    async def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify()
        await asyncio.to_thread(self.thread.join, 5)


def _tune(sock: socket.socket, bufsize: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if bufsize:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
    sock.setblocking(False)


class TcpRawSender(RawSender):
    """A plain socket dedicated to raw data: a 24-byte header (tag, dst, nbytes), then the pool
    slice itself with ``loop.sock_sendall``; one write at a time; the 1-byte acks are drained."""

    def __init__(self, node: Any, sock: socket.socket) -> None:
        self.view = memoryview(node.registry.byte_view("embeddings").numpy()).cast("B")
        self.sock = sock
        self.lock = asyncio.Lock()
        self.acks = 0
        self._acker = asyncio.create_task(self._drain_acks())

    async def _drain_acks(self) -> None:
        loop, buf = asyncio.get_running_loop(), bytearray(64)
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while n := await loop.sock_recv_into(self.sock, buf):
                self.acks += n

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        loop = asyncio.get_running_loop()
        async with self.lock:
            t_post = time.time()
            await loop.sock_sendall(self.sock, TCP_HDR.pack(tag, dst, nbytes))
            await loop.sock_sendall(self.sock, self.view[src : src + nbytes])
            return t_post, time.time()

    async def close(self) -> None:
        self._acker.cancel()
        self.sock.close()


class TcpRawReceiver(RawReceiver):
    """Reads each header, then ``loop.sock_recv_into`` straight into the pool slice until the
    message is complete, resolves the waiter and sends a 1-byte ack back."""

    def __init__(self, node: Any, sock: socket.socket) -> None:
        self.view = memoryview(node.registry.byte_view("embeddings").numpy()).cast("B")
        self.sock = sock
        self.pending: dict[int, asyncio.Future[float]] = {}
        self.loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._read())

    def expect(self, tag: int, slot: int, dst: int, nbytes: int) -> asyncio.Future[float]:
        fut = self.pending[tag] = self.loop.create_future()
        return fut

    async def _fill(self, target: memoryview) -> None:
        got = 0
        while got < len(target):
            n = await self.loop.sock_recv_into(self.sock, target[got:])
            if not n:
                raise ConnectionError("raw tcp: sender closed")
            got += n

    async def _read(self) -> None:
        hdr = memoryview(bytearray(TCP_HDR.size))
        try:
            while True:
                await self._fill(hdr)
                tag, dst, nbytes = TCP_HDR.unpack(hdr)
                await self._fill(self.view[dst : dst + nbytes])
                _resolve(self.pending.pop(tag), time.time())
                await self.loop.sock_sendall(self.sock, TCP_ACK)
        except (ConnectionError, OSError, asyncio.CancelledError) as exc:
            for fut in self.pending.values():
                _resolve(fut, exc=ConnectionError(f"raw tcp: {exc!r}"))

    async def close(self) -> None:
        self._task.cancel()
        self.sock.close()


class TcpStreamSender(RawSender):
    """(a) only: the socket as an asyncio stream, header and pool slice handed to
    ``writer.write`` (uvloop sends at once what the kernel takes) and ``drain``: how
    emtransfer's tcp transport sends."""

    def __init__(self, node: Any, writer: asyncio.StreamWriter) -> None:
        self.view = memoryview(node.registry.byte_view("embeddings").numpy()).cast("B")
        self.writer = writer

    @classmethod
    async def open(cls, node: Any, sock: socket.socket) -> TcpStreamSender:
        _, writer = await asyncio.open_connection(sock=sock)
        return cls(node, writer)

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        t_post = time.time()
        self.writer.write(TCP_HDR.pack(tag, dst, nbytes))
        self.writer.write(self.view[src : src + nbytes])
        await self.writer.drain()
        return t_post, time.time()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class _IntoPool(asyncio.BufferedProtocol):
    """Receiving end of :class:`TcpStreamSender`: the loop reads each header, then the payload
    straight into the pool slice (``get_buffer`` hands out the slice itself), as emtransfer's
    tcp transport receives."""

    def __init__(self, owner: TcpProtoReceiver) -> None:
        self.owner, self.tag, self.got = owner, 0, 0
        self.hdr = memoryview(bytearray(TCP_HDR.size))
        self.target, self.in_payload = self.hdr, False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.got :]

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.got < len(self.target):
            return
        self.got = 0
        if self.in_payload:
            self.owner.landed(self.tag, time.time())
            self.target, self.in_payload = self.hdr, False
            return
        self.tag, dst, n = TCP_HDR.unpack(self.hdr)
        self.target, self.in_payload = self.owner.view[dst : dst + n], True

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in self.owner.pending.values():
            _resolve(fut, exc=ConnectionError(f"raw tcp stream lost: {exc!r}"))


class TcpProtoReceiver(RawReceiver):
    def __init__(self, node: Any) -> None:
        self.view = memoryview(node.registry.byte_view("embeddings").numpy()).cast("B")
        self.pending: dict[int, asyncio.Future[float]] = {}
        self.transport: asyncio.BaseTransport | None = None

    @classmethod
    async def open(cls, node: Any, sock: socket.socket) -> TcpProtoReceiver:
        self = cls(node)
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_connection(lambda: _IntoPool(self), sock=sock)
        return self

    def expect(self, tag: int, slot: int, dst: int, nbytes: int) -> asyncio.Future[float]:
        fut = self.pending[tag] = asyncio.get_running_loop().create_future()
        return fut

    def landed(self, tag: int, at: float) -> None:
        _resolve(self.pending.pop(tag), at)

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TcpThreadSender(RawSender):
    """(a) only: a blocking socket, ``sendall`` of the header and the pool slice from one
    thread of its own (the GIL is released in the send)."""

    def __init__(self, node: Any, sock: socket.socket) -> None:
        self.view = memoryview(node.registry.byte_view("embeddings").numpy()).cast("B")
        sock.setblocking(True)
        self.sock = sock
        self.pool = cf.ThreadPoolExecutor(1, "bench-tcp-send")

    def _send(self, src: int, dst: int, nbytes: int, tag: int) -> Stamps:
        t_post = time.time()
        self.sock.sendall(TCP_HDR.pack(tag, dst, nbytes))
        self.sock.sendall(self.view[src : src + nbytes])
        return t_post, time.time()

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._send, src, dst, nbytes, tag)

    async def close(self) -> None:
        self.sock.close()
        self.pool.shutdown(wait=True)


class TcpThreadReceiver(RawReceiver):
    """A thread of its own blocks in ``recv_into`` straight into the pool slice, and notes the
    time the last byte arrived before handing the news to the loop."""

    def __init__(self, node: Any, sock: socket.socket) -> None:
        self.view = memoryview(node.registry.byte_view("embeddings").numpy()).cast("B")
        sock.setblocking(True)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[float]] = {}
        self.thread = threading.Thread(target=self._read, name="bench-tcp-recv", daemon=True)
        self.thread.start()

    def expect(self, tag: int, slot: int, dst: int, nbytes: int) -> asyncio.Future[float]:
        fut = self.pending[tag] = self.loop.create_future()
        return fut

    def _fill(self, target: memoryview) -> None:
        got = 0
        while got < len(target):
            n = self.sock.recv_into(target[got:])
            if not n:
                raise ConnectionError("raw tcp: sender closed")
            got += n

    def _landed(self, tag: int, at: float) -> None:  # on the loop
        _resolve(self.pending.pop(tag), at)

    def _lost(self, exc: BaseException) -> None:  # on the loop
        for fut in self.pending.values():
            _resolve(fut, exc=ConnectionError(f"raw tcp: {exc!r}"))

    def _read(self) -> None:
        hdr = memoryview(bytearray(TCP_HDR.size))
        try:
            while True:
                self._fill(hdr)
                tag, dst, nbytes = TCP_HDR.unpack(hdr)
                self._fill(self.view[dst : dst + nbytes])
                self.loop.call_soon_threadsafe(self._landed, tag, time.time())
        except (ConnectionError, OSError) as exc:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self.loop.call_soon_threadsafe(self._lost, exc)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        await asyncio.to_thread(self.thread.join, 5)


class TorchRawSender(RawSender):
    """``dist.send`` of the pool slice on the default group, tag 100 + slot, in one executor
    thread (sends to the peer serialized)."""

    def __init__(self, node: Any, peer_rank: int) -> None:
        self.view = node.registry.byte_view("embeddings")
        self.peer = peer_rank
        self.pool = cf.ThreadPoolExecutor(1, "bench-torch-raw")

    def _send(self, src: int, nbytes: int, slot: int) -> Stamps:
        import torch.distributed as dist

        t_post = time.time()
        dist.send(self.view[src : src + nbytes], dst=self.peer, tag=TORCH_RAW_TAG + slot)
        return t_post, time.time()

    async def write(self, src: int, dst: int, nbytes: int, tag: int, slot: int) -> Stamps:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._send, src, nbytes, slot)

    async def close(self) -> None:
        self.pool.shutdown(wait=True)


class TorchRawReceiver(RawReceiver):
    """``dist.irecv`` straight into the pool slice, posted before "go"; its wait in a thread,
    which notes the time it returned."""

    def __init__(self, node: Any, peer_rank: int) -> None:
        self.view = node.registry.byte_view("embeddings")
        self.peer = peer_rank
        self.pool = cf.ThreadPoolExecutor(64, "bench-torch-wait")

    def expect(self, tag: int, slot: int, dst: int, nbytes: int) -> asyncio.Future[float]:
        import torch.distributed as dist

        work = dist.irecv(self.view[dst : dst + nbytes], src=self.peer, tag=TORCH_RAW_TAG + slot)
        assert work is not None

        def wait() -> float:
            work.wait()
            return time.time()

        return asyncio.get_running_loop().run_in_executor(self.pool, wait)

    async def close(self) -> None:
        self.pool.shutdown(wait=True)


# -- statistics --------------------------------------------------------------------------------
def summarize(times: list[float], nbytes: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "times_s": times,
        "median_s": med,
        "gbps": nbytes / med / 1e9,
        "p50_ms": float(np.percentile(times, 50)) * 1e3,
        "p99_ms": float(np.percentile(times, 99)) * 1e3,
        "min_ms": min(times) * 1e3,
    }


def summarize_lines(
    nbytes: int, a_times: dict[str, list[float]], times: dict[str, list[float]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """Per line its figures, (a) being the raw method with the best median (named in
    ``lines["a"]["method"]``); every method's figures; the ratios of medians (1.0: as fast as
    the baseline): (c)/(b) = b/c, (d)/(a) = a/d, (e)/(a) = a/e, (e)/(c) = c/e."""
    a_methods = {m: summarize(v, nbytes) for m, v in a_times.items()}
    best = min(a_methods, key=lambda m: a_methods[m]["median_s"])
    lines: dict[str, Any] = {"a": {**a_methods[best], "method": best}}
    lines.update({k: summarize(v, nbytes) for k, v in times.items()})
    lines["a"]["rounds"] = lines["b"]["rounds"] = 1
    med = {k: v["median_s"] for k, v in lines.items()}
    ratios = {
        "c/b": med["b"] / med["c"],
        "d/a": med["a"] / med["d"],
        "e/a": med["a"] / med["e"],
        "e/c": med["c"] / med["e"],
    }
    return lines, a_methods, ratios


# -- --trace: a timeline of emtransfer's steps per request (profiling aid) -----------------------
class Tracer:
    """Wraps, on this process's node objects only (emtransfer's code is untouched), the pool
    copies, the transport's write, write_nowait and wait_landed, and control messages sent and
    received, and records ``(name, rid, start, end)`` in wall-clock seconds."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list[tuple[str, str, float, float]] = []

    def install(self, node: Any) -> None:
        from emtransfer.runtime.node import Peer
        from emtransfer.transport import Transport

        ev = self.events
        reg, tr = node.registry, node.transport

        def sync(obj: Any, attr: str, name: str, rid_of: Any) -> None:
            fn = getattr(obj, attr)

            def wrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.time()
                try:
                    return fn(*a, **kw)
                finally:
                    ev.append((name, rid_of(a, kw), t0, time.time()))

            setattr(obj, attr, wrapper)

        def aio(obj: Any, attr: str, name: str, rid_of: Any) -> None:
            fn = getattr(obj, attr)

            async def wrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.time()
                try:
                    return await fn(*a, **kw)
                finally:
                    ev.append((name, rid_of(a, kw), t0, time.time()))

            setattr(obj, attr, wrapper)

        def posted(obj: Any, attr: str, name: str, rid_of: Any) -> None:
            # write_nowait: posts on the caller's turn, returns None (done) or what is left;
            # the step ends when the write does, as for write
            fn = getattr(obj, attr)

            def wrapper(*a: Any, **kw: Any) -> Any:
                t0, rid = time.time(), rid_of(a, kw)
                try:
                    pending = fn(*a, **kw)
                except BaseException:
                    ev.append((name, rid, t0, time.time()))
                    raise
                if pending is None:
                    ev.append((name, rid, t0, time.time()))
                    return None

                async def rest() -> Any:
                    try:
                        return await pending
                    finally:
                        ev.append((name, rid, t0, time.time()))

                return rest()

            setattr(obj, attr, wrapper)

        sync(reg, "write", "stage", lambda a, kw: a[0].rid)
        sync(reg, "read_into", "copy_out", lambda a, kw: a[0].rid)
        tag_rid = lambda a, kw: kw["tag"].split("/")[0]  # noqa: E731
        aio(tr, "write", "transport.write", tag_rid)
        if type(tr).write_nowait is not Transport.write_nowait:  # traced, still taken
            posted(tr, "write_nowait", "transport.write", tag_rid)
        aio(tr, "wait_landed", "wait_landed", lambda a, kw: a[1].split("/")[0])
        on_message = node._on_message

        def on_msg(peer: Any, msg: Any) -> Any:
            now = time.time()
            ev.append(("recv " + type(msg).__name__, getattr(msg, "rid", ""), now, now))
            return on_message(peer, msg)

        node._on_message = on_msg
        if not getattr(Peer, "_bench_traced", False):
            send = Peer.send

            def peer_send(peer: Any, msg: Any) -> None:
                now = time.time()
                ev.append(("send " + type(msg).__name__, getattr(msg, "rid", ""), now, now))
                send(peer, msg)

            Peer.send = peer_send  # type: ignore[assignment]
            Peer._bench_traced = True  # type: ignore[attr-defined]


def trace_summary(events: list[list[Any]], rids: dict[str, float]) -> list[dict[str, Any]]:
    """Median timeline of the traced requests: each step's start and duration in ms after the
    receiver's T0 (``rids`` maps rid -> T0). A step is (rank, name, n-th occurrence within its
    request); steps every request has are listed by median start."""
    steps: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
    per: dict[str, list[list[Any]]] = {}
    for e in events:
        if e[2] in rids:
            per.setdefault(e[2], []).append(e)
    for rid, evs in per.items():
        seen: dict[tuple[int, str], int] = {}
        for rank, name, _, start, end in sorted(evs, key=lambda e: e[3]):
            n = seen[(rank, name)] = seen.get((rank, name), 0) + 1
            steps.setdefault((rank, name, n), []).append((start - rids[rid], end - start))
    out = [
        {
            "rank": rank,
            "step": name if n == 1 else f"{name} #{n}",
            "at_ms": statistics.median(a for a, _ in v) * 1e3,
            "dur_ms": statistics.median(d for _, d in v) * 1e3,
        }
        for (rank, name, n), v in steps.items()
        if len(v) == len(per)
    ]
    return sorted(out, key=lambda s: s["at_ms"])


# -- rank 0: the encode side ---------------------------------------------------------------------
class EncodeSide:
    def __init__(self, args: argparse.Namespace, nodes: dict[str, Any]) -> None:
        self.args = args
        self.nodes = nodes
        self.raw: dict[str, RawSender] = {}  # (b)'s, per pair
        self.a_senders: dict[str, dict[str, RawSender]] = {}  # per pair, per (a) method
        self.payloads: dict[tuple[str, int, int], torch.Tensor] = {}
        self.sends: dict[str, asyncio.Task[Any]] = {}
        self.staged_sends: dict[str, asyncio.Task[tuple[Any, bool]]] = {}
        self.batches: dict[str, list[asyncio.Task[Any]]] = {}
        self.slot_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.tcp_accept: dict[tuple[str, str], asyncio.Future[socket.socket]] = {}
        self.done = asyncio.get_running_loop().create_future()
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.coord: Coord | None = None
        self.tracer: Tracer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def handle(self, msg: dict[str, Any]) -> None:
        task = asyncio.create_task(self._serve(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, msg: dict[str, Any]) -> None:
        assert self.coord is not None
        try:
            result = await getattr(self, "op_" + msg["op"])(msg)
            self.coord.reply(msg, **(result or {}))
        except Exception as exc:
            traceback.print_exc()
            self.coord.reply(msg, error=repr(exc))

    def payload(self, pair: str, tokens: int, key: int) -> torch.Tensor:
        hidden = HIDDEN if pair == "big" else SMALL_HIDDEN
        k = (pair, tokens, key)
        if k not in self.payloads:
            self.payloads[k] = make_payload(hidden, tokens, key)
        return self.payloads[k]

    async def op_setup(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The raw senders of ``pair``: for the big pair one per (a) method, the first of
        which (b) uses too; the small pair only needs (b)'s."""
        pair = msg["pair"]
        node = self.nodes[pair]
        (peer,) = node.peers.values()
        tid = peer.transport_id
        methods = raw_methods(self.args.transport, pair)
        make: dict[str, Callable[[], RawSender]]
        if self.args.transport == "nixl":
            make = {
                "thread-sleep": lambda: NixlRawSender(node, tid, self.args.poll_us * 1e-6),
                "loop-spin": lambda: NixlInlineSender(node, tid),
            }
        elif self.args.transport == "mooncake":
            make = {"thread-sync": lambda: MooncakeRawSender(node, tid)}
        elif self.args.transport == "torch":
            make = {"thread": lambda: TorchRawSender(node, peer_rank=1)}
        else:
            return {"ports": {m: self._listen(pair, m) for m in methods}}
        self.a_senders[pair] = {m: make[m]() for m in methods}
        self.raw[pair] = self.a_senders[pair][methods[0]]
        return {}

    def _listen(self, pair: str, method: str) -> int:
        """tcp: a listener for one raw socket of ``pair``; accepted in op_setup_done."""
        lsock = socket.create_server((self.args.host, 0))
        lsock.setblocking(False)
        loop = asyncio.get_running_loop()

        async def accept() -> socket.socket:
            conn, _ = await loop.sock_accept(lsock)
            lsock.close()
            _tune(conn, self.args.raw_tcp_sockbuf)
            return conn

        self.tcp_accept[(pair, method)] = asyncio.ensure_future(accept())
        port: int = lsock.getsockname()[1]
        return port

    async def op_setup_done(self, msg: dict[str, Any]) -> None:
        pair, node = msg["pair"], self.nodes[msg["pair"]]
        if self.args.transport != "tcp":
            return
        senders: dict[str, RawSender] = {}
        for method in raw_methods("tcp", pair):
            sock = await asyncio.wait_for(self.tcp_accept.pop((pair, method)), 30)
            if method == "loop-sock":
                senders[method] = TcpRawSender(node, sock)
            elif method == "loop-stream":
                senders[method] = await TcpStreamSender.open(node, sock)
            else:
                senders[method] = TcpThreadSender(node, sock)
        self.a_senders[pair] = senders
        self.raw[pair] = senders[raw_methods("tcp", pair)[0]]

    async def op_started(self, msg: dict[str, Any]) -> None:
        """Answers once this rank's nodes listen (rank 1 connects to them next)."""
        await self.started

    async def op_payload(self, msg: dict[str, Any]) -> None:
        for key in range(msg.get("nkeys", 1)):
            self.payload(msg["pair"], msg["tokens"], key)

    async def op_a(self, msg: dict[str, Any]) -> dict[str, Any]:
        """(a): the payload is put in the source region first (untimed), then the write by
        ``method``; t0 is taken just before the engine call, on the thread that makes it."""
        pair, tokens = msg["pair"], msg["tokens"]
        src = as_bytes(self.payload(pair, tokens, 0))
        nbytes = src.numel()
        self.nodes[pair].registry.byte_view("embeddings")[:nbytes].copy_(src)
        t0, t_done = await self.a_senders[pair][msg["method"]].write(0, 0, nbytes, msg["tag"], 0)
        return {"t0": t0, "t_done": t_done}

    async def op_b(self, msg: dict[str, Any]) -> dict[str, Any]:
        """(b): copy the tensor into the pre-agreed slot of the pool, raw write with notification."""
        pair, tokens, slot = msg["pair"], msg["tokens"], msg["slot"]
        payload = self.payload(pair, tokens, msg["key"])
        lock = self.slot_locks.setdefault((pair, slot), asyncio.Lock())
        async with lock:
            pool = self.nodes[pair].registry.pools["embeddings"]
            first = slot * tokens
            t0 = time.perf_counter()
            pool[first : first + tokens].copy_(payload)
            t1 = time.perf_counter()
            off = first * pool.shape[1] * pool.element_size()
            await self.raw[pair].write(
                off, off, payload.numel() * payload.element_size(), msg["tag"], slot
            )
        return {"copy_in_s": t1 - t0, "write_s": time.perf_counter() - t1}

    async def op_c_prepare(self, msg: dict[str, Any]) -> None:
        """(c): ``send`` is pending before rank 1 starts its clock."""
        pair, rid = msg["pair"], msg["rid"]
        payload = self.payload(pair, msg["tokens"], msg.get("key", 0))
        self.sends[rid] = asyncio.create_task(self.nodes[pair].send(rid, {"embeddings": payload}))

    async def op_e_prepare(self, msg: dict[str, Any]) -> None:
        """(e): like (c), but the payload is produced into the pool: ``stage`` lends views of a
        run of consecutive blocks, the source tensor is written into them (the encoder writing
        its output), and ``send`` writes from them with no copy in."""
        pair, rid, tokens = msg["pair"], msg["rid"], msg["tokens"]
        node, payload = self.nodes[pair], self.payload(pair, tokens, msg.get("key", 0))

        async def produce_and_send() -> tuple[Any, bool]:
            async with node.stage(rid, tokens) as staged:
                staged.tensors["embeddings"].copy_(payload)
                return await node.send(rid, staged), staged.zero_copy

        self.staged_sends[rid] = asyncio.create_task(produce_and_send())

    async def op_e_stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        st, zero_copy = await self.staged_sends.pop(msg["rid"])
        return {"zero_copy": zero_copy, "rounds": st.rounds, "first_write_at": st.first_write_at}

    async def op_c_stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        st = await self.sends.pop(msg["rid"])
        return {
            "first_write_at": st.first_write_at,
            "transfer_s": st.transfer_s,
            "elapsed_s": st.elapsed_s,
            "rounds": st.rounds,
            "writes": st.writes,
        }

    async def op_c_prepare_many(self, msg: dict[str, Any]) -> None:
        pair, prefix, tokens = msg["pair"], msg["prefix"], msg["tokens"]
        node = self.nodes[pair]
        self.batches[prefix] = [
            asyncio.create_task(
                node.send(
                    f"{prefix}-{i}", {"embeddings": self.payload(pair, tokens, i % msg["nkeys"])}
                )
            )
            for i in range(msg["count"])
        ]
        # one turn of the loop before answering: every send's first step registers its offer,
        # so the receiver's Inits find them (an Init that comes first waits for its data, and
        # beyond max_waiting_inits_per_peer of those a request is refused)
        await asyncio.sleep(0)

    async def op_c_collect(self, msg: dict[str, Any]) -> dict[str, Any]:
        res = await asyncio.gather(*self.batches.pop(msg["prefix"]), return_exceptions=True)
        errors = [repr(r) for r in res if isinstance(r, BaseException)]
        return {"ok": len(res) - len(errors), "errors": errors[:5]}

    async def op_trace(self, msg: dict[str, Any]) -> dict[str, Any]:
        events = self.tracer.events if self.tracer else []
        return {"events": [list(e) for e in events]}

    async def op_bye(self, msg: dict[str, Any]) -> dict[str, Any]:
        for senders in self.a_senders.values():
            for raw in senders.values():
                await raw.close()
        if not self.done.done():
            self.done.set_result(None)
        return {"cpu_s": cpu_seconds()}


def settle_gc(args: argparse.Namespace) -> None:
    """``--gc freeze``: once this rank's nodes run, move everything alive into the collector's
    permanent generation (``gc.freeze()``), as vLLM and SGLang do after start-up and as
    ``python -m emtransfer serve`` does by default: a full collection then scans only what was
    made since, not torch's and the engines' start-up objects."""
    if args.gc == "freeze":
        gc.collect()
        gc.freeze()


async def run_encode(args: argparse.Namespace) -> None:
    nodes = {
        "big": et.EncodeNode(big_settings(args), control="tcp"),
        "small": et.EncodeNode(small_settings(args), control="tcp"),
    }
    side = EncodeSide(args, nodes)
    if args.trace:
        side.tracer = Tracer(0)
        side.tracer.install(nodes["big"])
        side.tracer.install(nodes["small"])
    connected: asyncio.Future[Coord] = asyncio.get_running_loop().create_future()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        side.coord = Coord(reader, writer, side.handle)
        connected.set_result(side.coord)

    server = await asyncio.start_server(on_conn, args.host, args.port + 1, reuse_address=True)
    try:
        for node in nodes.values():
            await node.start()
        settle_gc(args)
        side.started.set_result(None)
        coord = await asyncio.wait_for(connected, 120)
        done, _ = await asyncio.wait([side.done, coord.closed], return_when=asyncio.FIRST_COMPLETED)
        if side.done not in done:
            raise RuntimeError("rank 1 went away before the end")
    finally:
        server.close()
        # small first: with the torch transport the big node's transport owns the process group
        await nodes["small"].close()
        await nodes["big"].close()


# -- rank 1: the language side, drives the benchmark ---------------------------------------------
class LanguageSide:
    def __init__(self, args: argparse.Namespace, coord: Coord, nodes: dict[str, Any]) -> None:
        self.args, self.coord, self.nodes = args, coord, nodes
        self.peers: dict[str, Any] = {}
        self.raw: dict[str, RawReceiver] = {}  # (b)'s, per pair
        self.a_receivers: dict[str, dict[str, RawReceiver]] = {}  # per pair, per (a) method
        self.tags = itertools.count(1)
        self.rids = itertools.count()
        self.b_parts: list[dict[str, float]] = []
        self.c_t0: dict[str, float] = {}

    async def setup(self, pair: str, address: str) -> None:
        node = self.nodes[pair]
        peer = self.peers[pair] = await node.connect(address)
        reply = await self.coord.call("setup", pair=pair)
        tr, poll_s = self.args.transport, self.args.poll_us * 1e-6
        methods = raw_methods(tr, pair)
        receivers: dict[str, RawReceiver] = {}
        if tr == "tcp":  # one socket per method
            for method in methods:
                sock = socket.create_connection((self.args.host, reply["ports"][method]))
                _tune(sock, self.args.raw_tcp_sockbuf)
                if method == "loop-sock":
                    receivers[method] = TcpRawReceiver(node, sock)
                elif method == "loop-stream":
                    receivers[method] = await TcpProtoReceiver.open(node, sock)
                else:
                    receivers[method] = TcpThreadReceiver(node, sock)
        else:  # every method's landing is seen the same way
            if tr == "nixl":
                one: RawReceiver = NixlRawReceiver(node, peer.transport_id, poll_s)
            elif tr == "mooncake":
                one = MooncakeRawReceiver(node, peer.transport_id, poll_s)
            else:
                one = TorchRawReceiver(node, peer_rank=0)
            receivers = dict.fromkeys(methods, one)
        self.a_receivers[pair] = receivers
        self.raw[pair] = receivers[methods[0]]
        await self.coord.call("setup_done", pair=pair)

    def all_receivers(self) -> list[RawReceiver]:
        return list({id(r): r for rs in self.a_receivers.values() for r in rs.values()}.values())

    # one rep of each line for the big pair ------------------------------------------------------
    async def rep_a(
        self, tokens: int, expected: torch.Tensor, verify: bool, method: str
    ) -> tuple[float, bool]:
        pool = self.nodes["big"].registry.byte_view("embeddings")
        want = as_bytes(expected)
        n = want.numel()
        if verify:
            pool[:n].zero_()
        tag = next(self.tags)
        landed = self.a_receivers["big"][method].expect(tag, 0, 0, n)
        reply = self.coord.request("a", pair="big", tokens=tokens, tag=tag, method=method)
        t1 = await landed  # when rank 1 learnt it, on the thread that learnt it
        r = await reply
        ok = bool(torch.equal(pool[:n], want)) if verify else True
        # a ceiling: where the sender's completion proves landing (nixl, mooncake: remote
        # completion), the earlier of that and the receiver's own sighting of the bytes
        if self.nodes["big"].transport.guarantees.remote_completion:
            t1 = min(t1, r["t_done"])
        return t1 - r["t0"], ok

    async def rep_b(self, tokens: int, expected: torch.Tensor, verify: bool) -> tuple[float, bool]:
        pool = self.nodes["big"].registry.pools["embeddings"]
        n = expected.numel() * expected.element_size()
        if verify:
            pool[:tokens].zero_()
        t0 = time.time()
        tag = next(self.tags)
        landed = self.raw["big"].expect(tag, 0, 0, n)
        reply = self.coord.request("b", pair="big", tokens=tokens, key=0, slot=0, tag=tag)
        await landed
        t_landed = time.time()
        out = torch.empty_like(expected)
        out.copy_(pool[:tokens])
        t1 = time.time()
        r = await reply
        self.b_parts.append(
            {
                "copy_in_s": r["copy_in_s"],
                "write_s": r["write_s"],
                "go_to_landed_s": t_landed - t0,
                "copy_out_s": t1 - t_landed,
            }
        )
        ok = bool(torch.equal(out, expected)) if verify else True
        return t1 - t0, ok

    async def rep_c(self, tokens: int, expected: torch.Tensor, verify: bool) -> dict[str, Any]:
        rid = f"big-{tokens}-{next(self.rids)}"
        await self.coord.call("c_prepare", pair="big", rid=rid, tokens=tokens)
        known = None if tokens == RESUME_TOKENS else tokens
        t0 = self.c_t0[rid] = time.time()
        got = await self.nodes["big"].receive(rid, self.peers["big"], expected_tokens=known)
        t1 = time.time()
        sent = await self.coord.call("c_stats", rid=rid)
        ok = bool(torch.equal(got.tensors["embeddings"], expected)) if verify else True
        return {
            "c": t1 - t0,
            "d": got.stats["last_chunk_at"] - sent["first_write_at"],
            "rounds": got.rounds,
            "ok": ok,
            "recv_stats": {k: v for k, v in got.stats.items() if k != "last_chunk_at"},
            "send_stats": {k: v for k, v in sent.items() if k not in ("id", "op")},
        }

    async def rep_e(self, tokens: int, expected: torch.Tensor, verify: bool) -> dict[str, Any]:
        """(e): ``e_prepare`` (stage, produce into the views, send) already started on rank 0;
        T0, then ``lease`` (known length) and the payload in hand, as views of the pool when
        it fits one allocation of consecutive blocks; T1. Verified inside the lease."""
        rid = f"zc-{tokens}-{next(self.rids)}"
        await self.coord.call("e_prepare", pair="big", rid=rid, tokens=tokens)
        t0 = time.time()
        async with self.nodes["big"].lease(rid, self.peers["big"], expected_tokens=tokens) as got:
            t1 = time.time()
            ok = bool(torch.equal(got.tensors["embeddings"], expected)) if verify else True
            recv_zero_copy = got.zero_copy
        sent = await self.coord.call("e_stats", rid=rid)
        return {
            "e": t1 - t0,
            "ok": ok,
            "rounds": got.rounds,
            "send_zero_copy": sent["zero_copy"],
            "recv_zero_copy": recv_zero_copy,
        }

    async def big_payload(self, tokens: int) -> dict[str, Any]:
        args = self.args
        expected = make_payload(HIDDEN, tokens, 0)
        nbytes = expected.numel() * expected.element_size()
        await self.coord.call("payload", pair="big", tokens=tokens)
        reps = args.reps if nbytes <= 16 * MiB else args.reps_large
        methods = raw_methods(args.transport, "big")
        times: dict[str, list[float]] = {k: [] for k in LINES if k != "a"}
        a_times: dict[str, list[float]] = {m: [] for m in methods}
        rounds: list[int] = []
        e_rounds: list[int] = []
        zero_copy = {"send": 0, "recv": 0}
        verified: dict[str, list[bool]] = {k: [] for k in ("a", "b", "c", "e")}
        send_stats, recv_stats, b_parts = [], [], []
        order = ("a", "b", "c", "e")
        total = args.warmup + reps + 1  # warm-ups and one trailing rep are verified, not timed
        for i in range(total):
            timed = args.warmup <= i < args.warmup + reps
            verify = not timed
            rot = order[i % 4 :] + order[: i % 4]  # rotate: no line always follows another
            for line in rot:
                if line == "a":  # every raw method once, in rotating order too
                    oks = []
                    for method in methods[i % len(methods) :] + methods[: i % len(methods)]:
                        t, ok = await self.rep_a(tokens, expected, verify, method)
                        oks.append(ok)
                        if timed:
                            a_times[method].append(t)
                    ok = all(oks)
                elif line == "b":
                    self.b_parts = []
                    t, ok = await self.rep_b(tokens, expected, verify)
                    if timed:
                        times["b"].append(t)
                        b_parts += self.b_parts
                elif line == "c":
                    r = await self.rep_c(tokens, expected, verify)
                    ok = r["ok"]
                    if timed:
                        times["c"].append(r["c"])
                        times["d"].append(r["d"])
                        rounds.append(r["rounds"])
                        send_stats.append(r["send_stats"])
                        recv_stats.append(r["recv_stats"])
                else:
                    r = await self.rep_e(tokens, expected, verify)
                    ok = r["ok"]
                    if timed:
                        times["e"].append(r["e"])
                        e_rounds.append(r["rounds"])
                        zero_copy["send"] += r["send_zero_copy"]
                        zero_copy["recv"] += r["recv_zero_copy"]
                if verify:
                    verified[line].append(ok)
                    if not ok:
                        raise RuntimeError(f"{tokens} tokens, line {line}: payload mismatch")
        lines, a_methods, ratios = summarize_lines(nbytes, a_times, times)
        lines["c"]["rounds"] = lines["d"]["rounds"] = statistics.median(rounds)
        lines["e"]["rounds"] = statistics.median(e_rounds)
        lines["e"]["zero_copy"] = {**zero_copy, "reps": reps}
        return {
            "tokens": tokens,
            "hidden": HIDDEN,
            "bytes": nbytes,
            "mib": nbytes / MiB,
            "expected_tokens": None if tokens == RESUME_TOKENS else tokens,
            "reps": reps,
            "warmup": args.warmup,
            "lines": lines,
            "a_methods": a_methods,  # every raw method's figures; lines["a"] is the best
            "ratios": ratios,
            "verified": {k: all(v) and bool(v) for k, v in verified.items()},
            "send_stats": send_stats,
            "recv_stats": recv_stats,
            "b_parts": b_parts,
        }

    # small transfers ----------------------------------------------------------------------------
    async def small_b(self, conc: int, count: int, expected: list[torch.Tensor]) -> float:
        node = self.nodes["small"]
        pool = node.registry.pools["embeddings"]
        raw = self.raw["small"]
        n = SMALL_TOKENS * SMALL_HIDDEN * 2
        replies: list[asyncio.Future[dict[str, Any]]] = []
        last: dict[int, tuple[int, torch.Tensor]] = {}

        async def worker(slot: int, items: range) -> None:
            first = slot * SMALL_TOKENS
            for i in items:
                tag = next(self.tags)
                landed = raw.expect(tag, slot, first * SMALL_HIDDEN * 2, n)
                replies.append(
                    self.coord.request(
                        "b",
                        pair="small",
                        tokens=SMALL_TOKENS,
                        key=i % SMALL_KEYS,
                        slot=slot,
                        tag=tag,
                    )
                )
                await landed
                out = torch.empty((SMALL_TOKENS, SMALL_HIDDEN), dtype=DTYPE)
                out.copy_(pool[first : first + SMALL_TOKENS])
                last[slot] = (i, out)

        t0 = time.time()
        await asyncio.gather(*(worker(w, range(w, count, conc)) for w in range(conc)))
        wall = time.time() - t0
        await asyncio.gather(*replies)
        for i, out in last.values():
            if not torch.equal(out, expected[i % SMALL_KEYS]):
                raise RuntimeError(f"small (b) transfer {i}: payload mismatch")
        return wall

    async def small_c(self, conc: int, count: int, expected: list[torch.Tensor]) -> float:
        node, peer = self.nodes["small"], self.peers["small"]
        prefix = f"s{conc}-{next(self.rids)}"
        await self.coord.call(
            "c_prepare_many",
            pair="small",
            prefix=prefix,
            count=count,
            tokens=SMALL_TOKENS,
            nkeys=SMALL_KEYS,
        )
        last: dict[int, tuple[int, Any]] = {}

        async def worker(w: int, items: range) -> None:
            for i in items:
                rid = f"{prefix}-{i}"
                self.c_t0[rid] = time.time()
                got = await node.receive(rid, peer, expected_tokens=SMALL_TOKENS)
                last[w] = (i, got)

        t0 = time.time()
        await asyncio.gather(*(worker(w, range(w, count, conc)) for w in range(conc)))
        wall = time.time() - t0
        res = await self.coord.call("c_collect", prefix=prefix)
        if res["errors"]:
            raise RuntimeError(f"small (c) sends failed: {res['errors']}")
        for i, got in last.values():
            if not torch.equal(got.tensors["embeddings"], expected[i % SMALL_KEYS]):
                raise RuntimeError(f"small (c) transfer {i}: payload mismatch")
        return wall

    async def small(self) -> dict[str, Any]:
        args = self.args
        expected = [make_payload(SMALL_HIDDEN, SMALL_TOKENS, k) for k in range(SMALL_KEYS)]
        await self.coord.call("payload", pair="small", tokens=SMALL_TOKENS, nkeys=SMALL_KEYS)
        out = []
        for conc in args.small_conc:
            walls: dict[str, list[float]] = {"b": [], "c": []}
            warm = max(2 * conc, 8)
            await self.small_b(conc, warm, expected)
            await self.small_c(conc, warm, expected)
            for r in range(args.small_repeats):
                for line in ("b", "c") if r % 2 == 0 else ("c", "b"):
                    fn = self.small_b if line == "b" else self.small_c
                    walls[line].append(await fn(conc, args.small_n, expected))
            rates = {k: [args.small_n / w for w in v] for k, v in walls.items()}
            med = {k: statistics.median(v) for k, v in rates.items()}
            out.append(
                {
                    "concurrency": conc,
                    "count": args.small_n,
                    "rates_per_s": rates,
                    "b_rate": med["b"],
                    "c_rate": med["c"],
                    "c/b": med["c"] / med["b"],
                }
            )
        return {
            "tokens": SMALL_TOKENS,
            "hidden": SMALL_HIDDEN,
            "bytes": SMALL_TOKENS * SMALL_HIDDEN * 2,
            "repeats": args.small_repeats,
            "results": out,
        }


async def run_language(args: argparse.Namespace) -> dict[str, Any]:
    coord = await coord_connect(args.host, args.port + 1)
    nodes = {
        "big": et.LanguageNode(big_settings(args)),
        "small": et.LanguageNode(small_settings(args)),
    }
    side = LanguageSide(args, coord, nodes)
    tracer = None
    if args.trace:
        tracer = Tracer(1)
        tracer.install(nodes["big"])
        tracer.install(nodes["small"])
    result: dict[str, Any] = {}
    busy0, own0 = busy_now(), cpu_seconds()
    try:
        for node in nodes.values():
            await node.start()
        await coord.call("started")  # rank 0's nodes may still be starting (torch: after ours)
        await side.setup("big", f"{args.host}:{args.port + 2}")
        await side.setup("small", f"{args.host}:{args.port + 3}")
        settle_gc(args)
        result["payloads"] = []
        for tokens in args.sizes:
            row = await side.big_payload(tokens)
            result["payloads"].append(row)
            print(
                f"  {tokens:5d} tokens: "
                + "  ".join(f"{k} {row['lines'][k]['gbps']:.2f}" for k in LINES)
                + " GB/s",
                flush=True,
            )
        if args.small_n:
            result["small"] = await side.small()
        result["nixl_stray_notifs"] = sum(r.stray for r in side.all_receivers())
        result["nixl_raw_notifs_taken_by_sweep"] = sum(
            getattr(r, "via_transport", 0) for r in side.all_receivers()
        )
        if tracer is not None:
            theirs = (await coord.call("trace"))["events"]
            events = [[0, *e] for e in theirs] + [[1, *e] for e in tracer.events]
            by_size: dict[int, dict[str, float]] = {}
            for rid, t0 in side.c_t0.items():
                if rid.startswith("big-"):
                    by_size.setdefault(int(rid.split("-")[1]), {})[rid] = t0
            timed = {r["tokens"]: r for r in result["payloads"]}
            result["trace"] = {
                str(tokens): trace_summary(events, rids)
                for tokens, rids in by_size.items()
                if tokens in timed
            }
            args.trace.parent.mkdir(parents=True, exist_ok=True)
            args.trace.write_text(json.dumps({"events": events, "t0": side.c_t0}))
        bye = await coord.call("bye")
        result["cpu"] = machine_share(busy0, busy_now(), cpu_seconds() - own0 + bye["cpu_s"])
    finally:
        for raw in side.all_receivers():
            await raw.close()
        await nodes["small"].close()
        await nodes["big"].close()
    return result


def git_describe() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# -- how much of the machine others used during the run -----------------------------------------
def cpu_seconds() -> float:
    """CPU seconds of this process, all threads."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def busy_now() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (Linux /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except (OSError, ValueError):
        return (0.0, 0.0)
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return ((sum(fields) - idle) / hz, sum(fields) / hz)


def machine_share(
    before: tuple[float, float], after: tuple[float, float], bench_cpu: float
) -> dict[str, float]:
    """Busy fraction of all CPUs during the run, and the part not used by the two ranks."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return {}
    return {"machine_busy": busy / total, "others_busy": max(0.0, busy - bench_cpu) / total}


# -- settings, report ----------------------------------------------------------------------------
BLOCK_TOKENS, BIG_BLOCKS = 128, 64  # the big pools: 64 x 128 = 8192 tokens, 64 MiB per side


def big_blocks(sizes: list[int]) -> int:
    """The big pools' blocks: 64, or enough for the largest payload in one allocation, which
    (e) needs (``stage`` refuses a payload larger than the pool, and ``lease`` takes it in one
    allocation or not at all)."""
    return max([BIG_BLOCKS] + [-(-n // BLOCK_TOKENS) for n in sizes])


def big_settings(args: argparse.Namespace) -> et.Settings:
    return et.Settings(
        hidden_size=HIDDEN,
        dtype="bfloat16",
        block_size=BLOCK_TOKENS,
        default_blocks=8,
        num_blocks=big_blocks(args.sizes),
        transport=args.transport,
        host=args.host,
        bootstrap_port=args.port + 2,
    )


def small_settings(args: argparse.Namespace) -> et.Settings:
    return et.Settings(
        hidden_size=SMALL_HIDDEN,
        dtype="bfloat16",
        block_size=128,
        default_blocks=8,
        num_blocks=64,
        transport=args.transport,
        host=args.host,
        bootstrap_port=args.port + 3,
    )


#: (payload MiB or "small", what, target): the performance issue's targets for nixl and tcp
TARGETS: tuple[tuple[object, str, float], ...] = (
    (2, "c/b", 0.90),
    (8, "c/b", 0.95),
    ("resume", "c/b", 0.95),
    ("resume", "d/a", 0.85),
    (64, "c/b", 0.95),
    (64, "d/a", 0.95),
    ("small", "c/b rate, concurrency 1", 0.90),
    ("small", "c/b rate, concurrency 32", 1.0),
    (2, "p50 c - b ms", -0.15),  # at most 0.15 ms more than by hand (negated: >= -0.15)
)
#: (payload MiB, what): figures reported with no target (the issue fixes none): the zero-copy
#: path end to end, (e), against the raw engine's best pool-to-pool write of the same bytes, (a)
REPORTED: tuple[tuple[object, str], ...] = ((2, "e/a"), (8, "e/a"), (16, "e/a"), (64, "e/a"))
REPORTED_WHAT = {"e/a": "(e) zero copy end to end / (a) raw wire"}
#: the torch transport against its own by-hand path: >= 0.8 from 8 MiB, >= 0.7 small
TORCH_TARGETS: tuple[tuple[object, str, float], ...] = (
    (8, "c/b", 0.8),
    ("resume", "c/b", 0.8),
    (64, "c/b", 0.8),
    ("small", "c/b rate, concurrency 1", 0.7),
    ("small", "c/b rate, concurrency 32", 0.7),
)


def measures(result: dict[str, Any]) -> dict[tuple[object, str], float]:
    """Every figure a target is set on, keyed like TARGETS."""
    out: dict[tuple[object, str], float] = {}
    for row in result["payloads"]:
        key: object = "resume" if row["tokens"] == RESUME_TOKENS else round(row["mib"])
        for ratio in ("c/b", "d/a"):
            out[(key, ratio)] = row["ratios"][ratio]
        ln = row["lines"]
        out[(key, "p50 c - b ms")] = -(ln["c"]["p50_ms"] - ln["b"]["p50_ms"])
        if "e/a" in row["ratios"]:  # runs from before (e) existed have none
            out[(round(row["mib"]), "e/a")] = row["ratios"]["e/a"]
    for r in result.get("small", {}).get("results", []):
        out[("small", f"c/b rate, concurrency {r['concurrency']}")] = r["c/b"]
    return out


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    got = measures(result)
    targets = TORCH_TARGETS if result["config"]["transport"] == "torch" else TARGETS
    out = []
    for key, what, target in targets:
        if (key, what) not in got:
            continue
        value = got[(key, what)]
        out.append(
            {
                "payload": key if isinstance(key, str) else f"{key} MiB",
                "ratio": what,
                "target": target,
                "value": value,
                "met": value >= target,
            }
        )
    for key, what in REPORTED:
        if (key, what) in got:
            out.append(
                {
                    "payload": f"{key} MiB",
                    "ratio": what,
                    "target": "report",
                    "value": got[(key, what)],
                    "met": None,
                }
            )
    return out


def target_text(t: dict[str, Any]) -> str:
    if t["target"] == "report":
        what = REPORTED_WHAT.get(t["ratio"], t["ratio"])
        return f"{t['payload']:8s} {what}  {t['value']:.3f} (target: report)"
    if t["ratio"].startswith("p50"):  # stored negated, so that more is better throughout
        return (
            f"{t['payload']:8s} p50 (c) - (b)  {-t['value']:+.3f} ms (target <= "
            f"+{-t['target']:.2f} ms)"
        )
    return f"{t['payload']:8s} {t['ratio']:26s} {t['value']:.3f} (target >= {t['target']:.2f})"


def table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"emtransfer transfer benchmark: transport={cfg['transport']}  {cfg['date']}  "
        f"host={cfg['host']}  cpus={cfg['cpus']}",
        f"payload [tokens, {HIDDEN}] bfloat16; pools {big_blocks(cfg['sizes'])} blocks x "
        f"{BLOCK_TOKENS} tokens per side; "
        f"reps {cfg['reps']} (<= 16 MiB) / {cfg['reps_large']} (64 MiB), {cfg['warmup']} warm-up",
        "",
        "                      throughput GB/s (bytes / median)                 "
        "ratio of medians          rounds",
        "tokens    MiB   (a)wire  (b)hand   (c)emt  (d)xfer  (e)zero     "
        "(c)/(b)  (d)/(a)  (e)/(a)      (c)",
    ]
    for row in result["payloads"]:
        ln, ra = row["lines"], row["ratios"]
        tag = " resume" if row["tokens"] == RESUME_TOKENS else ""
        lines.append(
            f"{row['tokens']:6d} {row['mib']:6.0f} "
            + " ".join(f"{ln[k]['gbps']:8.2f}" for k in LINES)
            + f"     {ra['c/b']:7.2f}  {ra['d/a']:7.2f}  {ra['e/a']:7.2f}"
            + f"   {ln['c']['rounds']:6g}{tag}"
        )
    lines += [
        "",
        "(a) is the best raw method per payload, median GB/s of each "
        f"({', '.join(RAW_METHODS[cfg['transport']])}):",
    ]
    for row in result["payloads"]:
        am = row["a_methods"]
        lines.append(
            f"{row['tokens']:6d} {row['mib']:6.0f}   best {row['lines']['a']['method']:13s}"
            + "".join(f"  {m} {a['gbps']:.2f}" for m, a in am.items())
        )
    lines += ["", "(e) zero copy (reps whose tensors were pool views; known length throughout):"]
    for row in result["payloads"]:
        zc = row["lines"]["e"]["zero_copy"]
        lines.append(
            f"{row['tokens']:6d} {row['mib']:6.0f}   stage {zc['send']}/{zc['reps']}, "
            f"lease {zc['recv']}/{zc['reps']}, rounds {row['lines']['e']['rounds']:g}"
        )
    lines += [
        "",
        "latency ms, p50 / p99",
        "tokens    MiB "
        + "".join(f"{k:>18}" for k in ("(a) wire", "(b) hand", "(c) emt", "(d) xfer", "(e) zero")),
    ]
    for row in result["payloads"]:
        ln = row["lines"]
        lines.append(
            f"{row['tokens']:6d} {row['mib']:6.0f} "
            + "".join(f"{ln[k]['p50_ms']:9.2f} /{ln[k]['p99_ms']:7.2f}" for k in LINES)
        )
    small = result.get("small")
    if small:
        lines += [
            "",
            f"small transfers: {small['tokens']} tokens x {small['hidden']} bfloat16 "
            f"({small['bytes'] / MiB:.1f} MiB), {cfg['small_n']} per measurement, "
            f"median of {small['repeats']}",
            "concurrency   (b) hand /s    (c) emt /s    (c)/(b)",
        ]
        for r in small["results"]:
            lines.append(
                f"{r['concurrency']:11d} {r['b_rate']:13.0f} {r['c_rate']:13.0f} {r['c/b']:10.2f}"
            )
    for tokens, steps in result.get("trace", {}).items():
        lines += ["", f"trace, {tokens} tokens: median ms after the receiver's T0 (rank: step)"]
        lines += [
            f"  {s['at_ms']:8.2f} +{s['dur_ms']:7.2f}  r{s['rank']}: {s['step']}" for s in steps
        ]
    lines += ["", "targets (reported, not asserted)"]
    for t in result["targets"]:
        mark = "report" if t["met"] is None else "met   " if t["met"] else "MISSED"
        lines.append(f"  {mark} {target_text(t)}")
    lines.append(f"verified: {'all payloads byte-identical' if result['verified'] else 'MISMATCH'}")
    if cpu := result.get("cpu"):
        lines.append(
            f"CPU during the run: machine {cpu['machine_busy']:.0%} busy, "
            f"{cpu['others_busy']:.0%} by other processes (noise)"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax, result)
    ax.set_title(
        f"emtransfer vs raw {result['config']['transport']} ({result['config']['date'][:10]})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(ax: Any, result: dict[str, Any]) -> None:
    rows = result["payloads"]
    x = [r["mib"] for r in rows]
    styles = {
        "a": ("C0", "o", "-"),
        "b": ("C1", "s", "-"),
        "c": ("C2", "^", "-"),
        "d": ("C3", "v", "--"),
        "e": ("C4", "D", "-"),
    }
    for k in LINES:
        if any(k not in r["lines"] for r in rows):  # a run from before that line existed
            continue
        color, marker, ls = styles[k]
        ax.plot(
            x,
            [r["lines"][k]["gbps"] for r in rows],
            color=color,
            marker=marker,
            linestyle=ls,
            label=LABELS[k],
        )
    for r in rows:
        if r["tokens"] == RESUME_TOKENS:
            ax.annotate(
                "resume",
                (r["mib"], r["lines"]["c"]["gbps"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
                color="C2",
            )
    style_axes(ax, x, "GB/s (1e9 B/s)")


def style_axes(ax: Any, x: list[float], ylabel: str) -> None:
    """Payload MiB on a log-2 axis, GB/s from zero: every throughput plot of the benchmarks."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}" for v in x])
    ax.set_xlabel("payload MiB (tokens x 4096 bf16)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--transport", choices=("nixl", "torch", "tcp", "mooncake"), required=True)
    ap.add_argument("--sizes", default="256,1024,2048,8192", help="payload tokens, comma-separated")
    ap.add_argument("--reps", type=int, default=20, help="timed reps per payload <= 16 MiB")
    ap.add_argument("--reps-large", type=int, default=10, help="timed reps per payload > 16 MiB")
    ap.add_argument("--warmup", type=int, default=3, help="untimed (verified) reps per payload")
    ap.add_argument(
        "--small-n", type=int, default=400, help="small transfers per measurement; 0 skips"
    )
    ap.add_argument("--small-conc", default="1,32")
    ap.add_argument("--small-repeats", type=int, default=3)
    ap.add_argument(
        "--poll-us",
        type=float,
        default=30.0,
        help="raw nixl / mooncake: sleep between polls of transfer state (nixl thread-sleep, "
        "(b)'s method) and of notifications (the raw receivers)",
    )
    ap.add_argument(
        "--raw-tcp-sockbuf",
        type=int,
        default=4 << 20,
        help="raw tcp SO_SNDBUF/SO_RCVBUF (emtransfer's tcp transport uses 4 MiB)",
    )
    ap.add_argument("--host", default=None, help="default: $MASTER_ADDR or 127.0.0.1")
    ap.add_argument(
        "--json",
        type=Path,
        default=None,
        help="default bench/results/<transport>-<UTC time>.json (a new file per run)",
    )
    ap.add_argument("--plot", type=Path, default=None, help="default: beside the JSON, .png")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --json/--plot")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--log-level", default="warning", help="emtransfer's log level")
    ap.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        help="profiling aid: sys.setswitchinterval in ms on both ranks (default: Python's 5 ms)",
    )
    ap.add_argument(
        "--gc",
        default="default",
        choices=("default", "freeze"),
        help="freeze: gc.freeze() on both ranks once their nodes run, as serving engines do",
    )
    ap.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="profiling aid: record a timeline of emtransfer's steps for the (c) reps, "
        "write the events to PATH and a median timeline per payload to the table",
    )
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.small_conc = [int(s) for s in args.small_conc.split(",") if s]
    if args.host is None:
        args.host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if args.host == "localhost":
            args.host = "127.0.0.1"
    args.port = int(os.environ.get("MASTER_PORT", "29500"))
    results = Path(__file__).resolve().parent / "results"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    args.json = args.json or results / f"{args.transport}-{stamp}.json"
    args.plot = args.plot or args.json.with_suffix(".png")
    for path in (args.json, args.plot):  # committed results are never overwritten by default
        if path.exists() and not args.force:
            ap.error(f"{path} exists: not overwritten (pass --force, or another --json)")
    return args


def main() -> int:
    args = parse_args()
    rank, world = int(os.environ.get("RANK", "-1")), int(os.environ.get("WORLD_SIZE", "0"))
    if world != 2 or rank not in (0, 1):
        sys.exit("run under torchrun --nproc-per-node 2 (rank 0 encode, rank 1 language)")
    torch.set_num_threads(1)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval * 1e-3)
    configure_logging(args.log_level)
    import uvloop

    if rank == 0:
        uvloop.run(run_encode(args))
        return 0
    started, load_before = time.time(), os.getloadavg()
    result = uvloop.run(run_language(args))
    nixl_version = mooncake_version = None
    from importlib.metadata import version

    if args.transport == "nixl":
        with contextlib.suppress(Exception):
            nixl_version = version("nixl")
    if args.transport == "mooncake":
        with contextlib.suppress(Exception):
            mooncake_version = version("mooncake-transfer-engine-non-cuda")
    result["config"] = {
        "transport": args.transport,
        "gc": args.gc,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "torchrun --nproc-per-node 2 " + " ".join(sys.argv),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_describe(),
        "nixl": nixl_version,
        "mooncake": mooncake_version,
        "mc_env": {k: v for k, v in os.environ.items() if k.startswith("MC_")},
        "sizes": args.sizes,
        "reps": args.reps,
        "reps_large": args.reps_large,
        "warmup": args.warmup,
        "small_n": args.small_n,
        "small_conc": args.small_conc,
        "poll_us": args.poll_us,
        "switch_interval_ms": args.switch_interval or sys.getswitchinterval() * 1e3,
        "raw_tcp_sockbuf": args.raw_tcp_sockbuf,
        "wall_s": time.time() - started,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "clock": "time.time() on both ranks of one host",
    }
    result["verified"] = all(all(r["verified"].values()) for r in result["payloads"])
    result["targets"] = evaluate_targets(result)
    print(table(result), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"json: {args.json}")
    if not args.no_plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
