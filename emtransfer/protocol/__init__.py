"""Sans-IO protocol: wire messages and the sender and receiver state machines.

No asyncio, no torch, no sockets: the runtime feeds events in and executes the actions out.
"""

from . import events
from .messages import PROTOCOL_VERSION, decode, encode
from .receiver import ReceiverMachine, ReceiverState
from .sender import SenderMachine, SenderState

__all__ = [
    "PROTOCOL_VERSION",
    "ReceiverMachine",
    "ReceiverState",
    "SenderMachine",
    "SenderState",
    "decode",
    "encode",
    "events",
]
