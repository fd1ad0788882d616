"""Run a role's app under uvicorn on a uvloop event loop; every log line in one format."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
from typing import Any

from ..errors import ConfigError
from ..logs import configure_logging, get_logger
from .common import NodeService
from .drain import DrainingServer
from .options import ServeOptions

log = get_logger("emtransfer.server")


def route_stdlib_logging(level: str, *, json: bool = False) -> None:
    """emtransfer's, uvicorn's and everyone's records through one formatter at ``level``."""
    configure_logging(level, json=json)
    quiet = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = [], True
        lg.setLevel(quiet)  # uvicorn's start-up chatter only when debugging


def build_service(options: ServeOptions) -> tuple[NodeService, Any]:
    """The service and its FastAPI app for the role (call inside the event loop)."""
    if options.role == "encode":
        from .encode_app import EncodeService, create_encode_app

        enc = EncodeService(options)
        return enc, create_encode_app(enc)
    from .language_app import LanguageService, create_language_app

    lang = LanguageService(options)
    return lang, create_language_app(lang)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


async def _serve(options: ServeOptions, stop: list[int]) -> None:
    import uvicorn

    sock = _bind(options.http_host, options.port)
    try:
        service, app = build_service(options)
    except BaseException:
        sock.close()
        raise
    try:
        try:
            await service.start()
        except OSError as exc:
            raise ConfigError(f"cannot start the {options.role} node: {exc}") from None
        host, port = sock.getsockname()[:2]
        extra = {"bootstrap": service.health().get("address")} if options.role == "encode" else {}
        if options.role == "language":
            extra = {"encoders": list(options.encoder_addrs)}
        log.info(
            "serving",
            role=options.role,
            url=f"http://{host}:{port}",
            transport=service.node.transport.name,
            **extra,
        )
        if stop:  # a signal arrived while starting
            return
        if options.gc_freeze:
            freeze_startup_objects()
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            # the drain has answered every request by then: this only bounds closing them
            timeout_graceful_shutdown=2,
            server_header=False,
        )
        await DrainingServer(config, service.drain).serve(sockets=[sock])
    finally:
        await service.close()
        sock.close()


def freeze_startup_objects() -> None:
    """Collect once, then freeze what is left (modules, settings, pools, the app): the
    collector's full passes then scan only what serving allocates. Without it a full pass over
    a torch process's few hundred thousand start-up objects takes about 0.1 s on a small
    machine (``bench/bench_overhead.py``), a pause every request in flight waits out."""
    gc.collect()
    gc.freeze()
    log.debug("gc frozen", objects=gc.get_freeze_count())


def serve(options: ServeOptions, *, log_level: str = "info", log_json: bool = False) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status."""
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    route_stdlib_logging(log_level, json=log_json)
    stop: list[int] = []

    def note(signum: int, frame: Any) -> None:  # uvicorn takes over once it serves
        stop.append(signum)

    saved = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(options, stop))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        root.handlers = saved_logging[0]
        root.setLevel(saved_logging[1])
    log.info("stopped", role=options.role)
    return 0
