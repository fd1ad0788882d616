"""Helpers of the emtransfer.sync tests: running code on a sync node's loop, waiting for a
handle's progress without polling, checking that pools are full and that a shutdown left
nothing behind, and the encode process of the two-process test.

No sleeps as synchronisation and no polling loops: progress is waited for on a
``threading.Condition`` notified by the handles themselves (``Recorder``), a pool is full
once an allocation of the whole pool is granted (the allocator's FIFO wait), and a session
has ended once its task has.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import traceback
import warnings
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

import emtransfer as et
from emtransfer.runtime.node import Node
from emtransfer.sync import PollState, SyncEncodeNode, SyncNode, TransferHandle

T = TypeVar("T")
WAIT = 10.0  # seconds any single wait of these tests may take


def on(sync: SyncNode, coro: Awaitable[T], timeout: float = WAIT) -> T:
    """Run ``coro`` on the sync node's loop and return its result."""
    return asyncio.run_coroutine_threadsafe(coro, sync.loop).result(timeout)  # type: ignore[arg-type]


def call(sync: SyncNode, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` on the sync node's loop thread and return its result."""

    async def run() -> T:
        return fn(*args)

    return on(sync, run())


async def started(build: Callable[[], Any]) -> Any:
    """Build a node on the running loop and start it."""
    node = build()
    await node.start()
    return node


async def settle(node: Node, timeout: float = WAIT) -> dict[str, Any]:
    """Wait until every session of ``node`` has ended and every block is free again, and
    return the pool's state. Event-driven: the sessions' tasks, then one allocation of the
    whole pool (granted FIFO once every block, quarantined ones included, is back)."""
    sessions = [
        s for p in node.peers.values() for s in (*p.sessions.values(), *p.lingering.values())
    ]
    sessions += node._unbound_sessions()
    tasks = [s.task for s in sessions if s.task is not None and not s.task.done()]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            names = sorted(t.get_name() for t in pending)
            raise AssertionError(f"{node.role}: sessions still running after {timeout}s: {names}")
    a = node.allocator
    probe = await a.alloc(a.capacity_tokens, "pool-probe", timeout=timeout)
    a.free(probe)
    return pool_state(node)


def pool_state(node: Node) -> dict[str, Any]:
    a = node.allocator
    return {
        "free": a.num_free,
        "blocks": a.num_blocks,
        "quarantined": a.num_quarantined,
        "waiters": a.num_waiters,
        "leaks": a.leak_report(),
    }


def assert_full(state: dict[str, Any]) -> None:
    assert state["free"] == state["blocks"], state
    assert state["quarantined"] == 0 and state["waiters"] == 0 and not state["leaks"], state


class Recorder:
    """Every change a handle shows (progress observed on the loop, or its outcome), recorded
    and announced on a condition, so a test waits for a state instead of polling for it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cond = threading.Condition()
        self.seen: dict[str, list[tuple[PollState, str | None]]] = defaultdict(list)
        observe, finish = TransferHandle._observe, TransferHandle._finish

        def observed(h: TransferHandle[Any], session: Any) -> None:
            observe(h, session)
            self._record(h)

        def finished(h: TransferHandle[Any], *a: Any, **kw: Any) -> None:
            finish(h, *a, **kw)
            self._record(h)

        monkeypatch.setattr(TransferHandle, "_observe", observed)
        monkeypatch.setattr(TransferHandle, "_finish", finished)

    def _record(self, h: TransferHandle[Any]) -> None:
        with self.cond:
            self.seen[h.rid].append((h.poll(), h.protocol_state))
            self.cond.notify_all()

    def wait(
        self, h: TransferHandle[Any], cond: Callable[[TransferHandle[Any]], bool], what: str
    ) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: cond(h), WAIT):
                raise AssertionError(f"{h!r}: never {what} within {WAIT}s: {self.seen[h.rid]}")

    def wait_protocol(self, h: TransferHandle[Any], state: str) -> None:
        self.wait(h, lambda x: x.protocol_state == state or x.done(), f"in {state}")
        assert h.protocol_state == state, (h, self.seen[h.rid])

    def polls(self, rid: str) -> list[PollState]:
        with self.cond:
            return [p for p, _ in self.seen[rid]]


def assert_monotonic(states: list[PollState]) -> None:
    """Progress never goes back; FAILED (the lowest state) only ever comes last."""
    body = states[:-1] if states and states[-1] is PollState.FAILED else states
    assert PollState.FAILED not in body and body == sorted(body), states


@contextmanager
def clean_shutdown() -> Iterator[list[str]]:
    """Collect what a shutdown may leave behind: warnings (unclosed loops, coroutines never
    awaited) and error logs of asyncio ("Task was destroyed but it is pending!") or of
    emtransfer; the caller asserts the list is empty once its nodes are closed."""
    problems: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            name = record.name
            if record.levelno >= logging.ERROR or name.startswith(("asyncio", "emtransfer.sync")):
                problems.append(f"{name}: {record.getMessage()}")

    # asyncio's warnings and errors, the facade's warnings, and emtransfer's errors (blocks
    # still held at close, a session that crashed, an observer that failed)
    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger("asyncio"), logging.getLogger("emtransfer")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield problems
            gc.collect()  # an unclosed loop or a pending task warns when collected
        problems += [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def assert_stopped(sync: SyncNode) -> None:
    assert sync.closed
    assert not sync._thread.is_alive(), "the loop's thread is still running"
    assert sync.loop.is_closed()
    assert not sync.open_handles()


# ------------------------------------------------------------- the two-process test's encoder


def encode_child(conn: Any, settings: dict[str, Any]) -> None:
    """An encode process driven the way a synchronous scheduler drives it: a SyncEncodeNode,
    handles polled by a plain thread each tick. Commands over ``conn``: ``("send", specs)``
    starts a send per ``(rid, n, seed)``; ``("settle",)`` waits for every send to end, then
    for every session to end and the pool to be full (bounded), and answers with the
    outcomes, the states polled and the pool; ``("close",)`` closes the node and answers with
    what the shutdown left behind."""
    import torch
    from runtime_harness import payload

    torch.set_num_threads(1)
    try:
        with clean_shutdown() as problems:
            enc = SyncEncodeNode(et.Settings(**settings))
            conn.send(("ready", enc.address))
            handles: list[TransferHandle[Any]] = []
            outcomes: dict[str, Any] = {}
            states: dict[str, list[int]] = {}
            started = threading.Event()
            tick = threading.Event()  # never set: its wait is the scheduler's tick

            def poll_loop() -> None:
                started.wait()
                pending = list(handles)
                while pending:
                    for h in list(pending):
                        state = h.poll()
                        if not states[h.rid] or states[h.rid][-1] != state:
                            states[h.rid].append(int(state))
                        if state.finished:
                            err = h.error()
                            outcomes[h.rid] = (
                                ["ok", h.result().num_tokens]
                                if err is None
                                else [type(err).__name__, str(err)]
                            )
                            h.release()
                            pending.remove(h)
                    tick.wait(0.001)

            poller = threading.Thread(target=poll_loop, name="encode-scheduler")
            poller.start()
            hidden = settings["hidden_size"]
            while True:
                msg = conn.recv()
                if msg[0] == "send":
                    for rid, n, seed in msg[1]:
                        states[rid] = []
                        handles.append(
                            enc.send(rid, payload(seed, n, hidden), {"rid": rid, "n": n})
                        )
                    started.set()
                elif msg[0] == "settle":
                    started.set()
                    poller.join(60)
                    assert not poller.is_alive(), "the encode scheduler never saw every send end"
                    pool = on(enc, settle(enc.node), timeout=WAIT + 5)
                    conn.send(("settled", {"outcomes": outcomes, "states": states, "pool": pool}))
                elif msg[0] == "close":
                    enc.close()
                    assert_stopped(enc)
                    break
        conn.send(("closed", problems))
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise
