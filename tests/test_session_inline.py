"""A session takes an item on its feeder's turn (``Session.step_now``) only while it is parked
on an empty queue, and then behaves as if its own task had taken it: the new state's deadline
is armed, a step that has to wait is finished by the task before anything queued after it, a
step that raises ends the request as a crash in the task does, a request that ends there is
cleaned up before its caller wakes, and what is bound to the running task (``own_task``) runs
in the session's task. A toy machine drives the generic session, so every path is reachable."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers_runtime import make_settings, wait_until

from emtransfer.errors import TransferError
from emtransfer.logs import get_logger
from emtransfer.protocol import events as ev
from emtransfer.protocol.machine import Machine, StateEnum
from emtransfer.runtime.session import Session


class St(StateEnum):
    IDLE = "idle"
    WAIT = "wait"
    DONE = "done"


@dataclass(frozen=True)
class Do(ev.Event):
    """Move to ``to`` and execute ``actions``."""

    to: St
    actions: tuple[Any, ...] = ()


def _do(m: Any, e: Do) -> tuple[St, list[Any]]:
    return e.to, list(e.actions)


def _timeout(m: Any, e: ev.Timeout) -> tuple[St, list[Any]]:
    return St.DONE, [("record", "timeout"), ("result", "timed out")]


class Toy(Machine[St]):
    ROLE = "toy"
    TRANSITIONS = {
        **{(s, Do): (_do, frozenset(St)) for s in (St.IDLE, St.WAIT)},
        (St.WAIT, ev.Timeout): (_timeout, frozenset({St.DONE})),
    }
    TIMEOUTS = {St.WAIT: "chunk_timeout"}
    TERMINAL = frozenset({St.DONE})
    UNKNOWN: dict[type[ev.Event], Any] = {}


class _Metrics:
    def failed(self, error: BaseException) -> None:
        pass


@dataclass
class Host:
    """What a session needs of its node, and what it did to it."""

    settings: Any
    log: Any = field(default_factory=lambda: get_logger("emtransfer.test"))
    metrics: Any = field(default_factory=_Metrics)
    ended: list[Session] = field(default_factory=list)

    def session_ended(self, session: Session) -> None:
        self.ended.append(session)


class ToySession(Session):
    def __init__(self, host: Host) -> None:
        super().__init__(host, Toy("r1", St.IDLE), None)  # type: ignore[arg-type]
        self.record: list[Any] = []

    def grant_expiry(self) -> float:
        return float("inf")

    async def _execute(self, action: Any) -> None:
        kind, arg = action
        if kind == "record":
            self.record.append(arg)
        elif kind == "park":  # wait for a future, then note that the step went on
            try:
                await arg
            except asyncio.CancelledError:
                self.record.append("cancelled")
                raise
            self.record.append("resumed")
        elif kind == "own":  # what asyncio.timeout would bind: the running task
            await self.own_task()
            self.record.append(asyncio.current_task() is self.task)
        elif kind == "feed":
            self.feed(arg)
        elif kind == "nested":  # a step that feeds its own session on the same turn
            self.record.append(self.step_now(arg))
            self.feed(arg)
        elif kind == "boom":
            raise RuntimeError("step exploded")
        elif kind == "result":
            self._set_result(arg)

    async def _crash_cleanup(self) -> None:
        self.record.append("crash cleanup")


async def parked(chunk_timeout: float = 30.0) -> tuple[Host, ToySession]:
    host = Host(make_settings(chunk_timeout=chunk_timeout))
    session = ToySession(host)
    session.start()
    await wait_until(lambda: session.queue._waiter is not None, 5, "the session to park")
    return host, session


@pytest.mark.timeout(10)
async def test_a_parked_session_takes_the_item_now_and_arms_the_new_states_deadline() -> None:
    host, s = await parked(chunk_timeout=0.05)
    assert s.step_now(Do(St.WAIT, (("record", "now"),)))
    assert s.record == ["now"]  # on this turn, before any yield to the loop
    assert s.machine.state is St.WAIT
    # the task woke for the new state: its deadline fires although nothing else is fed
    assert await asyncio.wait_for(s.outcome(), 5) == "timed out"
    assert s.record == ["now", "timeout"]
    await asyncio.wait_for(s.task, 5)  # type: ignore[arg-type]
    assert host.ended == [s]


@pytest.mark.timeout(10)
async def test_not_taken_unless_parked_on_an_empty_queue() -> None:
    host = Host(make_settings())
    s = ToySession(host)
    assert not s.step_now(Do(St.WAIT))  # not started: nobody waits for mail
    _, s = await parked()
    s.feed(Do(St.WAIT, (("record", "queued"),)))
    assert not s.step_now(Do(St.WAIT, (("record", "second"),)))  # behind the queued item
    assert s.record == []
    s.feed(Do(St.DONE, (("result", 1),)))
    assert await asyncio.wait_for(s.outcome(), 5) == 1
    assert s.record == ["queued"]


@pytest.mark.timeout(10)
async def test_what_the_step_queues_is_taken_on_the_same_turn() -> None:
    _, s = await parked()
    follow = Do(St.WAIT, (("record", "second"),))
    assert s.step_now(Do(St.WAIT, (("record", "first"), ("feed", follow))))
    assert s.record == ["first", "second"]


@pytest.mark.timeout(10)
async def test_a_step_that_waits_is_finished_by_the_task_before_what_came_after() -> None:
    _, s = await parked()
    fut = asyncio.get_running_loop().create_future()
    assert s.step_now(Do(St.WAIT, (("park", fut), ("own", None), ("record", "end of step"))))
    assert s.record == []
    s.feed(Do(St.WAIT, (("record", "next item"),)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert s.record == []  # the step still waits; the next item waits behind it
    fut.set_result(None)
    s.feed(Do(St.DONE, (("result", "ok"),)))
    assert await asyncio.wait_for(s.outcome(), 5) == "ok"
    # the rest of the step ran in the session's own task, then the items in their order
    assert s.record == ["resumed", True, "end of step", "next item"]


@pytest.mark.timeout(10)
async def test_own_task_moves_a_step_begun_inline_into_the_sessions_task() -> None:
    _, s = await parked()
    assert s.step_now(Do(St.WAIT, (("own", None),)))
    assert s.record == []  # it yielded at own_task: the task resumes it
    s.feed(Do(St.DONE, (("result", 0),)))
    await asyncio.wait_for(s.outcome(), 5)
    assert s.record == [True]


@pytest.mark.timeout(10)
async def test_a_cancel_reaches_the_step_the_task_resumed() -> None:
    host, s = await parked()
    fut = asyncio.get_running_loop().create_future()
    assert s.step_now(Do(St.WAIT, (("park", fut),)))
    await wait_until(lambda: not fut.done() and s.queue.empty(), 5, "the task to resume the step")
    assert s.task is not None
    s.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(s.task, 5)
    assert fut.cancelled()
    assert s.record == ["cancelled"]
    assert host.ended == [s]  # the session's end ran all the same


@pytest.mark.timeout(10)
async def test_a_step_that_raises_ends_the_request_as_a_crash_in_its_task_does() -> None:
    host, s = await parked()
    assert s.step_now(Do(St.WAIT, (("boom", None),)))
    with pytest.raises(TransferError, match="step exploded"):
        await asyncio.wait_for(s.outcome(), 5)
    await asyncio.wait_for(s.task, 5)  # type: ignore[arg-type]
    assert s.record == ["crash cleanup"]
    assert host.ended == [s]


@pytest.mark.timeout(10)
async def test_a_request_ended_inline_is_cleaned_up_before_its_caller_wakes() -> None:
    host, s = await parked()
    waiter = s.outcome()
    assert s.step_now(Do(St.DONE, (("result", "done"),)))
    assert host.ended == [s]  # on this turn: a retry of the rid finds it gone
    assert await asyncio.wait_for(waiter, 5) == "done"
    await asyncio.wait_for(s.task, 5)  # type: ignore[arg-type]
    assert host.ended == [s]  # once, although the task ran its end too
    assert not s.step_now(Do(St.WAIT))


@pytest.mark.timeout(10)
async def test_run_now_takes_the_first_event_before_the_task_starts() -> None:
    host = Host(make_settings(chunk_timeout=0.05))
    s = ToySession(host)
    s.run_now(Do(St.WAIT, (("record", "first"),)))
    assert s.record == ["first"] and s.task is None
    s.start()
    assert await asyncio.wait_for(s.outcome(), 5) == "timed out"  # WAIT's deadline was armed


@pytest.mark.timeout(10)
async def test_what_a_step_queued_before_it_waited_comes_after_the_rest_of_the_step() -> None:
    _, s = await parked()
    fut = asyncio.get_running_loop().create_future()
    fed = Do(St.WAIT, (("record", "fed by the step"),))
    assert s.step_now(Do(St.WAIT, (("feed", fed), ("park", fut), ("record", "end of step"))))
    fut.set_result(None)
    s.feed(Do(St.DONE, (("result", "ok"),)))
    await asyncio.wait_for(s.outcome(), 5)
    assert s.record == ["resumed", "end of step", "fed by the step"]


@pytest.mark.timeout(10)
async def test_a_step_that_raises_after_queueing_crashes_before_that_item_is_taken() -> None:
    _, s = await parked()
    fed = Do(St.WAIT, (("record", "fed by the step"),))
    assert s.step_now(Do(St.WAIT, (("feed", fed), ("boom", None))))
    with pytest.raises(TransferError, match="step exploded"):
        await asyncio.wait_for(s.outcome(), 5)
    await asyncio.wait_for(s.task, 5)  # type: ignore[arg-type]
    assert s.record == ["crash cleanup"]


@pytest.mark.timeout(10)
async def test_a_step_never_runs_inside_another_step() -> None:
    _, s = await parked()
    inner = Do(St.WAIT, (("record", "inner"),))
    assert s.step_now(Do(St.WAIT, (("nested", inner), ("record", "outer"))))
    assert s.record == [False, "outer", "inner"]  # queued, then taken after the outer step
