"""The language side: a scheduler rank's waiting request, received through emtransfer.

SGLang's scheduler keeps one ``WaitingMMRequestBase`` per multimodal request that waits for
its embeddings, calls ``_try_recv_mm_data()`` on each every tick, and all-reduces their
``status`` with ``MIN`` over the TP group (FAIL -1 / PENDING 0 / SUCCESS 1 / TIMEOUT -2).
:class:`EmtransferWaitingRequest` is that class for emtransfer. It keeps SGLang's
``zmq_to_scheduler`` control flow (the tokenizer dispatches ``/encode``; each rank registers
its receive endpoint with the encoder through ``/scheduler_receive_url``; the encoder
delivers to every registered rank) and replaces the data path: for each part the rank opens
an emtransfer receive under ``rank_rid(part_req_id, endpoint)`` from the encoder's emtransfer
node, and each tick polls the handles (:mod:`emtransfer.sync`: a poll never waits).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sglang.srt.disaggregation.encoder.receiver import (  # type: ignore[import-untyped]
    WaitingMMRequestStatus,
    WaitingZmqRequest,
    _aggregate_embedding_part,
    calculate_modality_num_parts,
    create_part_req_id,
)
from sglang.srt.utils.network import NetworkAddress  # type: ignore[import-untyped]

from ...errors import ConfigError, TransferTimeout
from ...logs import get_logger
from ...runtime import Received
from ...settings import Settings
from ...sync import PollState, SyncLanguageNode, TransferHandle
from ..tp import rank_rid
from .payload import from_received, public_attrs

_log = get_logger("emtransfer.integrations.sglang")

#: encoder URL -> emtransfer address of its encode node: ``url=host:port,url=host:port`` or
#: a JSON object; without an entry, the URL's host and the settings' bootstrap_port
ENCODERS_ENV = "EMTRANSFER_SGLANG_ENCODERS"


def parse_encoder_map(text: str | None) -> dict[str, str]:
    """The ``EMTRANSFER_SGLANG_ENCODERS`` value as ``{encoder url: emtransfer address}``."""
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{ENCODERS_ENV}: not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise ConfigError(f"{ENCODERS_ENV}: must map encoder URLs to host:port strings")
        pairs = raw
    else:
        pairs = {}
        for item in text.split(","):
            url, sep, address = item.strip().rpartition("=")
            if not sep or not url or not address:
                raise ConfigError(f"{ENCODERS_ENV}: expected url=host:port, got {item!r}")
            pairs[url] = address
    return {url.rstrip("/"): address.strip() for url, address in pairs.items()}


class LanguageLink:
    """What a scheduler process's waiting requests share: one :class:`SyncLanguageNode` (its
    own loop thread; started on first use) and the map from SGLang's encoder URLs to the
    encoders' emtransfer addresses."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        encoders: Mapping[str, str] | None = None,
        node: SyncLanguageNode | None = None,
    ) -> None:
        self.settings = node.settings if node is not None else (settings or Settings())
        if encoders is None:
            encoders = parse_encoder_map(os.environ.get(ENCODERS_ENV))
        self.encoders = {url.rstrip("/"): address for url, address in encoders.items()}
        self._node = node
        self._lock = threading.Lock()

    @property
    def node(self) -> SyncLanguageNode:
        with self._lock:
            if self._node is None:
                self._node = SyncLanguageNode(self.settings)
            return self._node

    def address_of(self, encoder_url: str) -> str:
        """The emtransfer address of the encode node beside the SGLang encoder at
        ``encoder_url``: its entry in :data:`ENCODERS_ENV`, else the URL's host and
        ``bootstrap_port``."""
        url = encoder_url.rstrip("/")
        if url in self.encoders:
            return self.encoders[url]
        host = urlsplit(url if "//" in url else f"//{url}").hostname
        port = self.settings.bootstrap_port
        if not host or not port:
            raise ConfigError(
                f"no emtransfer address for encoder {encoder_url!r}: list it in "
                f"{ENCODERS_ENV} (url=host:port) or set EMTRANSFER_BOOTSTRAP_PORT to the "
                "encode nodes' port"
            )
        return str(NetworkAddress(host, port).to_host_port_str())

    def close(self) -> None:
        with self._lock:
            node, self._node = self._node, None
        if node is not None:
            node.close()


_default: LanguageLink | None = None
_default_lock = threading.Lock()


def default_language_link() -> LanguageLink:
    """This process's link (settings from the environment and config file), closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = LanguageLink()
            atexit.register(_default.close)
        return _default


def language_link_for(mm_receiver: Any) -> LanguageLink:
    """The link a scheduler's ``MMReceiver`` uses: its ``emtransfer_link`` attribute when set
    (tests, or a caller with its own settings), else the process's default."""
    link = getattr(mm_receiver, "emtransfer_link", None)
    return link if isinstance(link, LanguageLink) else default_language_link()


@dataclass
class _Part:
    part_idx: int
    part_rid: str  # SGLang's part request id: f"{rid}_local_part_{part_idx}"
    encoder_url: str
    handle: TransferHandle[Received] | None = None
    taken: bool = False  # consumed (or released) already


def iter_parts(num_items_assigned: Mapping[Any, list[int]]) -> list[tuple[int, int]]:
    """``(part_idx, encoder_idx)`` of every part, numbered as SGLang's tokenizer numbers them
    when it dispatches ``/encode`` (modality by modality, encoders in order, empty skipped)."""
    modalities = list(num_items_assigned.keys())
    _, per_modality = calculate_modality_num_parts(modalities, num_items_assigned)
    parts, offset = [], 0
    for modality in modalities:
        cum = 0
        for encoder_idx, assigned in enumerate(num_items_assigned[modality]):
            if assigned == 0:
                continue
            parts.append((offset + cum, encoder_idx))
            cum += 1
        offset += per_modality[modality]
    return parts


class EmtransferWaitingRequest(WaitingZmqRequest):
    """A request waiting for its embeddings on one scheduler rank, received through
    emtransfer. ``status`` goes PENDING -> SUCCESS (every part arrived and the multimodal
    inputs were assembled), FAIL (the encoder reported an error, a transfer failed, the
    request was aborted) or TIMEOUT (an emtransfer deadline; SGLang's own wait timeout is set
    by its scheduler loop). Everything else (registration, assembly, the embedding pool,
    the TP-wide agreement) is SGLang's."""

    # set by SGLang's base class (untyped)
    status: Any
    registration_error: Any
    recv_embedding_data: Any

    def __init__(self, *args: Any, link: LanguageLink, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link = link
        #: the rank's name in the rids: its receive endpoint, which it registers
        self.endpoint = NetworkAddress(self.host_name, self.embedding_port).to_host_port_str()
        self._parts: list[_Part] = []
        #: each part as it arrived, without its embedding (metadata and per-token fields)
        self.received_parts: list[Any] = []

    # -- SGLang's hooks ---------------------------------------------------------------------
    def send_encode_request(self) -> None:
        """Open one receive per part, then register this rank with the parts' encoders
        (SGLang's own ``/scheduler_receive_url`` call), which makes them deliver."""
        node = self.link.node
        for part_idx, encoder_idx in iter_parts(self.num_items_assigned):
            part_rid = create_part_req_id(self.recv_req.rid, part_idx)
            url = self.encoder_urls[encoder_idx]
            part = _Part(part_idx, part_rid, url)
            self._parts.append(part)
            part.handle = node.receive(rank_rid(part_rid, self.endpoint), self.link.address_of(url))
        _log.debug("receiving", rid=self.rid, parts=len(self._parts), endpoint=self.endpoint)
        super().send_encode_request()

    def _try_recv_mm_data(self) -> None:
        if self.status != WaitingMMRequestStatus.PENDING:
            return
        with self.registration_lock:
            registration_error, self.registration_error = self.registration_error, None
        if registration_error is not None:
            self._fail_and_release(*registration_error)
            return
        data = self.recv_embedding_data
        if data is None or not data.ready:
            for part in self._parts:
                if not part.taken and not self._poll_part(part):
                    return  # failed: the status says how
        data = self.recv_embedding_data
        if data is not None and data.ready and self._assemble_mm_inputs_from_embeddings():
            self.close_recv_socket()

    def consume_parts(self, parts: Any) -> None:
        """ZMQ frames for this request (the shared scheduler socket): not this backend's;
        dropped (emtransfer delivers every part)."""
        _log.warning("dropping a ZMQ embedding message: emtransfer delivers", rid=self.rid)

    def release_resources(self) -> None:
        """SGLang's release, and every receive still open is given up (its blocks freed,
        the encoder told). Idempotent."""
        super().release_resources()
        for part in self._parts:
            if not part.taken and part.handle is not None:
                part.taken = True
                part.handle.release()

    # -- the parts --------------------------------------------------------------------------
    def _poll_part(self, part: _Part) -> bool:
        """Take one part if it arrived; False once the request failed."""
        h = part.handle
        assert h is not None
        state = h.poll()
        if state is PollState.SUCCESS:
            part.taken = True
            try:
                got = h.result()
                recv_obj = from_received(got)
            except Exception as exc:
                h.release()
                _log.warning("malformed part", rid=self.rid, part=part.part_rid, error=str(exc))
                self._fail_and_release(f"emtransfer: malformed part {part.part_rid}: {exc}")
                return False
            h.release()
            record = _without_embedding(recv_obj)
            if recv_obj.error_msg is not None:
                _log.warning("encoder error", rid=self.rid, error=recv_obj.error_msg)
                self._fail_and_release(recv_obj.error_msg, recv_obj.error_code)
                return False
            if recv_obj.req_id != part.part_rid or not self._is_valid_embedding_part(recv_obj):
                self._fail_and_release(f"emtransfer: part {part.part_rid} came for another rid")
                return False
            try:
                self.recv_embedding_data = _aggregate_embedding_part(
                    self.recv_embedding_data, recv_obj, self.model_type
                )
            except Exception as exc:
                self._fail_and_release(f"Failed to decode embedding message: {exc}")
                return False
            self.received_parts.append(record)
            return True
        if state is PollState.FAILED:
            part.taken = True
            err = h.error()
            h.release()
            msg = f"emtransfer: receiving {part.part_rid} from {part.encoder_url} failed: {err}"
            code = getattr(err, "http_status", None)
            _log.warning("receive failed", rid=self.rid, part=part.part_rid, error=str(err))
            if isinstance(err, TransferTimeout):
                self.error_msg, self.error_code = msg, code
                self.status = WaitingMMRequestStatus.TIMEOUT
                self.release_resources()
                self.close_recv_socket()
            else:
                self._fail_and_release(msg, code)
            return False
        return True  # in flight


def _without_embedding(part: Any) -> Any:
    """The part's record without the embedding (it lives on in the aggregate)."""
    from types import SimpleNamespace

    return SimpleNamespace(**public_attrs(part))


__all__ = [
    "ENCODERS_ENV",
    "EmtransferWaitingRequest",
    "LanguageLink",
    "default_language_link",
    "iter_parts",
    "language_link_for",
    "parse_encoder_map",
]
