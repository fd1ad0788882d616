"""TLS for the control connection, from the standard library's :mod:`ssl` and the settings.

The encode node serves TLS once it has a certificate (``tls_cert``, ``tls_key``) and asks
for client certificates signed by ``tls_ca`` when that is set (mutual TLS). The language node
speaks TLS once it has a CA to verify the encode node against (``tls_ca``), presenting its own
certificate when it has one. The handshake's HMAC (``auth_token``) runs inside either way.
"""

from __future__ import annotations

import ssl

from ..errors import ConfigError
from ..settings import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The encode node's context, or None when it serves plain TCP."""
    if settings.tls_cert is None:
        if settings.tls_ca is not None:
            raise ConfigError("tls_ca on the encode node needs tls_cert and tls_key to serve TLS")
        return None
    mutual = settings.tls_ca is not None
    ctx = _context(ssl.Purpose.CLIENT_AUTH, settings, chain=True, ca=mutual)
    if mutual:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The language node's context, or None when it connects over plain TCP."""
    if settings.tls_ca is None:
        if settings.tls_cert is not None:
            raise ConfigError("tls_cert on the language node needs tls_ca to verify the server")
        return None
    return _context(ssl.Purpose.SERVER_AUTH, settings, chain=settings.tls_cert is not None, ca=True)


def _context(purpose: ssl.Purpose, settings: Settings, *, chain: bool, ca: bool) -> ssl.SSLContext:
    """TLS 1.2 at least, with this node's certificate (``chain``) and the CA (``ca``) loaded;
    a file that is not what it should be is a ConfigError naming the setting."""
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if chain:
            ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"invalid setting tls_cert/tls_key: {exc}") from None
    try:
        if ca:
            ctx.load_verify_locations(cafile=str(settings.tls_ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"invalid setting tls_ca={str(settings.tls_ca)!r}: {exc}") from None
    return ctx
