"""A graceful shutdown: on SIGTERM (or SIGINT) the server stops taking work, lets the open
requests finish for ``--shutdown-timeout`` seconds, answers those still open at the deadline
with 503 JSON, and only then lets uvicorn close the connections and the node.

While it drains: ``/health`` answers 503 (the node is not ready), new requests answer 503
``{"error": "unavailable", "detail": "shutting down"}``, the probes and ``/metrics`` still
answer.
"""

from __future__ import annotations

import asyncio
import signal
from types import FrameType
from typing import Any

import uvicorn
from fastapi.responses import JSONResponse

from ..logs import get_logger

log = get_logger("emtransfer.server")

#: answered during the drain, even to requests that come with no Authorization
PROBES = frozenset({"/health", "/live", "/metrics", "/version"})


class Drain:
    """The open requests of one server, and the shutdown that waits for them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.draining = False
        self.open: set[asyncio.Task[Any]] = set()
        self._cut = asyncio.Event()

    def cut_short(self) -> None:
        """End the wait now (a second signal): what is open is answered 503 at once."""
        self._cut.set()

    async def run(self) -> None:
        """Stop taking requests; wait for the open ones up to ``timeout`` (or until
        :meth:`cut_short`); cancel the rest (each answered 503 by :class:`DrainGate`)."""
        self.draining = True
        log.info("draining", requests=len(self.open), timeout_s=self.timeout)
        if self.open:  # no request joins them: new ones are refused from now on
            waits = {
                asyncio.ensure_future(asyncio.wait(set(self.open))),
                asyncio.ensure_future(self._cut.wait()),
            }
            await asyncio.wait(waits, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()  # the waits, not the requests
        left = [t for t in self.open if not t.done()]
        if left:
            why = "second signal" if self._cut.is_set() else "deadline"
            log.warning("drain cut short", requests=len(left), by=why, timeout_s=self.timeout)
            for task in left:
                task.cancel("shutting down")
            await asyncio.wait(left)
        else:
            log.info("drained")


class DrainGate:
    """ASGI middleware: runs each request as a task :class:`Drain` can wait for or cancel."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self._unavailable("shutting down")(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, send_tracking))
        self.drain.open.add(task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # uvicorn gave up on us
                task.cancel()
                raise
            if not task.cancelled():
                raise  # the app itself raised CancelledError: not ours to answer
            if not started:
                detail = (
                    "shutting down: the request was still open when the drain ended "
                    f"(--shutdown-timeout={self.drain.timeout:g}s)"
                )
                await self._unavailable(detail)(scope, receive, send)
        finally:
            self.drain.open.discard(task)

    @staticmethod
    def _unavailable(detail: str) -> JSONResponse:
        from .common import HTTPFailure, error_response  # common installs this middleware

        return error_response(HTTPFailure(503, "unavailable", detail))


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM or SIGINT drains before it exits."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._draining: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or sig not in _DRAIN_SIGNALS:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._on_signal)

    def _on_signal(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())
        else:  # a second signal: what is still open is answered now
            self.drain.cut_short()

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True


_DRAIN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
