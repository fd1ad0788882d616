"""What the Mooncake Transfer Engine needs around it: the system library it loads, the
environment it reads (its log level, its timeouts) and the configurations it cannot run.
Apart from :mod:`.mooncake` so that each is testable without an engine.

The engine reads its knobs from ``MC_*`` environment variables: its log level once, as its
module loads (:func:`load_engine` sets it first); its timeouts when an engine is made and on
its own threads while it runs (``getenv`` is not safe against a concurrent ``setenv``), so
:func:`prepare_environment` sets them once per process, before the first engine exists. Only
variables the user left unset are set, and child processes inherit them.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from types import ModuleType

from ..errors import ConfigError
from ..logs import get_logger

VERBS = "libibverbs.so.1"  # loaded by the engine's module even for TCP
SYSFS_RDMA = "/sys/class/infiniband"  # the kernel's RDMA devices (what ibv_get_device_list reads)
PROTOCOLS = ("tcp", "rdma")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
_log = get_logger("emtransfer.transport")
_done: dict[str, dict[str, str]] = {}  # what was set, once per process: "log", "timeouts"
_lock = threading.Lock()


def engine_log_level(level: int) -> str:
    """``MC_LOG_LEVEL`` for a Python logging level: the engine's INFO lines from INFO down,
    its warnings at WARNING, only its errors above. (glog's own ``GLOG_minloglevel`` does not
    work: the engine overwrites it from ``MC_LOG_LEVEL``, default INFO, as its module loads.)"""
    if level <= logging.INFO:
        return "INFO"
    return "WARNING" if level <= logging.WARNING else "ERROR"


def engine_timeouts(post_bound: float, environ: Mapping[str, str]) -> dict[str, str]:
    """The engine's timeouts for a transport whose posted writes end within ``post_bound``
    seconds, less those set in ``environ`` (the user's). They are whole seconds: rounded
    down, so that a stalled write fails before the receiver's quarantine assumes it ended
    (at least 1 s: the engine takes nothing shorter)."""
    secs = str(max(1, math.floor(post_bound)))
    want = {
        # the blocking batch call gives up after this (the engine's floor is 5 s)
        "MC_TRANSFER_TIMEOUT": secs,
        # tcp: a session without progress for this long is dropped (default 30 s)
        "MC_TCP_PROGRESS_TIMEOUT_SEC": secs,
        # tcp: the receiver's acknowledgement of a body sent (default 30 s)
        "MC_TCP_STATUS_TIMEOUT_SEC": secs,
    }
    return {k: v for k, v in want.items() if k not in environ}


def _set_once(
    key: str, changes: Callable[[Mapping[str, str]], dict[str, str]],
    environ: MutableMapping[str, str] | None,
) -> dict[str, str]:  # fmt: skip
    with _lock:
        if key not in _done:
            env = os.environ if environ is None else environ
            _done[key] = changes(env)
            env.update(_done[key])
        return _done[key]


def load_engine(environ: MutableMapping[str, str] | None = None) -> ModuleType:
    """``mooncake.engine`` (the engine's pybind module). Before this process first imports
    it, ``MC_LOG_LEVEL`` follows our transport logger's level, unless the user set it: the
    engine reads it once, as the module loads (as NIXL reads ``NIXL_LOG_LEVEL``)."""

    def level(env: Mapping[str, str]) -> dict[str, str]:
        if "MC_LOG_LEVEL" in env or "mooncake.engine" in sys.modules:
            return {}
        return {"MC_LOG_LEVEL": engine_log_level(_log.logger.getEffectiveLevel())}

    _set_once("log", level, environ)
    return importlib.import_module("mooncake.engine")


def prepare_environment(
    post_bound: float, environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set the engine's timeouts (:func:`engine_timeouts`) the first time an engine is about
    to start in this process; returns what it set then, the same dict afterwards (a later
    transport's ``post_bound`` does not change them: engines may be reading them)."""
    return _set_once("timeouts", lambda env: engine_timeouts(post_bound, env), environ)


def unavailable(load: Callable[[], ModuleType] = load_engine, verbs: str = VERBS) -> str | None:
    """Why the engine cannot run here (its system library or its module missing), or None."""
    try:
        ctypes.CDLL(verbs)
    except OSError as exc:
        return (
            f"{verbs} cannot be loaded ({exc}): the Mooncake engine needs it even for TCP "
            "(Debian/Ubuntu: apt-get install libibverbs1)"
        )
    try:
        module = load()
    except ImportError as exc:
        return f"mooncake cannot be imported: {exc} (pip install 'emtransfer[mooncake]')"
    if not hasattr(module, "TransferEngine"):
        return f"mooncake.engine has no TransferEngine (module {module.__name__!r})"
    return None


def rdma_devices(sysfs: str | None = None) -> list[str]:
    """The RDMA devices the kernel lists (``mlx5_0``...) under ``sysfs`` (default
    :data:`SYSFS_RDMA`), none when it lists none."""
    try:
        return sorted(os.listdir(SYSFS_RDMA if sysfs is None else sysfs))
    except OSError:
        return []


def pool_location(kind: str, index: int | None, configured: str | None) -> str:
    """Where the engine is told the pools live (it matches the location to its NICs):
    ``configured``, else ``cuda:N`` for a pool on GPU N, else ``*`` (the engine finds out)."""
    if configured is not None:
        return configured
    return f"cuda:{index or 0}" if kind == "cuda" else "*"


_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})")


def check_session(session: str) -> bool:
    """Whether a peer's session address is ``host:port`` (``[v6]:port``) with a valid port."""
    m = _HOST_PORT.fullmatch(session)
    return bool(m and 0 < int(m.group(2)) < 65536)


def check_config(
    *,
    protocol: str,
    devices: str | None,
    host: str,
    pool_kind: str,
    support_cuda: bool,
    environ: Mapping[str, str],
    sysfs: str | None = None,
) -> None:
    """Refuse, with a :class:`ConfigError` naming the setting, what the engine here cannot do."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"invalid setting mooncake_protocol={protocol!r}: choose tcp or rdma")
    if host.strip() in WILDCARD_HOSTS:
        raise ConfigError(
            f"invalid setting host={host!r} for the mooncake transport: peers reach the engine "
            "at this address, so it must be one they can connect to, not a wildcard"
        )
    if protocol == "tcp" and environ.get("MC_TCP_PROTO") == "1":
        raise ConfigError(
            "MC_TCP_PROTO=1 makes the engine use its legacy TCP framing, which reports a write "
            "complete before it lands: the mooncake transport's guarantees need the "
            "acknowledged framing (unset MC_TCP_PROTO)"
        )
    if protocol == "rdma":
        found = rdma_devices(sysfs)
        if not found:
            raise ConfigError(
                "invalid setting mooncake_protocol='rdma': this machine has no RDMA device "
                f"({sysfs or SYSFS_RDMA} lists none); use mooncake_protocol='tcp'"
            )
        missing = [d for d in (devices or "").split(",") if d and d not in found]
        if missing:
            raise ConfigError(
                f"invalid setting mooncake_devices={devices!r}: {', '.join(missing)} not found "
                f"(this machine has {', '.join(found)})"
            )
    if pool_kind == "cuda" and not support_cuda:
        raise ConfigError(
            "the mooncake transport cannot register CUDA pools with this engine build "
            "(mooncake.engine.SUPPORT_CUDA is False: mooncake-transfer-engine-non-cuda); "
            "install the CUDA build (mooncake-transfer-engine) or use device='cpu'"
        )
