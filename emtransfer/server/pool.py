"""The encode nodes a language server forwards to: round-robin over those that are up; a node
whose connection fails or is lost is marked down and reconnected in the background (every
``retry_interval`` seconds), so a restarted encode node serves again without a restart here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ConfigError, PeerLost, TransferError
from ..logs import get_logger
from ..runtime import LanguageNode, Peer
from .common import HTTPFailure

log = get_logger("emtransfer.server")
T = TypeVar("T")
#: the longest wait between attempts to reach an encode node that refused our settings
CONFIG_BACKOFF_MAX = 60.0


@dataclass(eq=False)
class EncoderState:
    address: str
    peer: Peer | None = None
    error: str = "not connected yet"
    since: float = 0.0
    served: int = 0
    task: asyncio.Task[None] | None = None
    #: set once the first connection attempt ended, either way: a request that comes while
    #: it is still under way waits for it rather than finding the node "not connected yet"
    tried: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def up(self) -> bool:
        return self.peer is not None and self.peer.alive

    def describe(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "up": self.up,
            "peer": self.peer.node_id if self.up and self.peer else None,
            "error": None if self.up else self.error,
            "since": self.since,
            "served": self.served,
        }


class EncoderPool:
    def __init__(self, lang: LanguageNode, addresses: tuple[str, ...], retry_interval: float):
        self.lang = lang
        #: how long a request waits for first connection attempts still under way
        self.first_wait = lang.settings.bootstrap_timeout
        self.states = [EncoderState(a, since=time.time()) for a in addresses]
        self.retry_interval = retry_interval
        self._next = 0
        self._closing = False

    def start(self) -> None:
        for state in self.states:
            self._reconnect(state)

    async def close(self) -> None:
        self._closing = True
        tasks = [s.task for s in self.states if s.task is not None and not s.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def get(self, address: str) -> EncoderState | None:
        return next((s for s in self.states if s.address == address), None)

    def describe(self) -> list[dict[str, Any]]:
        return [s.describe() for s in self.states]

    # -- up and down ---------------------------------------------------------------------------
    def _reconnect(self, state: EncoderState) -> None:
        if not self._closing and (state.task is None or state.task.done()):
            state.task = asyncio.create_task(
                self._connect_loop(state), name=f"emtransfer:connect:{state.address}"
            )

    async def _connect_loop(self, state: EncoderState) -> None:
        delay = self.retry_interval
        while not self._closing:
            try:
                peer = await self.lang.connect(state.address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PeerLost while it is down; ConfigError on a mismatch
                error = f"{type(exc).__name__}: {exc}"
                if error != state.error:
                    level = log.info if isinstance(exc, PeerLost) else log.error
                    level("encode node unreachable", encoder=state.address, error=error)
                    state.error = error
                state.tried.set()
                # a node that is down comes back by itself: try again soon. A refusal (other
                # settings, TLS) needs someone to act: back off, up to CONFIG_BACKOFF_MAX
                if isinstance(exc, ConfigError):
                    delay = min(max(delay, self.retry_interval) * 2, CONFIG_BACKOFF_MAX)
                else:
                    delay = self.retry_interval
                await self._pause(delay)
                continue
            state.peer, state.error, state.since = peer, "", time.time()
            state.tried.set()
            log.info("encode node up", encoder=state.address, peer=peer.node_id)
            if peer.reader is not None:  # the reader ends when the peer is lost, for any reason
                peer.reader.add_done_callback(self._on_reader_done(state, peer))
            return

    async def _pause(self, delay: float) -> None:
        await asyncio.sleep(delay)  # back off before the next attempt, not a sync point

    def _on_reader_done(self, state: EncoderState, peer: Peer) -> Callable[[Any], None]:
        return lambda _task: self._lost(state, peer)

    def _lost(self, state: EncoderState, peer: Peer, reason: str = "connection lost") -> None:
        if state.peer is not peer or self._closing:
            return
        state.peer, state.error, state.since = None, reason, time.time()
        log.warning("encode node down", encoder=state.address, reason=reason)
        self._reconnect(state)

    def candidates(self) -> list[EncoderState]:
        """The encode nodes that are up, in round-robin order."""
        n = len(self.states)
        start, self._next = self._next, (self._next + 1) % n
        order = [self.states[(start + i) % n] for i in range(n)]
        for s in order:
            if s.peer is not None and not s.peer.alive:
                self._lost(s, s.peer)
        return [s for s in order if s.up]

    async def _first_attempts(self) -> list[EncoderState]:
        """None is up: wait (bounded by ``bootstrap_timeout``) for the first connection
        attempts still under way; the candidates once one succeeds or all have ended."""
        pending = [s for s in self.states if not s.tried.is_set()]
        if not pending:
            return []
        waits = {asyncio.ensure_future(s.tried.wait()) for s in pending}
        deadline = asyncio.get_running_loop().time() + self.first_wait
        try:
            while waits:
                timeout = deadline - asyncio.get_running_loop().time()
                done, waits = await asyncio.wait(
                    waits, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED
                )
                if not done or any(s.up for s in self.states):
                    break
        finally:
            for w in waits:
                w.cancel()
        return self.candidates()

    # -- forwarding ----------------------------------------------------------------------------
    async def run(self, call: Callable[[Peer], Awaitable[T]]) -> tuple[EncoderState, T]:
        """``call(peer)`` on the next encode node that is up; a node lost during the call is
        marked down and the next one is tried. 503 when none is left."""
        problems: list[str] = []
        candidates = self.candidates()
        if not candidates:
            candidates = await self._first_attempts()
        for state in candidates:
            peer = state.peer
            if peer is None or not peer.alive:
                continue
            try:
                result = await call(peer)
            except TransferError as exc:
                # PeerLost, or any failure the peer's death caused (data that never landed)
                if not isinstance(exc, PeerLost) and peer.alive:
                    raise
                self._lost(state, peer, f"lost during a request: {exc}")
                problems.append(f"{state.address}: {exc}")
                continue
            state.served += 1
            return state, result
        down = [f"{s.address} ({s.error})" for s in self.states if not s.up]
        detail = "no encode node reachable"
        if problems:
            detail += "; lost during this request: " + "; ".join(problems)
        if down:
            detail += "; down: " + ", ".join(down)
        log.warning("request failed", status=503, error=detail)
        raise HTTPFailure(503, "unavailable", detail)
