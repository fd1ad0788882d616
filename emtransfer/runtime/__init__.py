"""asyncio runtime: nodes, per-request sessions, control channels."""

from .channel import Channel, LocalChannel
from .encode import EncodeNode, SendStats, Staged
from .language import LanguageNode, Received
from .node import Node, Peer

__all__ = [
    "Channel",
    "EncodeNode",
    "LanguageNode",
    "LocalChannel",
    "Node",
    "Peer",
    "Received",
    "SendStats",
    "Staged",
]
