"""The table-driven core shared by the sender and the receiver machines.

Following h11's rule, everything that decides a transition lives in one table per role:
``TRANSITIONS[(state, event type)] -> handler``. A pair missing from the table is an invalid
event and raises :class:`ProtocolError` naming the role, the state and the event. Each handler
returns the new state and the actions; the new state must be one the table allows for that
pair (``ALLOWED``), so the table stays the single place to read the machine from.

A message can also name a request this node holds no session for: one that ended, or one it
never had. What to answer then is the role's ``UNKNOWN`` table, ``event type -> handler(rid,
event) -> actions``, read through :meth:`Machine.answer_unknown`; the runtime only executes the
actions (a ``Fail`` among them is raised: the peer broke the protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import ProtocolError
from .events import Action, Event


class StateEnum(Enum):
    """The states of a machine. Members are singletons compared by identity, so they hash by
    identity too: ``Enum.__hash__`` is a Python-level call, and the tables are read with a
    state in the key several times per event, on every request's path."""

    __hash__ = object.__hash__


S = TypeVar("S", bound=Enum)
#: a TIMEOUTS entry that names no setting: the deadline is the current grant's, which only the
#: runtime knows (receiver: the grant's expiry plus the engine's post bound; sender: the
#: grant's write deadline plus that bound)
GRANT_EXPIRY = "grant_expiry"
Handler = Callable[[Any, Any], tuple[Any, list[Action]]]
UnknownHandler = Callable[[str, Any], list[Action]]


class Machine(Generic[S]):
    """One request's protocol state on one side."""

    ROLE: ClassVar[str]
    #: (state, event type) -> (handler, allowed new states)
    TRANSITIONS: ClassVar[dict[tuple[Any, type[Event]], tuple[Handler, frozenset[Any]]]]
    #: state -> name of the Settings timeout that bounds it, or GRANT_EXPIRY; every state but
    #: NEW and the terminal ones has one
    TIMEOUTS: ClassVar[dict[Any, str]]
    TERMINAL: ClassVar[frozenset[Any]]
    #: event type -> what this role answers to it for a request it holds no session for
    UNKNOWN: ClassVar[dict[type[Event], UnknownHandler]]

    def __init__(self, rid: str, state: S) -> None:
        self.rid = rid
        self.state: S = state
        self.history: list[tuple[S, str, S]] = []

    @property
    def finished(self) -> bool:
        return self.state in self.TERMINAL

    @property
    def phase(self) -> object:
        """What one deadline covers: a new phase starts the timer of its state afresh."""
        return self.state

    @property
    def timeout_name(self) -> str | None:
        """The Settings timeout that bounds the current state, if any."""
        return self.TIMEOUTS.get(self.state)

    def handle(self, event: Event) -> list[Action]:
        entry = self.TRANSITIONS.get((self.state, type(event)))
        if entry is None:
            raise ProtocolError(
                f"{self.ROLE} rid={self.rid!r}: event {type(event).__name__} is not valid "
                f"in state {self.state.name}"
            )
        handler, allowed = entry
        new_state, actions = handler(self, event)
        if new_state not in allowed:  # pragma: no cover - a bug in a handler, not in the peer
            raise AssertionError(
                f"{self.ROLE}: {self.state.name} --{type(event).__name__}--> {new_state.name} "
                "is not in the transition table"
            )
        self.history.append((self.state, type(event).__name__, new_state))
        self.state = new_state
        return actions

    @classmethod
    def answer_unknown(cls, rid: str, event: Event) -> list[Action]:
        """The actions answering ``event`` for ``rid``, a request with no session here."""
        handler = cls.UNKNOWN.get(type(event))
        if handler is None:
            raise ProtocolError(
                f"{cls.ROLE}: event {type(event).__name__} for unknown rid {rid!r} is not valid"
            )
        return handler(rid, event)

    @classmethod
    def valid_events(cls, state: S) -> set[type[Event]]:
        return {ev for (st, ev) in cls.TRANSITIONS if st == state}
