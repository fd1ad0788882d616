"""Data-plane engines behind one small interface (:class:`Transport`).

One module per engine: ``local`` (in-process), ``tcp`` (asyncio sockets, the fallback),
``nixl`` (NIXL/UCX), ``torch`` (torch.distributed: gloo for CPU pools, NCCL for CUDA pools),
``mooncake`` (the Mooncake Transfer Engine over TCP or RDMA).
Engines with optional dependencies are imported only when chosen.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..logs import get_logger
from .base import GrantExpired, Transport, TransportError
from .local import LocalTransport

if TYPE_CHECKING:
    from ..buffers import BufferRegistry
    from ..settings import Settings

_MODULES = {
    "local": "local",
    "tcp": "tcp",
    "nixl": "nixl",
    "torch": "torch",
    "mooncake": "mooncake",
}
_log = get_logger("emtransfer.transport")


def transport_class(name: str) -> type[Transport]:
    if name not in _MODULES:
        raise ConfigError(f"invalid setting transport={name!r}: choose from {sorted(_MODULES)}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    cls: type[Transport] = module.TRANSPORT
    return cls


def transport_unavailable(name: str) -> str | None:
    """Why transport ``name`` cannot run on this machine, or None when it can."""
    try:
        cls = transport_class(name)
    except ImportError as exc:
        return f"{name} transport cannot be imported: {exc}"
    return cls.unavailable()


def create_transport(settings: Settings, registry: BufferRegistry) -> Transport:
    """The transport named by ``settings.transport``; ``auto`` picks nixl when it imports and
    initialises, else tcp, and logs the choice."""
    name = settings.transport
    if name == "auto":
        why = transport_unavailable("nixl")
        name = "nixl" if why is None else "tcp"
        _log.info("transport chosen", transport=name, nixl_unavailable=why)
    else:
        why = transport_unavailable(name)
        if why is not None:
            raise ConfigError(f"invalid setting transport={name!r}: {why}")
    return transport_class(name).from_settings(settings, registry)


__all__ = [
    "GrantExpired",
    "LocalTransport",
    "Transport",
    "TransportError",
    "create_transport",
    "transport_class",
    "transport_unavailable",
]
