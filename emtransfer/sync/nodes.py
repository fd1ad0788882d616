"""The owners: an event loop in a daemon thread of their own, the asyncio node inside it.

A start call (``receive``, ``lease``, ``encode``, ``send``) registers a handle and posts the
request to the loop (``call_soon_threadsafe``); the loop runs it as one task per request, the
runtime's own coroutine, with the handle as the session's state observer. ``close()`` aborts
what is in flight, gives leases back, closes the node (which drains and frees everything), and
ends the loop and its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, Self, TypeVar

import torch

from ..errors import TransferAborted, Unavailable
from ..logs import get_logger
from ..runtime import EncodeNode, LanguageNode, Peer, Received, SendStats
from ..runtime.node import Node
from ..settings import Settings
from .handle import Kind, TransferHandle

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]
_log = get_logger("emtransfer.sync")


def default_loop_factory() -> asyncio.AbstractEventLoop:
    """uvloop's loop, as the servers and the demo run on (asyncio's when it is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class SyncNode:
    """What both owners share: the loop thread, the handles in flight, the shutdown."""

    role: ClassVar[str]

    def __init__(self, build: Callable[[], Node], loop_factory: LoopFactory | None) -> None:
        self._lock = threading.Lock()
        self._handles: set[TransferHandle[Any]] = set()
        self._closing = False  # no new requests; set once, under the lock
        self._stopped = False  # the loop takes no more callbacks; set once, under the lock
        self._closed = threading.Event()
        #: grows each time one of this node's handles moves on or ends (wait_for_change)
        self._changes = 0
        self._changed_cond = threading.Condition()
        self._loop = (loop_factory or default_loop_factory)()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"emtransfer-sync-{self.role}", daemon=True
        )
        self._thread.start()
        try:
            started = asyncio.run_coroutine_threadsafe(self._start(build), self._loop)
            self._node = started.result()
        except BaseException:
            self._stop_loop()
            self._closed.set()
            raise
        _log.info("sync node started", role=self.role, node=self._node.node_id)

    # -- the loop thread ------------------------------------------------------------------------
    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in leftover:  # none after a close(): it awaited every task it made
                    task.cancel()
                if leftover:
                    _log.warning("tasks cancelled at loop end", tasks=len(leftover))
                    loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    @staticmethod
    async def _start(build: Callable[[], Node]) -> Node:
        node = build()  # inside the loop: whatever the node binds, it binds to this one
        try:
            await node.start()
        except BaseException:
            with contextlib.suppress(Exception):  # the start's error is the one to report
                await node.close()
            raise
        return node

    def _stop_loop(self) -> None:
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def _post(self, callback: Callable[..., object], *args: Any) -> bool:
        """Run ``callback(*args)`` on the loop soon; False once the loop has stopped (a close
        did, or will do, what the callback would)."""
        with self._lock:
            if self._stopped:
                return False
            self._loop.call_soon_threadsafe(callback, *args)
            return True

    # -- requests -------------------------------------------------------------------------------
    def _submit(
        self, rid: str, kind: Kind, body: Callable[[TransferHandle[T]], Awaitable[None]]
    ) -> TransferHandle[T]:
        handle: TransferHandle[T] = TransferHandle(self, rid, kind)
        with self._lock:
            if self._closing:
                raise Unavailable(f"this sync {self.role} node is closed")
            self._handles.add(handle)
            self._loop.call_soon_threadsafe(self._launch, handle, body)
        return handle

    def _launch(
        self, handle: TransferHandle[T], body: Callable[[TransferHandle[T]], Awaitable[None]]
    ) -> None:
        task = asyncio.ensure_future(self._drive(handle, body))
        handle._task = task
        task.add_done_callback(lambda _: self._ended(handle))

    @staticmethod
    async def _drive(
        handle: TransferHandle[T], body: Callable[[TransferHandle[T]], Awaitable[None]]
    ) -> None:
        """One request: the body finishes the handle with its result; errors finish it here."""
        try:
            await body(handle)
        except asyncio.CancelledError:  # only ours: an abort or a close before it began
            handle._finish(error=handle._cancel_error or _cancelled(handle))
        except Exception as exc:
            handle._finish(error=exc)

    def _ended(self, handle: TransferHandle[Any]) -> None:
        if not handle.done():  # cancelled before its first step: _drive never ran
            handle._finish(error=handle._cancel_error or _cancelled(handle))
        with self._lock:
            self._handles.discard(handle)

    def changes(self) -> int:
        """A count that grows each time one of this node's handles moves on (a new
        :class:`PollState`) or ends: read it, poll the handles, then
        :meth:`wait_for_change` with it to sleep until there is something new to see."""
        with self._changed_cond:
            return self._changes

    def wait_for_change(self, seen: int, timeout: float | None = None) -> int:
        """Block (at most ``timeout`` seconds) until :meth:`changes` differs from ``seen``;
        returns it. For a scheduler that would rather sleep than poll when nothing moves."""
        with self._changed_cond:
            self._changed_cond.wait_for(lambda: self._changes != seen, timeout)
            return self._changes

    def _changed(self) -> None:
        with self._changed_cond:
            self._changes += 1
            self._changed_cond.notify_all()

    def open_handles(self) -> list[TransferHandle[Any]]:
        """Handles whose request still runs here: in flight, or a lease not yet released."""
        with self._lock:
            return list(self._handles)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def node(self) -> Node:
        """The asyncio node. It lives on :attr:`loop`: touch it only from there."""
        return self._node

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def settings(self) -> Settings:
        return self._node.settings

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Abort what is in flight (their results raise ``Unavailable``), give every lease's
        blocks back, close the node (its peers are told; it waits, bounded by the settings'
        timeouts, for writes to drain and quarantines to end) and end the loop's thread.
        Blocks until done; idempotent, from any thread but the loop's."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("close() on the sync node's own loop thread would wait for itself")
        with self._lock:
            first, self._closing = not self._closing, True
        if not first:
            self._closed.wait()
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        finally:
            self._stop_loop()
            self._closed.set()
            _log.info("sync node closed", role=self.role, node=self._node.node_id)

    async def _shutdown(self) -> None:
        handles = self.open_handles()
        if handles:
            _log.info("closing with requests in flight", role=self.role, requests=len(handles))
        # first what holds no session: leases that hold their blocks give them back, and
        # requests not paired yet (connecting, waiting for a slot) end; both at once
        first: list[asyncio.Task[None]] = []
        for h in handles:
            task = h._task
            if task is None or task.done():
                continue
            if h._let_go_at_close():
                first.append(task)
            elif h._session is None:
                h._cancel_error = Unavailable(f"rid={h.rid!r}: node closed before it began")
                task.cancel()
                first.append(task)
        if first:
            await asyncio.wait(first)
        await self._node.close()  # aborts every session ("node closing": Unavailable)
        rest: list[asyncio.Task[None]] = []
        for h in self.open_handles():  # a request whose session opened during the close
            if h._task is not None and not h._task.done():
                h._cancel_error = Unavailable(f"rid={h.rid!r}: node closed")
                h._task.cancel()
                rest.append(h._task)
        if rest:
            await asyncio.wait(rest)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cancelled(handle: TransferHandle[Any]) -> TransferAborted:
    return TransferAborted(f"rid={handle.rid!r}: cancelled")


class SyncLanguageNode(SyncNode):
    """A :class:`~emtransfer.LanguageNode` for synchronous callers (a scheduler's loop)."""

    role = "language"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        loop_factory: LoopFactory | None = None,
        **node_kwargs: Any,
    ) -> None:
        """Start the loop thread and the node in it (blocks until started; the node's errors,
        e.g. ConfigError, raise here). ``node_kwargs`` go to ``LanguageNode``; ``loop_factory``
        makes the loop (default: uvloop)."""
        super().__init__(lambda: LanguageNode(settings, **node_kwargs), loop_factory)

    @property
    def node(self) -> LanguageNode:
        assert isinstance(self._node, LanguageNode)
        return self._node

    def receive(
        self, rid: str, peer: str | Peer, expected_tokens: int | None = None
    ) -> TransferHandle[Received]:
        """Start receiving ``rid`` from the encode node at ``peer`` (an address: connected,
        or reconnected, as needed) and return its handle at once. The payload is copied out
        of the pool as rounds land: the result owns its tensors, and nothing stays held."""
        node = self.node

        async def body(h: TransferHandle[Received]) -> None:
            h._finish(await node.receive(rid, peer, expected_tokens, observer=h._observe))

        return self._submit(rid, "receive", body)

    def lease(
        self, rid: str, peer: str | Peer, expected_tokens: int | None = None
    ) -> TransferHandle[Received]:
        """Like :meth:`receive`, into one allocation that the result lends: its tensors are
        views into the pool when the payload fits consecutive blocks (``zero_copy``), valid
        until :meth:`TransferHandle.release`, which gives the blocks back."""
        node = self.node

        async def body(h: TransferHandle[Received]) -> None:
            async with node.lease(rid, peer, expected_tokens, observer=h._observe) as got:
                h._finish(got)
                await h._hold_until_released(self._closing)

        return self._submit(rid, "lease", body)

    def encode(
        self,
        rid: str,
        peer: str | Peer,
        job: dict[str, Any],
        expected_tokens: int | None = None,
    ) -> TransferHandle[Received]:
        """Ask the encode node at ``peer`` to compute ``job`` and receive the result, as
        :meth:`receive` does (the encoder's work shows as TRANSFERRING: the Init has left)."""
        node = self.node

        async def body(h: TransferHandle[Received]) -> None:
            got = await node.encode(rid, peer, job, expected_tokens, observer=h._observe)
            h._finish(got)

        return self._submit(rid, "encode", body)


class SyncEncodeNode(SyncNode):
    """An :class:`~emtransfer.EncodeNode` for synchronous callers (a scheduler's loop)."""

    role = "encode"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        loop_factory: LoopFactory | None = None,
        **node_kwargs: Any,
    ) -> None:
        """Start the loop thread and the node in it, listening (blocks until it listens).
        ``node_kwargs`` go to ``EncodeNode`` (``control``, ``encoder``, ``transport``)."""
        super().__init__(lambda: EncodeNode(settings, **node_kwargs), loop_factory)

    @property
    def node(self) -> EncodeNode:
        assert isinstance(self._node, EncodeNode)
        return self._node

    @property
    def address(self) -> str:
        """Where language nodes connect (``host:port``, or ``local://...`` in-process)."""
        return self.node.address

    def send(
        self,
        rid: str,
        tensors: Mapping[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        *,
        peer: Peer | str | None = None,
    ) -> TransferHandle[SendStats]:
        """Start pushing ``tensors`` for ``rid`` to the language node that asks for it (its
        Init may come before or after) and return the handle at once. The tensors are read on
        the loop thread until the handle is done: leave them unchanged until then. ``peer``
        says who may claim the payload, as for ``EncodeNode.send``."""
        node = self.node

        async def body(h: TransferHandle[SendStats]) -> None:
            h._finish(await node.send(rid, tensors, meta, peer=peer, observer=h._observe))

        return self._submit(rid, "send", body)


__all__ = [
    "LoopFactory",
    "SyncEncodeNode",
    "SyncLanguageNode",
    "SyncNode",
    "default_loop_factory",
]
