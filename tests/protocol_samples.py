"""Shared by the protocol machine tests: every event class, one sample of each, and the
transports' guarantee combinations."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

import pytest

from emtransfer.errors import ProtocolError
from emtransfer.guarantees import NONE, Guarantees
from emtransfer.protocol import events as ev
from emtransfer.protocol.events import (
    AbortAckReceived,
    AbortReceived,
    AllocGranted,
    ChunkReceived,
    DataReady,
    Event,
    Fenced,
    FenceFailed,
    InitReceived,
    LocalAbort,
    PeerLost,
    Prefetched,
    PrefetchRefused,
    ResumeReceived,
    Start,
    Timeout,
    TotalReceived,
    WriteDone,
    WriteFailed,
)
from emtransfer.protocol.machine import GRANT_EXPIRY, Machine
from emtransfer.settings import Settings

#: the guarantee combinations the transports declare (nixl and mooncake; tcp and torch; local),
#: and none at all: the receiver machine is tested under each
GUARANTEES: dict[str, Guarantees] = {
    "nixl": Guarantees(remote_completion=True, fences_tag=False, remove_stops_inbound=False),
    "tcp": Guarantees(
        remote_completion=False, fences_tag=True, remove_stops_inbound=True, authorizes_writes=True
    ),
    "local": Guarantees(
        remote_completion=True, fences_tag=True, remove_stops_inbound=True, authorizes_writes=True
    ),
    "none": NONE,
}
KINDS = tuple(GUARANTEES)


def all_event_types() -> list[type[Event]]:
    found = [
        obj
        for obj in vars(ev).values()
        if isinstance(obj, type) and issubclass(obj, Event) and obj is not Event
    ]
    return sorted(found, key=lambda t: t.__name__)


#: one instance of every event class in events.py
SAMPLE_EVENTS: dict[type[Event], Event] = {
    AbortAckReceived: AbortAckReceived(),
    AbortReceived: AbortReceived("r"),
    AllocGranted: AllocGranted((0,), 4),
    ChunkReceived: ChunkReceived(0, 0, 4, 4, True),
    DataReady: DataReady(4),
    Fenced: Fenced(),
    FenceFailed: FenceFailed("f"),
    InitReceived: InitReceived((0,), 4),
    LocalAbort: LocalAbort(),
    PeerLost: PeerLost(),
    Prefetched: Prefetched((0,), 4),
    PrefetchRefused: PrefetchRefused(),
    ResumeReceived: ResumeReceived(1, (0,), 4, 12),
    Start: Start(),
    Timeout: Timeout(),
    TotalReceived: TotalReceived(12),
    WriteDone: WriteDone(),
    WriteFailed: WriteFailed("x"),
}


def invalid_pairs(machine: type[Machine[Any]], states: Iterable[Enum]) -> list[tuple[Any, Any]]:
    """Every (state, event type) the machine's table does not list."""
    return [
        (state, et)
        for state in states
        for et in all_event_types()
        if (state, et) not in machine.TRANSITIONS
    ]


def assert_refused(m: Machine[Any], event_type: type[Event], role: str, rid: str) -> None:
    """The event raises ProtocolError naming role, rid, state and event, and changes nothing."""
    state, history, snapshot = m.state, list(m.history), dict(vars(m))
    with pytest.raises(ProtocolError) as info:
        m.handle(SAMPLE_EVENTS[event_type])
    msg = str(info.value)
    for part in (role, rid, state.name, event_type.__name__):
        assert part in msg
    assert m.state is state
    assert m.history == history
    assert vars(m) == snapshot


def assert_timeouts_name_settings(machine: type[Machine[Any]], states: Iterable[Enum]) -> None:
    """Every state but NEW and the terminal ones has a deadline: a Settings timeout (a float
    field of Settings) or the grant's expiry; and each accepts the Timeout."""
    fields = Settings.model_fields
    for state in states:
        name = machine.TIMEOUTS.get(state)
        if state.name == "NEW" or state in machine.TERMINAL:
            assert name is None, state
            continue
        assert name is not None, f"{state.name} has no deadline"
        assert name == GRANT_EXPIRY or (name in fields and fields[name].annotation is float), name
        assert (state, ev.Timeout) in machine.TRANSITIONS, state
