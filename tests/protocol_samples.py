"""Shared by the sender and receiver machine tests: every event class, one sample of each."""

from __future__ import annotations

from emtransfer.protocol import events as ev
from emtransfer.protocol.events import (
    AbortAckReceived,
    AbortReceived,
    AllocGranted,
    ChunkReceived,
    DataReady,
    Event,
    InitReceived,
    LocalAbort,
    PeerLost,
    ResumeReceived,
    Start,
    Timeout,
    WriteDone,
    WriteFailed,
)


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
    InitReceived: InitReceived((0,), 4),
    LocalAbort: LocalAbort(),
    PeerLost: PeerLost(),
    ResumeReceived: ResumeReceived(1, (0,), 4, 12),
    Start: Start(),
    Timeout: Timeout(),
    WriteDone: WriteDone(),
    WriteFailed: WriteFailed("x"),
}
