"""One request started from a thread without an event loop, and what that thread may ask of it.

Every method may be called from any thread, and none waits except :meth:`TransferHandle.result`.
The handle's fields are written on the node's loop thread (progress, outcome) and read by the
caller's threads: a ``PollState`` attribute read, or a ``threading.Event``. Requests to the
loop (abort, release) travel by ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ..errors import InvalidRequest, TransferAborted, TransferError
from .states import PollState, progress, sglang_mm_status

if TYPE_CHECKING:
    from ..runtime.session import Session
    from .nodes import SyncNode

T = TypeVar("T")
#: what the handle runs: a receive (copied out), a lease (views into the pool, held until
#: release), an encode job and its receive, or a send
Kind = Literal["receive", "lease", "encode", "send"]


class TransferHandle(Generic[T]):
    """A request in flight on a :class:`~emtransfer.sync.SyncLanguageNode` or
    :class:`~emtransfer.sync.SyncEncodeNode`; ``T`` is ``Received`` or ``SendStats``."""

    def __init__(self, owner: SyncNode, rid: str, kind: Kind) -> None:
        self.rid = rid
        self.kind: Kind = kind
        self._owner = owner
        self._state = PollState.BOOTSTRAPPING
        self._protocol_state: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._abort_asked = False
        self._released = False
        # the loop thread's side
        self._task: asyncio.Task[None] | None = None
        self._session: Session | None = None
        self._cancel_error: TransferError | None = None
        self._let_go: asyncio.Event | None = None  # a lease that holds its blocks waits on it

    # -- the caller's side (any thread, never waits but result()) ---------------------------
    def poll(self) -> PollState:
        """Where the request stands now (never waits). Only moves forward; SUCCESS and FAILED
        are final, and once either shows, :meth:`result` returns or raises at once."""
        return self._state

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def protocol_state(self) -> str | None:
        """The name of the protocol machine's state as last observed (None before the
        request's session opened), for logs and diagnostics."""
        return self._protocol_state

    def result(self, timeout: float | None = None) -> T:
        """Wait until the request ends (at most ``timeout`` seconds) and return its result:
        ``Received`` (receive, lease, encode) or ``SendStats`` (send). Raises the request's
        typed error (a :class:`~emtransfer.errors.TransferError`: TransferTimeout, PeerLost,
        TransferAborted, ...). When ``timeout`` passes first it raises the builtin
        ``TimeoutError`` (not TransferTimeout, which only the runtime raises): the request
        goes on, and may still be polled, waited for or aborted."""
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"rid={self.rid!r}: still {self._state.name} after waiting {timeout}s "
                "(the request goes on: poll, wait again or abort it)"
            )
        if self._error is not None:
            raise _fresh(self._error) from self._error.__cause__
        with self._lock:
            if self._released:
                raise InvalidRequest(f"rid={self.rid!r}: released; its result is gone")
            return self._value  # type: ignore[return-value]  # done without error: set

    def error(self) -> BaseException | None:
        """The error the request ended with; None while in flight or after a success."""
        return self._error if self._done.is_set() else None

    def abort(self, reason: str = "aborted by the caller") -> bool:
        """Give the request up (never waits): the runtime aborts it as it aborts a cancelled
        call (the peer is told, blocks are freed or quarantined until nothing can land), and
        :meth:`result` raises :class:`~emtransfer.errors.TransferAborted`. False when it had
        already ended. An abort racing the last round may lose: poll() says which won."""
        with self._lock:
            if self._done.is_set():
                return False
            first, self._abort_asked = not self._abort_asked, True
        if first:
            self._owner._post(self._abort_on_loop, reason)
        return True

    def release(self) -> None:
        """Done with the request (never waits; idempotent, from any thread, in any state): a
        request in flight is aborted; a lease's blocks go back to the pool (its views must no
        longer be used); the handle drops its result. Call it once per handle."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._value = None
        self._owner._post(self._release_on_loop)

    def sglang_kvpoll(self) -> int:
        """The state as SGLang's ``KVPoll`` (Failed 0 ... Success 4)."""
        return self._state.sglang_kvpoll()

    def sglang_mm_status(self) -> int:
        """The state as SGLang's encoder-receiver status: PENDING 0, SUCCESS 1, FAIL -1,
        TIMEOUT -2 (a TransferTimeout)."""
        state = self._state
        return sglang_mm_status(state, self.error())

    def __repr__(self) -> str:
        return (
            f"<TransferHandle {self.kind} rid={self.rid!r} {self._state.name}"
            f" protocol={self._protocol_state}>"
        )

    # -- the loop thread's side ---------------------------------------------------------------
    def _observe(self, session: Session) -> None:
        """The runtime's state observer (Session.watch): progress from the machine's state."""
        self._session = session
        state = session.machine.state
        self._protocol_state = state.name
        shown = progress(state)
        if shown is not None and shown > self._state and not self._done.is_set():
            self._state = shown
            self._owner._changed()

    def _finish(self, value: Any = None, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        with self._lock:
            if error is not None:
                self._error = error.with_traceback(None)  # its frames would hold the request
            elif not self._released:
                self._value = value
        self._session = None  # ended: the handle keeps nothing of the request's session
        self._done.set()  # before the state: a final poll() implies a result() that won't wait
        self._state = PollState.FAILED if error is not None else PollState.SUCCESS
        self._owner._changed()

    def _abort_on_loop(self, reason: str) -> None:
        if self._done.is_set():
            return
        if self._session is not None:
            self._session.abort(reason)  # False: it just ended, and its outcome stands
        elif self._task is not None and not self._task.done():
            # not paired yet (connecting, waiting for a slot): nothing of it runs to abort
            self._cancel_error = TransferAborted(f"rid={self.rid!r}: {reason} (before it began)")
            self._task.cancel()

    def _release_on_loop(self) -> None:
        if not self._done.is_set():
            self._abort_on_loop("released by the caller")
        if self._let_go is not None:
            self._let_go.set()

    def _let_go_at_close(self) -> bool:
        """The node closes: a lease holding its blocks gives them back (and its views, which
        would outlive the pool, are dropped). False for any other handle."""
        if self._let_go is None:
            return False
        with self._lock:
            self._released = True
            self._value = None
        self._let_go.set()
        return True

    async def _hold_until_released(self, closing: bool) -> None:
        """A lease's body: keep the blocks until release() (or the node's close)."""
        self._let_go = asyncio.Event()
        if closing:  # it completed while the node closes: nothing to lend any more
            self._let_go_at_close()
        elif not self._released:
            await self._let_go.wait()


def _fresh(error: BaseException) -> BaseException:
    """A copy of ``error`` to raise in a caller's thread: raising the stored one would grow
    its traceback with every caller's frames."""
    try:
        return copy.copy(error)
    except Exception:  # an exception type that does not copy: raise the original
        return error
