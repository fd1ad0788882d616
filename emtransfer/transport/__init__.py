"""Data-plane engines behind one small interface (:class:`Transport`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Transport, TransportError
from .local import LocalTransport

if TYPE_CHECKING:
    from ..buffers import BufferRegistry
    from ..settings import Settings


def create_transport(settings: Settings, registry: BufferRegistry) -> Transport:
    """The transport named by ``settings.transport`` (``auto``: the best one that works)."""
    name = settings.transport
    if name in ("local", "auto"):
        return LocalTransport(registry)
    raise ConfigError(f"invalid setting transport={name!r}: not available in this build")


__all__ = ["LocalTransport", "Transport", "TransportError", "create_transport"]
