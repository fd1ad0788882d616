"""The patch: two methods of SGLang's encoder disaggregation, replaced and restorable.

SGLang compares ``--encoder-transfer-backend`` with literal names in a dozen places
(scheduler, request receiver, tokenizer manager, metrics, the encoder's server, runtime,
HTTP and gRPC front ends), so a new backend name cannot be added without patching each of
them. emtransfer therefore rides on the ``zmq_to_scheduler`` flow, whose control path suits
it unchanged (the tokenizer dispatches ``/encode``; scheduler ranks register their receive
endpoints with ``/scheduler_receive_url``; the encoder delivers to each registered rank),
and replaces only its data path, at its two seams:

1. ``receiver.MMReceiverHTTP.process_waiting_requests`` (a scheduler rank, each tick): with
   ``zmq_to_scheduler`` it builds :class:`EmtransferWaitingRequest` instead of
   ``WaitingZmqRequest``, and runs SGLang's own ``_process_waiting_requests`` loop (the
   status all-reduce, timeouts, aborts) unchanged; other backends get the original.
2. ``server.MMEncoder.__init__`` (the encoder): after the original, rank 0 with
   ``zmq_to_scheduler`` gets :class:`EmtransferDelivery` as its ``delivery``.

:func:`register` checks the SGLang version and the seams' shape first, and refuses anything
else with :class:`UnsupportedSGLang`; it is idempotent and thread-safe, and
:func:`unregister` puts the original methods back (objects built meanwhile keep what they
were built with).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable
from typing import Any

from ...errors import ConfigError
from ...logs import get_logger

_log = get_logger("emtransfer.integrations.sglang")

#: the SGLang releases this integration was written for and tested against
SUPPORTED_VERSIONS = ("0.5.23",)
RECEIVER = "sglang.srt.disaggregation.encoder.receiver"
SERVER = "sglang.srt.disaggregation.encoder.server"
#: (module, class, attribute) of each patched method
TARGETS = (
    (RECEIVER, "MMReceiverHTTP", "process_waiting_requests"),
    (SERVER, "MMEncoder", "__init__"),
)
_PATCHED = "__emtransfer_patch__"  # marks our replacements

_lock = threading.RLock()
_originals: dict[tuple[str, str, str], Callable[..., Any]] = {}


class UnsupportedSGLang(ConfigError):
    """This SGLang is not one the integration was written for (or not importable)."""


def sglang_version() -> str:
    try:
        import sglang  # type: ignore[import-untyped]
    except Exception as exc:
        raise UnsupportedSGLang(f"SGLang is not importable: {exc!r}") from exc
    return str(getattr(sglang, "__version__", "unknown"))


def check_sglang(*, force: bool = False) -> list[str]:
    """Why this SGLang does not fit (empty when it does): the version (skipped with
    ``force``), and the shape of every seam the patch relies on."""
    problems = []
    version = sglang_version()
    if version not in SUPPORTED_VERSIONS and not force:
        problems.append(
            f"SGLang {version} is installed; emtransfer.integrations.sglang was written for "
            f"{', '.join(SUPPORTED_VERSIONS)}"
        )
    try:
        receiver = importlib.import_module(RECEIVER)
        server = importlib.import_module(SERVER)
    except Exception as exc:
        return [*problems, f"SGLang's encoder modules do not import: {exc!r}"]
    status = getattr(receiver, "WaitingMMRequestStatus", None)
    want = {"FAIL": -1, "PENDING": 0, "SUCCESS": 1, "TIMEOUT": -2}
    if status is None or {s.name: int(s) for s in status} != want:
        problems.append(f"receiver.WaitingMMRequestStatus is not {want}")
    for name in (
        "MMReceiverHTTP",
        "WaitingZmqRequest",
        "WaitingMMRequestBase",
        "_aggregate_embedding_part",
        "calculate_modality_num_parts",
        "create_part_req_id",
        "EmbeddingData",
    ):
        if not hasattr(receiver, name):
            problems.append(f"receiver.{name} is missing")
    http = getattr(receiver, "MMReceiverHTTP", None)
    if http is not None and not hasattr(http, "_process_waiting_requests"):
        problems.append("receiver.MMReceiverHTTP._process_waiting_requests is missing")
    base = getattr(server, "EncoderDelivery", None)
    if base is None or set(getattr(base, "__abstractmethods__", ())) != {"send", "release"}:
        problems.append("server.EncoderDelivery is not the send/release interface")
    zmq = getattr(server, "ZmqDelivery", None)
    if zmq is None or "cleanup_receive_state" not in inspect.signature(zmq.__init__).parameters:
        problems.append("server.ZmqDelivery(encoder, cleanup_receive_state=...) is missing")
    if not hasattr(getattr(server, "MMEncoder", None), "_wait_for_embedding"):
        problems.append("server.MMEncoder._wait_for_embedding is missing")
    return problems


def _process_waiting_requests(self: Any, recv_reqs: Any) -> Any:
    original = _originals[TARGETS[0]]
    if getattr(self, "encoder_transfer_backend", None) != "zmq_to_scheduler":
        return original(self, recv_reqs)
    from .receiver import EmtransferWaitingRequest, language_link_for

    return self._process_waiting_requests(
        recv_reqs,
        EmtransferWaitingRequest,
        embedding_pool=self.embedding_pool,
        registration_runner=self.registration_runner,
        link=language_link_for(self),
    )


def _mm_encoder_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _originals[TARGETS[1]](self, *args, **kwargs)
    from .delivery import install_delivery

    if install_delivery(self):
        _log.info("SGLang encoder delivers through emtransfer", rank=getattr(self, "rank", 0))


_REPLACEMENTS: dict[tuple[str, str, str], Callable[..., Any]] = {
    TARGETS[0]: _process_waiting_requests,
    TARGETS[1]: _mm_encoder_init,
}


def register(*, force: bool = False) -> None:
    """Make this process's SGLang move encoder embeddings through emtransfer (see the module
    docstring for what changes). Idempotent; raises :class:`UnsupportedSGLang` (naming every
    problem) on an SGLang it was not written for. ``force`` accepts another version when the
    seams still have the expected shape, at your own risk."""
    with _lock:
        if _originals:
            return
        problems = check_sglang(force=force)
        if problems:
            raise UnsupportedSGLang("; ".join(problems))
        for target in TARGETS:
            module, cls_name, attr = target
            cls = getattr(importlib.import_module(module), cls_name)
            original = cls.__dict__[attr]
            replacement = functools.wraps(original)(_REPLACEMENTS[target])
            setattr(replacement, _PATCHED, True)
            _originals[target] = original
            setattr(cls, attr, replacement)
        _log.info("registered with SGLang", version=sglang_version(), targets=len(TARGETS))


def unregister() -> None:
    """Put SGLang's original methods back (idempotent). Refuses (ConfigError) when someone
    else replaced one of them since: restoring would drop their change."""
    with _lock:
        if not _originals:
            return
        classes = {}
        for target in TARGETS:
            module, cls_name, attr = target
            cls = getattr(importlib.import_module(module), cls_name)
            if not getattr(cls.__dict__.get(attr), _PATCHED, False):
                raise ConfigError(
                    f"{cls_name}.{attr} was replaced by someone else after emtransfer's patch; "
                    "not restoring it"
                )
            classes[target] = cls
        for target, cls in classes.items():
            setattr(cls, target[2], _originals.pop(target))
        _log.info("unregistered from SGLang")


def is_registered() -> bool:
    with _lock:
        return bool(_originals)


__all__ = [
    "SUPPORTED_VERSIONS",
    "TARGETS",
    "UnsupportedSGLang",
    "check_sglang",
    "is_registered",
    "register",
    "sglang_version",
    "unregister",
]
