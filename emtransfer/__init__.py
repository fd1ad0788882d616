"""emtransfer: move multimodal embeddings from encode workers to language (prefill) workers."""

from .errors import (
    AllocationTimeout,
    AllocatorError,
    CapacityError,
    ConfigError,
    EncoderFailed,
    InvalidRequest,
    JobRefused,
    PayloadError,
    PeerLost,
    ProtocolError,
    RidInFlight,
    TransferAborted,
    TransferError,
    TransferTimeout,
    Unavailable,
)
from .logs import configure_logging
from .runtime import EncodeNode, LanguageNode, Peer, Received, SendStats, Staged
from .settings import FieldSpec, Settings
from .transport import GrantExpired, TransportError

__version__ = "0.1.0"

__all__ = [
    "AllocationTimeout",
    "AllocatorError",
    "CapacityError",
    "ConfigError",
    "EncodeNode",
    "EncoderFailed",
    "FieldSpec",
    "GrantExpired",
    "InvalidRequest",
    "JobRefused",
    "LanguageNode",
    "PayloadError",
    "Peer",
    "PeerLost",
    "ProtocolError",
    "Received",
    "RidInFlight",
    "SendStats",
    "Settings",
    "Staged",
    "TransferAborted",
    "TransferError",
    "TransferTimeout",
    "TransportError",
    "Unavailable",
    "configure_logging",
]
