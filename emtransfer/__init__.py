"""emtransfer: move multimodal embeddings from encode workers to language (prefill) workers."""

from .errors import (
    AllocationTimeout,
    AllocatorError,
    CapacityError,
    ConfigError,
    InvalidRequest,
    PayloadError,
    PeerLost,
    ProtocolError,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from .logs import configure_logging
from .runtime import EncodeNode, LanguageNode, Peer, Received, SendStats
from .settings import FieldSpec, Settings

__version__ = "0.1.0"

__all__ = [
    "AllocationTimeout",
    "AllocatorError",
    "CapacityError",
    "ConfigError",
    "EncodeNode",
    "FieldSpec",
    "InvalidRequest",
    "LanguageNode",
    "PayloadError",
    "Peer",
    "PeerLost",
    "ProtocolError",
    "Received",
    "SendStats",
    "Settings",
    "TransferAborted",
    "TransferError",
    "TransferTimeout",
    "configure_logging",
]
