"""The encoder side: SGLang's encoder delivers each part through emtransfer.

SGLang's encoder server (``MMEncoder``, rank 0) hands every transfer to its ``delivery``, an
``EncoderDelivery`` with two methods: ``send(state, destination)`` (one part to one
registered receiver: ``destination.endpoint`` is the ``host:port`` a scheduler rank
registered through ``/scheduler_receive_url``) and ``release(state)`` (the request is done).
:class:`EmtransferDelivery` sends the part as an emtransfer payload
(:func:`~emtransfer.integrations.sglang.payload.to_payload`) under
``rank_rid(req_id, endpoint)``, the rid that rank receives, from an
:class:`~emtransfer.sync.SyncEncodeNode` that listens from the encoder's start (its own loop
thread): the send runs there and SGLang's event loop awaits it without blocking. One send per
registered rank: the tensor-parallel fan-out of :mod:`emtransfer.integrations.tp`, and as
there the ranks of one request fail as one (a failed send aborts its siblings).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import time
from typing import Any

import torch
from sglang.srt.disaggregation.encoder import server as _server  # type: ignore[import-untyped]
from sglang.srt.disaggregation.encoder.server import (  # type: ignore[import-untyped]
    ZmqDelivery,
)

from ...errors import PayloadError, TransferAborted, TransferError
from ...logs import get_logger
from ...runtime import SendStats
from ...settings import Settings
from ...sync import SyncEncodeNode
from ..tp import rank_rid
from .payload import to_payload

_log = get_logger("emtransfer.integrations.sglang")


class EncoderLink:
    """The encoder process's :class:`SyncEncodeNode` (started, listening, when created:
    language ranks connect before the first payload exists)."""

    def __init__(
        self, settings: Settings | None = None, *, node: SyncEncodeNode | None = None
    ) -> None:
        self.node = node if node is not None else SyncEncodeNode(settings or Settings())
        self.settings = self.node.settings
        if self.settings.bootstrap_port == 0 and node is None:
            _log.warning(
                "emtransfer encode node on a random port: language ranks find it only "
                "through EMTRANSFER_SGLANG_ENCODERS",
                address=self.node.address,
            )
        _log.info("emtransfer encode node listening", address=self.node.address)

    @property
    def address(self) -> str:
        return self.node.address

    def close(self) -> None:
        self.node.close()


_default: EncoderLink | None = None
_default_lock = threading.Lock()


def default_encoder_link() -> EncoderLink:
    """This process's link (settings from the environment and config file), closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = EncoderLink()
            atexit.register(_default.close)
        return _default


class EmtransferDelivery(ZmqDelivery):
    """``EncoderDelivery`` through emtransfer. It keeps ``zmq_to_scheduler``'s registration
    bookkeeping (``release`` drops the registered endpoints, as SGLang's ZMQ delivery does)
    and replaces the transfer."""

    def __init__(self, encoder: Any, link: EncoderLink | None = None) -> None:
        super().__init__(encoder, cleanup_receive_state=True)
        self.link = link or default_encoder_link()
        #: req_id -> endpoint -> the send running on the node's loop
        self._sends: dict[str, dict[str, concurrent.futures.Future[SendStats]]] = {}

    async def send(self, state: Any, destination: Any) -> None:
        mm_data = await self.encoder._wait_for_embedding(state)
        rid = rank_rid(state.req_id, destination.endpoint)
        started = time.perf_counter()
        try:
            tensors, meta = to_payload(mm_data, self.link.settings)
            stats = await self._send(state.req_id, destination.endpoint, rid, tensors, meta)
        except PayloadError as exc:
            # refused before anything moved (a part this node cannot carry: the model's
            # width or dtype is not the settings'): the rank hears why at once, as an
            # encoder error, instead of waiting for a payload that never comes
            _log.error("part refused", rid=rid, error=str(exc))
            with contextlib.suppress(TransferError):
                failed = _failed(mm_data, f"emtransfer: {exc}")
                tensors, meta = to_payload(failed, self.link.settings)
                await self._send(state.req_id, destination.endpoint, rid, tensors, meta)
            raise
        collector = getattr(_server, "encoder_metrics_collector", None)
        if collector is not None:
            collector.observe_transfer(time.perf_counter() - started, backend="emtransfer")
        _log.debug("sent", rid=rid, tokens=stats.num_tokens, rounds=stats.rounds)

    async def _send(
        self,
        req_id: str,
        endpoint: str,
        rid: str,
        tensors: dict[str, Any],
        meta: dict[str, Any],
    ) -> SendStats:
        """One send on the node's loop, awaited here; the request's other sends (its other
        ranks) are aborted if it fails."""
        node = self.link.node
        fut = asyncio.run_coroutine_threadsafe(node.node.send(rid, tensors, meta), node.loop)
        state_req_id = req_id
        siblings = self._sends.setdefault(req_id, {})
        siblings[endpoint] = fut
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller's cancellation
            # a sibling rank failed, or the request was released while this send ran
            raise TransferAborted(
                f"rid={rid!r}: given up (another rank of {state_req_id!r} failed, or the "
                "request was released)"
            ) from None
        except BaseException as exc:
            others = [f for e, f in siblings.items() if e != endpoint and not f.done()]
            _log.warning("send failed", rid=rid, error=repr(exc), siblings_aborted=len(others))
            for other in others:  # the ranks of a request fail as one
                other.cancel()
            raise
        finally:
            if siblings.get(endpoint) is fut:
                del siblings[endpoint]
            if not siblings and self._sends.get(req_id) is siblings:
                del self._sends[req_id]

    async def release(self, state: Any) -> None:
        """The request is done (or given up): sends still running are aborted, then
        SGLang's registration state is dropped."""
        for fut in list(self._sends.pop(state.req_id, {}).values()):
            fut.cancel()
        await super().release(state)


def _failed(mm_data: Any, message: str) -> Any:
    """``mm_data``'s error twin: its metadata, no embedding, ``error_msg`` set (400)."""
    part = mm_data.copy_without_embedding()
    part.error_msg, part.error_code = message, 400
    for name in list(vars(part)):
        if isinstance(getattr(part, name), torch.Tensor) and name != "grid_dim":
            delattr(part, name)  # what could not be carried stays behind
    return part


def install_delivery(encoder: Any, link: EncoderLink | None = None) -> bool:
    """Make an ``MMEncoder`` deliver through emtransfer: rank 0 (the only one that sends)
    with SGLang's ``zmq_to_scheduler`` flow. Returns whether it did."""
    if getattr(encoder, "rank", 0) != 0:
        return False
    backend = getattr(encoder, "transfer_backend", None)
    if backend != "zmq_to_scheduler":
        _log.warning(
            "emtransfer delivers only with SGLang's zmq_to_scheduler flow; keeping "
            "the encoder's own delivery",
            backend=backend,
        )
        return False
    encoder.delivery = EmtransferDelivery(encoder, link)
    return True


__all__ = ["EmtransferDelivery", "EncoderLink", "default_encoder_link", "install_delivery"]
