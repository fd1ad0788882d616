"""The per-request coroutine: one event queue, one deadline per state, actions executed.

A session owns exactly one protocol machine. Everything that happens to the request --
a message from the peer, an allocation granted, a write completed, a deadline, the caller
giving up -- becomes an event on its queue, and only this coroutine feeds the machine. The
subclasses (sender, receiver) execute the actions that are specific to their side.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from ..allocator import Allocation, BlockAllocator
from ..buffers import BufferRegistry
from ..errors import ProtocolError, TransferError, kind_of
from ..protocol import events as ev
from ..protocol.machine import GRANT_EXPIRY, Machine
from ..settings import Settings
from ..transport import Transport
from .metrics import Metrics

if TYPE_CHECKING:
    from .node import Peer


class SessionHost(Protocol):
    """What a session needs of its node: the pool, the engine, the metrics, and two calls."""

    settings: Settings
    allocator: BlockAllocator
    registry: BufferRegistry
    transport: Transport
    metrics: Metrics
    executor: ThreadPoolExecutor
    log: Any
    #: bytes of one token across every field
    token_nbytes: int

    def session_ended(self, session: Session) -> None:
        """The session's coroutine has ended (after its last action)."""

    async def tear_down(self, peer: Peer, reason: str) -> None:
        """Drop ``peer``'s connection and fail its requests."""

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference to it."""

    def release_at(self, when: float, allocation: Allocation) -> None:
        """Release the quarantined ``allocation`` at loop time ``when`` (or at close)."""


class _Mailbox:
    """A session's event queue: what ``asyncio.Queue`` does for one consumer, without its
    locks, events and per-call loop look-ups (a session feeds and takes several items per
    request: this is on every request's path)."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque[object] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: object) -> None:
        self._items.append(item)
        self._wake()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def put_first(self, item: object) -> None:
        """Queue ``item`` ahead of everything queued (the rest of a step begun inline)."""
        self._items.appendleft(item)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> object:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> object:
        while not self._items:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()


class _Granted:
    """An allocation task finished; ``token`` tells a current grant from a stale one."""

    __slots__ = ("allocation", "token")

    def __init__(self, token: object, allocation: Allocation) -> None:
        self.token = token
        self.allocation = allocation


class _Expired:
    """The deadline of the state armed with ``token`` passed (stale once the state changed)."""

    __slots__ = ("token",)

    def __init__(self, token: object) -> None:
        self.token = token


#: wakes a parked session after a step taken on a feeder's turn, so that it arms the deadline
#: of the state that step reached (its token is no session's: it is never a Timeout)
_WAKE = _Expired(object())


class _Resume:
    """The rest of a step begun on a feeder's turn (:meth:`Session.step_now`) that had to wait:
    the session's task drives it to its end before it takes anything else from its queue. What
    the task is resumed with (a result, a future's exception, a cancel) goes on to the step."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Any, pending: Any) -> None:
        self.coro = coro
        self.pending = pending  # what the step yielded: the future it waits for (or None)

    def __await__(self) -> Generator[Any, None, None]:
        coro, pending = self.coro, self.pending
        while True:
            try:
                yield pending
            except BaseException as exc:  # the future failed, or the task was cancelled
                try:
                    pending = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                pending = coro.send(None)
            except StopIteration:
                return


class _Raise:
    """A step begun on a feeder's turn raised (a bug): the task ends the request as if it
    had raised there."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


#: told about a session (on the node's loop) when it is watched and after every change of its
#: machine's state, once that state's actions ran; see :meth:`Session.watch`
StateObserver = Callable[["Session"], None]


class Session:
    """Drives one request's machine on one node."""

    #: states in which an allocation may be outstanding
    ALLOC_STATES: frozenset[Any] = frozenset()
    _alloc_states: tuple[Any, ...] = ()

    def __init__(self, node: SessionHost, machine: Machine[Any], peer: Peer | None) -> None:
        self.node = node
        self.machine = machine
        self.peer = peer
        self.rid = machine.rid
        self.settings = node.settings
        self._loop = loop = asyncio.get_running_loop()
        self.queue = _Mailbox(loop)
        self.result: asyncio.Future[Any] = loop.create_future()
        #: what the caller awaits (see :meth:`outcome`): set with ``result``
        self._waiter: asyncio.Future[Any] | None = None
        self.task: asyncio.Task[None] | None = None
        self._log: Any = None  # node.log bound to the rid, made when first needed
        self.t_start = time.perf_counter()
        self.alloc_wait_s = 0.0
        self._alloc_token: object | None = None
        self._alloc_task: asyncio.Task[None] | None = None
        self._error_override: TransferError | None = None
        self._deadline_token: object | None = None
        self._observer: StateObserver | None = None
        self._inline = False  # a step runs on a feeder's turn right now
        self._ended = False  # _finish ran

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._alloc_states = tuple(cls.ALLOC_STATES)  # by identity: no Enum.__hash__ per step

    @property
    def log(self) -> Any:
        """The node's log, bound to this request's rid (most requests never log)."""
        log = self._log
        if log is None:
            log = self._log = self.node.log.bind(rid=self.rid)
        return log

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, event: object) -> None:
        self.queue.put_nowait(event)

    def step_now(self, item: object) -> bool:
        """Take ``item`` on the caller's turn rather than on the session's next one: the peer
        hears the outcome (an Init, a write) without waiting for the loop to come round to this
        session, which can be long when many requests are in flight. Only while the session is
        parked on an empty queue (it would take ``item`` next anyway) and on the node's loop;
        False, nothing done, otherwise: then :meth:`feed` it. What the step queues is taken
        too; if it has to wait, the session's task finishes it before anything else."""
        queue = self.queue
        waiter = queue._waiter
        if self._inline or queue._items or waiter is None or waiter.done():
            return False
        self.run_now(item)
        if not queue._items:
            queue.put_nowait(_WAKE)  # the task arms the new state's deadline, or ends
        return True

    def run_now(self, item: object) -> None:
        """Step ``item``, and what that queues, on the caller's turn (see :meth:`step_now`;
        before :meth:`start`, the first event of the request)."""
        queue = self.queue
        self._inline = True
        try:
            while True:
                coro = self.step(item)
                try:
                    pending = coro.send(None)
                except StopIteration:
                    pass
                except Exception as exc:  # a bug: the task ends the request
                    queue.put_first(_Raise(exc))
                    return
                else:  # it waits: the task resumes it first
                    queue.put_first(_Resume(coro, pending))
                    return
                if self._loop_done():  # ended here: cleaned up before the caller wakes
                    self._finish()
                    return
                if not queue._items:
                    return
                item = queue.get_nowait()
        finally:
            self._inline = False

    async def own_task(self) -> None:
        """Move a step begun on a feeder's turn into this session's task: call it before
        awaiting anything bound to the running task (``asyncio.timeout``, an engine's waits
        that may time out), which would otherwise be bound to the feeder's."""
        if asyncio.current_task() is not self.task:
            await asyncio.sleep(0)  # the step yields here; the task resumes it (_Resume)

    def watch(self, observer: StateObserver | None) -> None:
        """Follow the request from outside its coroutine (``emtransfer.sync``): ``observer`` is
        called with this session now, and after every change of its machine's state once that
        state's actions ran, always on the node's loop. An observer that raises is dropped."""
        self._observer = observer
        self._notify()

    def _notify(self) -> None:
        observer = self._observer
        if observer is None:
            return
        try:
            observer(self)
        except Exception:  # a broken observer must not break the request it watches
            self._observer = None
            self.log.exception("state observer failed; dropped")

    def abort(self, reason: str) -> bool:
        """Give the request up on behalf of its caller, as a cancelled caller does: the machine
        takes it as a LocalAbort (the peer is told, blocks are freed or quarantined) and the
        result fails with :class:`TransferAborted`. False once the session no longer runs."""
        if not self.running:
            return False
        self.feed(ev.LocalAbort(reason))
        return True

    def start(self) -> None:
        self.task = self._loop.create_task(self._run(), name=f"emtransfer:{self.rid}")

    def outcome(self) -> asyncio.Future[Any]:
        """What the request's one caller awaits for the result: ``result`` itself once it is
        done, else a future of the caller's own that the session completes along with
        ``result``. A cancelled caller cancels only that one, as with
        ``asyncio.shield(result)``, but its wake-up costs one hop of the loop, not two."""
        if self.result.done():
            return self.result
        if self._waiter is None or self._waiter.done():
            self._waiter = self._loop.create_future()
        return self._waiter

    @property
    def running(self) -> bool:
        """True while the coroutine drives the machine (not once it has handed back a result)."""
        return self.task is not None and not self.task.done()

    def _loop_done(self) -> bool:
        return self.machine.finished

    async def _run(self) -> None:
        m = self.machine
        loop = self._loop
        queue = self.queue
        phase: object = None
        timer: asyncio.TimerHandle | None = None
        when: float | None = None  # the current state's deadline (loop time), if it has one
        token: object = None
        try:
            while not self._loop_done():
                if m.phase != phase:  # one deadline per state (phase), not one per event
                    phase = m.phase
                    if timer is not None:
                        timer.cancel()
                        timer = None
                    self._deadline_token = token = object()
                    name = m.timeout_name
                    when = None
                    if name is not None:
                        when = (
                            self.grant_expiry()
                            if name == GRANT_EXPIRY
                            else loop.time() + getattr(self.settings, name)
                        )
                if not queue._items:
                    # the timer is armed only when the session would wait: a state left on
                    # the items already queued never needed one (its deadline is the same)
                    if when is not None and timer is None:
                        timer = loop.call_at(when, queue.put_nowait, _Expired(token))
                    item = await queue.get()
                else:
                    if when is not None and timer is None and loop.time() >= when:
                        timer = loop.call_at(when, queue.put_nowait, _Expired(token))
                    item = queue.get_nowait()
                await self.step(item)
        except Exception as exc:  # a bug: end the request cleanly rather than leak or hang
            self.log.exception("session crashed", state=m.state.name)
            await self._crash_cleanup()
            self._set_error(exc if isinstance(exc, TransferError) else TransferError(repr(exc)))
        finally:
            if timer is not None:
                timer.cancel()
            self._finish()

    def _finish(self) -> None:
        """The session's end, once: what it still holds goes back and the node forgets it,
        before its caller wakes to the result (a retry of the rid must not find it)."""
        if self._ended:
            return
        self._ended = True
        self._cancel_alloc()
        self._drop_stale_grants()
        self._cleanup()
        self.node.session_ended(self)

    def _cleanup(self) -> None:
        """Release what the subclass holds beyond the machine's own allocations."""

    def _release_grant(self, allocation: Allocation) -> None:
        """Give back an allocation granted to the machine that it will not use."""
        self.node.allocator.free(allocation)

    def _drop_stale_grants(self) -> None:
        """Free grants still queued behind the event that ended the request."""
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if isinstance(item, _Granted):
                self._release_grant(item.allocation)

    async def step(self, item: object) -> None:
        """Turn one queue item into a machine event and execute the resulting actions."""
        event = item if isinstance(item, ev.Event) else await self._to_event(item)
        if event is None:
            return
        m = self.machine
        before = m.state
        try:
            actions = m.handle(event)
        except ProtocolError as exc:
            if not self._is_remote(event):
                raise
            # the peer sent something that is invalid in this state: end the request
            self.log.warning("protocol violation by peer", error=str(exc), state=before.name)
            self._error_override = exc
            actions = m.handle(ev.LocalAbort(f"protocol error: {exc}"))
        if self.node.log.logger.isEnabledFor(logging.DEBUG):  # fields cost even when filtered
            self.log.debug(
                "transition", frm=before.name, to=m.state.name, trigger=type(event).__name__
            )
        if m.state not in self._alloc_states and (
            self._alloc_token is not None or self._alloc_task is not None
        ):
            self._cancel_alloc()
        for action in actions:
            await self._execute(action)
        if m.state is not before and self._observer is not None:
            self._notify()

    @staticmethod
    def _is_remote(event: ev.Event) -> bool:
        return isinstance(
            event,
            ev.InitReceived
            | ev.TotalReceived
            | ev.ResumeReceived
            | ev.ChunkReceived
            | ev.AbortReceived
            | ev.AbortAckReceived,
        )

    async def _to_event(self, item: object) -> ev.Event | None:
        if isinstance(item, _Resume):  # the rest of a step begun inline: its end is the step's
            await item
            return None
        if isinstance(item, _Raise):
            raise item.exc
        if isinstance(item, _Expired):  # a deadline of a state left since: nothing happened
            return ev.Timeout() if item.token is self._deadline_token else None
        if isinstance(item, _Granted):
            if item.token is not self._alloc_token:
                self._release_grant(item.allocation)  # stale: the machine moved on
                return None
            self._alloc_token = None
            self._alloc_task = None
            return self._granted(item.allocation)
        assert isinstance(item, ev.Event)
        return item

    # -- allocation ----------------------------------------------------------------------------
    def _start_alloc(self, action: ev.Alloc) -> None:
        token = object()
        self._alloc_token = token
        t0 = time.perf_counter()
        try:  # the common case: blocks are free and nobody queues, no task needed
            now = self.node.allocator.try_alloc(
                action.num_tokens, self.rid, min_tokens=action.min_tokens
            )
        except TransferError as exc:  # can never fit: end the request with that error
            self._error_override = exc
            self.feed(ev.LocalAbort(str(exc), kind_of(exc)))
            return
        if now is not None:
            self.feed(_Granted(token, now))
            return

        async def alloc() -> None:
            try:
                a = await self.node.allocator.alloc(
                    action.num_tokens, self.rid, timeout=None, min_tokens=action.min_tokens
                )
            except TransferError as exc:  # can never fit: end the request with that error
                self._error_override = exc
                self.feed(ev.LocalAbort(str(exc), kind_of(exc)))
                return
            waited = time.perf_counter() - t0
            self.alloc_wait_s += waited
            self.node.metrics.alloc_wait.observe(waited)
            self.feed(_Granted(token, a))

        self._alloc_task = asyncio.create_task(alloc())

    def _cancel_alloc(self) -> None:
        self._alloc_token = None
        if self._alloc_task is not None:
            self._alloc_task.cancel()  # a grant racing the cancel is freed as stale
            self._alloc_task = None

    # -- results -------------------------------------------------------------------------------
    def _set_result(self, value: Any) -> None:
        if not self.result.done():
            self.result.set_result(value)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(value)

    def _set_error(self, error: BaseException) -> None:
        if self._error_override is not None:
            error, self._error_override = self._error_override, None
        if not self.result.done():
            self.result.set_exception(error)
            self.result.exception()  # mark retrieved: a caller that left must not warn
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                waiter.exception()
        reason = type(error).__name__
        self.node.metrics.failed(error)
        # a peer breaking the rules is worth a warning; timeouts and aborts are routine
        log = self.log.warning if isinstance(error, ProtocolError) else self.log.info
        log("request failed", error=str(error), reason=reason)

    # -- subclass hooks ------------------------------------------------------------------------
    def grant_expiry(self) -> float:
        """The loop time at which the current grant can no longer receive a write."""
        raise NotImplementedError

    def _granted(self, allocation: Allocation) -> ev.Event:
        raise NotImplementedError

    async def _execute(self, action: ev.Action) -> None:
        raise NotImplementedError

    async def _crash_cleanup(self) -> None:
        raise NotImplementedError
